"""Scenario 5 of issue 17 (scale-out.md section 6): a node joins a running cluster under a
stream of commands (topology B: a on 127.0.0.1, b on .2, then c on .3; lease TTL 1 s). Slots
move to the new node by planned handover: no node exits, the new node ends with its share,
every accepted command gets exactly one AsyncIDResponse and runs once, also those whose
device's slot moved while they were in flight; a POST is answered 202 (or 503), never 404.
The devices, on distinct slots (half of them), talk to a and b in turn.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from dm_actor.cluster.slots import slot_of
from tests.cluster.harness import (
    KEY,
    SLOTS,
    Cluster,
    Device,
    Inbox,
    Ledger,
    distinct_slots,
    post_stream,
    pytestmark_common,
    register_all,
    start_consumer,
    verdict,
    wait_for,
)
from tests.store.postgres import pg_dsn, pg_server

if TYPE_CHECKING:
    from pathlib import Path

    from tests.store.postgres import PostgresServer

__all__ = ["pg_dsn", "pg_server"]
pytestmark = pytestmark_common

DEVICES = 32


async def test_a_node_joins_and_slots_move_by_handover(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str
) -> None:
    began = time.monotonic()
    cluster = Cluster(tmp_path, pg_server, pg_dsn, "B", settings="[delivery]\nresend_grace = 1.0\n")
    ledger, inbox = Ledger(), Inbox("long-poll")
    try:
        with trio.fail_after(90):
            await cluster.start("a", "b")
            before = await cluster.settled()
            nodes = [cluster.nodes["a"], cluster.nodes["b"]]
            names = distinct_slots(DEVICES, "j")
            devices = [Device(n, nodes[i % 2].coap) for i, n in enumerate(names)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(cluster.supervise, restart=False))
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, cluster.nodes["a"].http, KEY, "long-poll", inbox)
                stop = trio.Event()
                nursery.start_soon(partial(post_stream, cluster, devices, ledger, stop, 0.05))
                await trio.sleep(1.5)
                joined = trio.current_time()
                await cluster.start("c")
                after = await cluster.settled(("a", "b", "c"))
                moved_at = trio.current_time()
                await trio.sleep(2.0)
                stop.set()
                await wait_for(lambda: all(a in inbox.arrivals for a in ledger.accepted()), 20)
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    moved = [n for n in names if before[slot_of(n, SLOTS)] != after[slot_of(n, SLOTS)]]
    held = {n: list(after.values()).count(n) for n in ("a", "b", "c")}
    summary = (f"slots after the join {held}, balanced {moved_at - joined:.1f} s after c started; "
               f"devices whose slot moved: {len(moved)}; exits {cluster.exits}; neither 202 nor "
               f"503 (async-id, node, s after c started, status): {ledger.odd(joined)}; "
               f"{time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert not cluster.exits, summary
    assert held["c"] >= cluster.slots // 3 and moved, summary
    assert set(ledger.status.values()) <= {202, 503}, f"not 202/503: {summary}"
