"""A pending subscription withdrawn after a restart (docs/api.md, "Subscriptions": a DELETE
withdraws it, its AsyncIDResponse still comes, nothing is recorded). The Observe waiting for
a sleeping device is restored from the store; the DELETE must find it there too. Real
SQLite files, loopback CoAP, virtual time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.actors.subscriptions import Pending
from dm_actor.coap.numbers import Code
from tests.actors.support import Device
from tests.actors.test_restart import async_responses, run_server, slow_jumps

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor import app
    from dm_actor.actors.events import EventStream

PATH = "/3303/0/5700"


async def _pending_then_restart(
    nursery: trio.Nursery, clock: trio.testing.MockClock, tmp_path: Path
) -> tuple[Device, Pending, app.Listening, EventStream]:
    slow_jumps(clock)
    scope, first, _ = await run_server(nursery, tmp_path, clock)
    dev = Device(first.coap_udp, "sleepy", binding="UQ", lifetime=3600)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    await trio.sleep(100)  # asleep
    before = await first.supervisor.subscriptions.subscribe_waiting("sleepy", PATH, "app", 3.0)
    assert isinstance(before, Pending)
    scope.cancel()  # the daemon stops
    await trio.sleep(10)
    _, second, events = await run_server(nursery, tmp_path, clock)
    dev.server = second.coap_udp
    return dev, before, second, events


async def test_a_delete_after_a_restart_withdraws_the_pending_subscription(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dev, before, second, events = await _pending_then_restart(nursery, autojump_clock, tmp_path)
    subscriptions = second.supervisor.subscriptions
    subscriptions.unsubscribe("sleepy", PATH, "app")
    assert (await dev.update()).code == Code.CHANGED  # it wakes: the stored Observe goes
    await trio.sleep(2)
    assert before.async_response_id in async_responses(events)  # the 202 is answered
    assert subscriptions.subscriptions_of("sleepy", "app") == []  # and nothing recorded


async def test_a_delete_of_all_after_a_restart_withdraws_the_pending_subscription(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    dev, before, second, events = await _pending_then_restart(nursery, autojump_clock, tmp_path)
    subscriptions = second.supervisor.subscriptions
    subscriptions.unsubscribe_all("sleepy", "app")
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(2)
    assert before.async_response_id in async_responses(events)
    assert subscriptions.subscriptions_of("sleepy", "app") == []
