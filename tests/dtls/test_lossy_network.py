"""Our client and server over a terrible network (trio's test_handshake_over_terrible_network
idea, in explicit virtual time): datagrams dropped, duplicated, delayed and reordered with a
seeded RNG. Every handshake completes through the RFC 6347 §4.2.4 timers, and both sides agree."""

from __future__ import annotations

import heapq
import random

import pytest

from dm_actor.dtls import ApplicationData, DatagramToSend, DtlsClient, DtlsServer, Event
from tests.dtls.peers import CLIENT, IDENTITY, KEY, SERVER


def run(seed: int, cid: bytes | None) -> tuple[DtlsServer, DtlsClient, float]:
    rng = random.Random(seed)
    server = DtlsServer({IDENTITY: KEY}.get, random_bytes=rng.randbytes)
    client = DtlsClient(SERVER, IDENTITY, KEY, connection_id=cid, random_bytes=rng.randbytes)
    wire: list[tuple[float, int, str, bytes]] = []  # (arrival, order, to, data)
    order = 0

    def emit(events: list[Event], to: str, now: float) -> None:
        nonlocal order
        for event in events:
            if not isinstance(event, DatagramToSend):
                continue
            op = rng.choices(["deliver", "drop", "dupe", "delay"], [0.6, 0.2, 0.1, 0.1])[0]
            copies = {"deliver": 1, "drop": 0, "dupe": 2, "delay": 1}[op]
            for _ in range(copies):
                delay = rng.uniform(0.01, 2.5 if op == "delay" else 0.1)
                order += 1
                heapq.heappush(wire, (now + delay, order, to, event.data))

    now = 0.0
    emit(client.connect(now), "server", now)
    while now < 120.0 and (client.session is None or server.session_at(CLIENT) is None):
        timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
        candidates = [*timers, wire[0][0]] if wire else timers
        if not candidates:
            break
        now = max(now, min(candidates))
        while wire and wire[0][0] <= now:
            _, _, to, data = heapq.heappop(wire)
            if to == "server":
                emit(server.receive(data, CLIENT, now), "client", now)
            else:
                emit(client.receive(data, now), "server", now)
        emit(server.handle_timer(now), "client", now)
        emit(client.handle_timer(now), "server", now)
    return server, client, now


@pytest.mark.parametrize("cid", [None, b""])
def test_handshakes_complete_over_a_lossy_reordering_network(cid: bytes | None) -> None:
    durations = []
    for seed in range(40):
        server, client, now = run(seed, cid)
        session = server.session_at(CLIENT)
        assert session is not None and client.session is not None, f"seed {seed}"
        durations.append(now)
        # Both sides derived the same keys: data flows both ways.
        up = server.receive(client.send(b"up"), CLIENT, now)
        assert [e.data for e in up if isinstance(e, ApplicationData)] == [b"up"]
        down = client.receive(server.send(session, b"down"), now)
        assert [e.data for e in down if isinstance(e, ApplicationData)] == [b"down"]
        assert server.statistics().handshakes == 0
    assert max(durations) < 60.0
