"""Scenario 4 of issue 17 (scale-out.md section 6): PostgreSQL stopped with `pg_ctl stop -m
immediate` under a stream of commands, then started again, under three real nodes (topology B:
127.0.0.1, .2, .3; lease TTL 1 s). Meanwhile a new command is refused (503
STORE_IS_BEHIND, or the connection refused by a node that stopped), no 202 is answered, and
none is accepted that is then lost: every 202 gets exactly one AsyncIDResponse and its
command runs once. A POST to a registered device is never answered another status (a
404). No node exits: each renews its own leases when the database is back, and takes no
other node's for one TTL (a node that exits anyway is restarted, as its supervisor would).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from tests.cluster.harness import (
    KEY,
    Cluster,
    Device,
    Inbox,
    Ledger,
    names_owned,
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

NODES = ("a", "b", "c")
OUTAGE = 3.0  # seconds PostgreSQL is down


async def test_postgres_stopped_immediately_and_restarted(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str
) -> None:
    began = time.monotonic()
    cluster = Cluster(tmp_path, pg_server, pg_dsn, "B", settings="[delivery]\nresend_grace = 1.0\n")
    ledger, inbox = Ledger(), Inbox("long-poll")
    try:
        with trio.fail_after(120):
            await cluster.start(*NODES)
            table = await cluster.settled()
            home = await cluster.home_of()
            assert home is not None
            names = [n for node in NODES for n in names_owned(table, {node}, 2, f"g{node}")]
            devices = [Device(n, cluster.nodes[NODES[i % 3]].coap) for i, n in enumerate(names)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.supervise)
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, cluster.nodes[home].http, KEY, "long-poll", inbox)
                stop = trio.Event()
                nursery.start_soon(post_stream, cluster, devices, ledger, stop)
                await trio.sleep(2.0)
                down = trio.current_time()
                await cluster.stop_postgres()
                await trio.sleep(OUTAGE)
                up = trio.current_time()
                await cluster.start_postgres()
                await cluster.settled(NODES, balanced=False, limit=40)
                recovered = trio.current_time()
                # commands after the recovery (the store retries its writes with back-off,
                # at most 5 s apart: docs/operations.md, "When the database fails")
                await trio.sleep(7.0)
                stop.set()
                await wait_for(
                    lambda: all(a in inbox.arrivals for a in ledger.accepted()), 30
                )  # fmt: skip
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    during, after = ledger.between(down + 0.2, up), ledger.between(recovered, float("inf"))
    answered_202 = ledger.between(down + 0.2, up, answered=True)[202]
    summary = (f"statuses while PostgreSQL was down: {dict(during)}; after the recovery "
               f"({recovered - up:.1f} s after the start): {dict(after)}; exits "
               f"{[(e.node, e.code, round(e.at - down, 1)) for e in cluster.exits]}; restarts "
               f"{dict(cluster.restarts)}; neither 202 nor 503 (async-id, node, s after the "
               f"stop, status): {ledger.odd(down)}; {time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert during[503] + during[-1] > 0, f"nothing refused meanwhile: {summary}"
    assert answered_202 == 0, f"202 answered while the store was down: {summary}"
    assert not [x for x in ledger.odd() if x[3] not in (None, -1)], f"not 202/503: {summary}"
    assert after[202] > 0, f"not serving after the restart: {summary}"
    # the nodes renew their own leases when the database is back: none takes another's
    # (all three exited, fenced, before ClusterNode's calm period after a lost database)
    assert not cluster.exits, f"a node exited: {summary}"
