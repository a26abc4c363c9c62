"""A subscription answered 202 keeps its promise across a restart (SQLite store): the Observe
is stored with the application and its async-response-id (issue 14 item 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.actors.subscriptions import Pending
from dm_actor.coap.numbers import Code

from .support import Device
from .test_restart import async_responses, run_server, slow_jumps

if TYPE_CHECKING:
    from pathlib import Path


async def test_a_pending_subscription_is_reported_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "sleepy", binding="UQ", lifetime=3600)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    await trio.sleep(100)  # asleep
    subscriptions = first.supervisor.subscriptions
    result = await subscriptions.subscribe_waiting("sleepy", "/3303/0/5700", "app", 3.0)
    assert isinstance(result, Pending)
    assert first.supervisor.subscriptions_of("sleepy") == []
    scope.cancel()  # the daemon stops
    await trio.sleep(10)

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    dev.server = second.coap_udp
    assert (await dev.update()).code == Code.CHANGED  # it wakes: the stored Observe goes
    await trio.sleep(2)
    assert [(e.method, e.path) for e in dev.executed] == [(Code.GET, "/3303/0/5700")]
    [item] = async_responses(events).values()
    assert (item["id"], item["status"], item["ep"], item["path"]) == (
        result.async_response_id, 200, "sleepy", "/3303/0/5700")  # fmt: skip
    assert second.supervisor.subscriptions_of("sleepy", "app") == ["/3303/0/5700"]
