"""Scenario 1 of issue 17 (scale-out.md section 6): three real nodes on 127.0.0.1, .2 and .3
(topology B) on one PostgreSQL. Every device registers with node A's address; the application
posts its commands to node B's HTTP API and reads its channel (long poll, or WebSocket) from
node C. The devices are chosen so that each node owns some of them: A forwards their
datagrams to the owner, the owner answers back through A (every datagram a device receives
comes from A's address), B proxies the POSTs to the owner, C relays the channel. Every
accepted async-id gets exactly one AsyncIDResponse and each command runs once on its device.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
import trio

from dm_actor.cluster.slots import slot_of
from tests.cluster.harness import (
    KEY,
    Cluster,
    Device,
    Inbox,
    Ledger,
    execute,
    names_owned,
    put,
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

PER_NODE = 2  # devices owned by each node


@pytest.mark.parametrize("channel", ["long-poll", "websocket"])
async def test_register_via_a_command_via_b_answer_on_c(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str, channel: str
) -> None:
    began = time.monotonic()
    cluster = Cluster(tmp_path, pg_server, pg_dsn, "B")
    ledger, inbox = Ledger(), Inbox(channel)
    try:
        with trio.fail_after(60):
            await cluster.start("a", "b", "c")
            table = await cluster.settled()
            home = await cluster.home_of()
            a, c = cluster.nodes["a"], cluster.nodes["c"]
            names = [n for node in "abc" for n in names_owned(table, {node}, PER_NODE, f"r{node}")]
            devices = [Device(name, a.coap) for name in names]
            async with trio.open_nursery() as nursery:
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, c.http, KEY, channel, inbox)
                for i, device in enumerate(devices * 2):
                    async_id = f"c{i}"
                    body = put(async_id) if i % 2 else execute(async_id)
                    status = await cluster.command("b", device.name, async_id, body)
                    ledger.note(async_id, device, async_id, status)
                await wait_for(lambda: all(x in inbox.arrivals for x in ledger.accepted()), 20)
                await trio.sleep(1.0)  # late repeats
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    sources = {d.name: dict(d.sources()) for d in devices}
    owners = {name: table.get(slot_of(name, cluster.slots)) for name in names}
    summary = (f"home {home}; owners {owners}; datagrams by source {sources}; "
               f"{time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert len(ledger.accepted()) == len(ledger.status), summary
    assert all(set(d.sources()) == {a.coap} for d in devices), f"not all through A: {summary}"
    assert not cluster.exits, cluster.exits
