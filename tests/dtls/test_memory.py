"""An established session stays small (issue 15's goal: ≤ 1.5 KB of DTLS state per device)."""

from __future__ import annotations

import gc
import tracemalloc
from typing import TYPE_CHECKING

from dm_actor.dtls import DtlsClient, DtlsServer
from tests.dtls.peers import KEY, SERVER, our_handshake

if TYPE_CHECKING:
    from dm_actor.address import Address

N = 300


def test_python_heap_per_established_session_is_under_a_kilobyte() -> None:
    # No get_timer() call: the timer heap itself must not keep completed handshakes (their
    # transcript, flight and master secret) alive; it did before 0a73689 (1,212 B/session here).
    keys = {f"dev-{i}".encode(): KEY for i in range(N)}
    addresses: list[Address] = [(f"127.0.{i // 250}.{i % 250}", 20000 + i) for i in range(N)]
    peers = [DtlsClient(SERVER, f"dev-{i}".encode(), KEY, connection_id=b"") for i in range(N)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        server = DtlsServer(keys.get)
        for address, peer in zip(addresses, peers, strict=True):
            our_handshake(server, peer, address)
            assert peer.session is not None
            server.receive(peer.send(b"x"), address, 1.0)
        del peers, peer
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert server.statistics().sessions == N
    assert grown / N < 1024, grown / N
