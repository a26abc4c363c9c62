"""Failover scenarios of issue 17 (scale-out.md section 6), on real nodes and a real
PostgreSQL, lease TTL 1 s, real time.

- `test_kill_9_the_owner_mid_attempt` (scenario 2; topology A: three nodes sharing
  127.0.0.1's CoAP port; topology B: 127.0.0.1, .2, .3, the devices talking to a node that
  survives, so the new owner must send through that ingress node for the device to see the
  same source): the devices of one node V (not the application's home) delay their answers
  2.5 s; once each has received its command, V is killed with SIGKILL. The new owner resends
  the same exchange (Message ID and token): each device executes once (it deduplicates by
  source and Message ID) and exactly one AsyncIDResponse arrives; commands posted after the
  kill are answered too.
- `test_a_paused_owner_sends_nothing_after_its_deadline` (scenario 3, topology B: 127.0.0.1,
  .2, .3, so a datagram's source names the node that sent it): the devices of V register
  with V's own address and ignore what V sends them (its command stays in flight, V keeps
  retransmitting); V is paused with SIGSTOP for 3 TTLs while the devices turn to another
  node, one Update sent to V's address waits in V's socket; the others take V's slots and
  serve (the command in flight executed once, new commands answered); on SIGCONT V sends
  nothing (no datagram from V's address after the pause) and, finding its slots taken or its
  commit fenced, exits.
- `test_a_queue_mode_device_wakes_during_the_takeover_gap` (scenario 6, topology A): queue
  mode devices of V sleep with a command queued for each; V is killed and the devices wake at
  once: their Update is lost in the gap, retransmitted, lands on the new owner (2.04), which
  sends the queued command: executed once, one AsyncIDResponse.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from dm_actor.coap.numbers import Code
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

NODES = ("a", "b", "c")
VICTIMS = 3  # devices owned by the node that fails
OTHERS = 2  # devices owned by the others (served throughout)


async def _victim(cluster: Cluster) -> tuple[str, str, str, dict[int, str | None]]:
    """The settled cluster's lease table, the node that will fail (not the application's
    home, whose channel would move), the home, and a third node (neither)."""
    table = await cluster.settled()
    home = await cluster.home_of()
    assert home is not None
    victim = next(n for n in NODES if n != home)
    third = next(n for n in NODES if n not in (home, victim))
    return victim, home, third, table


def answered(ledger: Ledger, inbox: Inbox) -> bool:
    return all(a in inbox.arrivals for a in ledger.accepted())


@pytest.mark.parametrize("topology", ["A", "B"])
async def test_kill_9_the_owner_mid_attempt(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str, topology: str
) -> None:
    began = time.monotonic()
    settings = "[delivery]\nresend_grace = 1.0\n"
    cluster = Cluster(tmp_path, pg_server, pg_dsn, topology, settings=settings)
    ledger, inbox = Ledger(), Inbox("long-poll")
    refusals: Counter[int] = Counter()  # refused new commands, retried
    failover = None
    try:
        with trio.fail_after(90):
            await cluster.start(*NODES)
            victim, home, third, table = await _victim(cluster)
            doomed = names_owned(table, {victim}, VICTIMS, "k")
            safe = names_owned(table, {home, third}, OTHERS, "s")
            ingress = cluster.nodes[home].coap  # in B, a node that survives (in A, the VIP)
            devices = [Device(n, ingress) for n in doomed + safe]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.supervise)
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, cluster.nodes[home].http, KEY, "long-poll", inbox)
                for device in devices:
                    device.delay = 2.5  # past the takeover: the new owner resends
                for i, device in enumerate(devices):
                    async_id = f"m{i}"  # posted to a node that is not the owner: proxied
                    status = await cluster.command(third, device.name, async_id, execute(async_id))
                    ledger.note(async_id, device, async_id, status)
                in_flight = await wait_for(
                    lambda: all(d.requests_from(value=f"m{i}") for i, d in enumerate(devices)), 10
                )
                assert in_flight, "the victim's devices never received their commands"
                killed = await cluster.kill(victim)
                await cluster.settled(tuple(n for n in NODES if n != victim), balanced=False)
                for device in devices:
                    device.delay = 0.0
                for i, device in enumerate(devices):  # new commands, after the takeover
                    async_id = f"n{i}"
                    status = await cluster.command_retried(
                        home, device.name, async_id, put(async_id), refusals
                    )
                    ledger.note(async_id, device, async_id, status)
                await wait_for(lambda: answered(ledger, inbox), 20)
                firsts = [inbox.arrivals[f"m{i}"][0].at for i in range(VICTIMS)
                          if inbox.arrivals.get(f"m{i}")]  # fmt: skip
                failover = max(firsts) - killed if len(firsts) == VICTIMS else None
                await trio.sleep(1.5)  # late repeats
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    resent = {f"m{i}": d.trace(f"m{i}") for i, d in enumerate(devices[:VICTIMS])}
    summary = (f"victim {victim} (home {home}); in-flight commands as received {resent}; "
               f"kill to the last in-flight command's "
               f"response: {failover} s; exits {cluster.exits}; new commands refused and "
               f"retried {dict(refusals)}; "
               f"{time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert len(ledger.accepted()) == len(ledger.status), f"{ledger.status}\n{summary}"
    assert not cluster.exits, summary


async def test_a_paused_owner_sends_nothing_after_its_deadline(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str
) -> None:
    began = time.monotonic()
    cluster = Cluster(tmp_path, pg_server, pg_dsn, "B", settings="[delivery]\nresend_grace = 1.0\n")
    ledger, inbox = Ledger(), Inbox("long-poll")
    refusals: Counter[int] = Counter()  # refused new commands, retried
    try:
        with trio.fail_after(90):
            await cluster.start(*NODES)
            victim, home, third, table = await _victim(cluster)
            v = cluster.nodes[victim]
            devices = [Device(n, v.coap) for n in names_owned(table, {victim}, VICTIMS, "p")]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(cluster.supervise, restart=False))
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, cluster.nodes[home].http, KEY, "long-poll", inbox)
                for device in devices:
                    device.ignore.add(v.coap)  # V's command stays in flight
                for i, device in enumerate(devices):
                    async_id = f"m{i}"
                    status = await cluster.command(third, device.name, async_id, execute(async_id))
                    ledger.note(async_id, device, async_id, status)
                sent = await wait_for(
                    lambda: all(
                        d.requests_from(v.coap, value=f"m{i}") for i, d in enumerate(devices)
                    ),
                    10,
                )
                assert sent, "V never sent the commands"
                paused = cluster.pause(victim)
                for device in devices:
                    device.poke(v.coap)  # an Update waiting in V's socket
                    device.server = cluster.nodes[third].coap
                taken = await cluster.settled((home, third), balanced=False)
                assert all(o != victim for o in taken.values())
                async with trio.open_nursery() as updates:
                    for device in devices:
                        updates.start_soon(device.update)
                for i, device in enumerate(devices):  # served by the new owner meanwhile
                    async_id = f"n{i}"
                    status = await cluster.command_retried(
                        third, device.name, async_id, put(async_id), refusals
                    )
                    ledger.note(async_id, device, async_id, status)
                await wait_for(lambda: answered(ledger, inbox), 15)
                await trio.sleep(max(0.0, paused + 3 * cluster.lease_ttl - trio.current_time()))
                resumed = cluster.resume(victim)
                exited = await wait_for(lambda: bool(cluster.exits), 10)
                await wait_for(lambda: answered(ledger, inbox), 10)
                await trio.sleep(1.5)  # anything V would still send
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    late = {d.name: [(round(x.at - paused, 3), x.message) for x in d.received
                     if x.source == v.coap and x.at > paused + 0.05] for d in devices}  # fmt: skip
    updated = {d.name: d.transmissions["update"] for d in devices}
    summary = (f"victim {victim} paused {resumed - paused:.2f} s; from V after the pause: {late}; "
               f"exits {cluster.exits}; Update transmissions {updated}; new commands refused "
               f"and retried {dict(refusals)}; "
               f"{time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert not any(late.values()), f"V sent after its deadline: {summary}"
    assert exited and [e.node for e in cluster.exits] == [victim], summary
    assert len(ledger.accepted()) == len(ledger.status), f"{ledger.status}\n{summary}"


async def test_a_queue_mode_device_wakes_during_the_takeover_gap(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str
) -> None:
    began = time.monotonic()
    settings = "[delivery]\nresend_grace = 1.0\nawake_time = 1.0\n"
    cluster = Cluster(tmp_path, pg_server, pg_dsn, "A", settings=settings)
    ledger, inbox = Ledger(), Inbox("long-poll")
    try:
        with trio.fail_after(90):
            await cluster.start(*NODES)
            victim, home, third, table = await _victim(cluster)
            names = names_owned(table, {victim}, VICTIMS, "q")
            devices = [Device(n, cluster.nodes["a"].coap, queue=True) for n in names]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cluster.supervise)
                for device in devices:
                    await nursery.start(device.run)
                await register_all(devices)
                await start_consumer(nursery, cluster.nodes[home].http, KEY, "long-poll", inbox)
                for device in devices:
                    device.asleep = True
                await trio.sleep(1.5)  # past the awake time: the server holds what comes
                for i, device in enumerate(devices):
                    async_id = f"q{i}"
                    status = await cluster.command(third, device.name, async_id, put(async_id))
                    ledger.note(async_id, device, async_id, status)
                await trio.sleep(0.3)
                await cluster.kill(victim)
                for device in devices:
                    device.asleep = False
                codes: dict[str, int | None] = {}

                async def wake(device: Device) -> None:
                    answer = await device.update(attempts=5)  # 2 + 4 + 8 + 16 s
                    codes[device.name] = None if answer is None else answer.code

                async with trio.open_nursery() as updates:
                    for device in devices:
                        updates.start_soon(wake, device)
                await wait_for(lambda: answered(ledger, inbox), 15)
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel()
    finally:
        await cluster.close()
    updated = {d.name: d.transmissions["update"] for d in devices}
    summary = (f"victim {victim}; Update answers {codes}, transmissions {updated}; "
               f"exits {cluster.exits}; {time.monotonic() - began:.1f} s")  # fmt: skip
    print(verdict(ledger, inbox, summary + "\n" + cluster.logs()))
    print(summary)
    assert len(ledger.accepted()) == len(ledger.status), f"{ledger.status}\n{summary}"
    assert all(c == Code.CHANGED.value for c in codes.values()), summary
    assert all(n >= 2 for n in updated.values()), f"no gap: {summary}"
