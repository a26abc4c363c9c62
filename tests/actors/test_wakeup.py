"""Issue 13 item 5: a queue-mode device that wakes with a Register from a new port (Anjay
closes its socket while asleep) hears the 2.01 before the first queued command: Wakaama
ignores requests until it is registered. The Register's answer waits for the store; the
queued command must wait for that answer, whichever of them the store releases first."""

from __future__ import annotations

from functools import partial

import pytest
import trio
import trio.testing

from dm_actor.coap.numbers import Code, MessageType
from tests.actors.support import GatedStore, online, responses, settle


@pytest.mark.parametrize("gated", [False, True])
async def test_a_waking_register_is_answered_before_the_queued_command(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, gated: bool
) -> None:
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store, binding="UQ")
    for cycle in range(6):  # (trio's scheduling order varies: several wake-ups)
        dev.close()  # asleep: its socket is gone
        await trio.sleep(100)  # past the awake time (93 s): commands wait for the wake-up
        submitted = partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id=f"c{cycle}")
        nursery.start_soon(submitted)
        await settle()
        assert not dev.executed or dev.executed[-1].path != "/3/0/1" or cycle
        store.open = not gated
        await dev.start(nursery)  # a new socket: a new source port
        waking = trio.current_time()
        nursery.start_soon(dev.register)
        await settle()
        if gated:
            await trio.sleep(0.5)
            store.commit()  # the Register and the command's attempt, in one commit
            store.open = True
        await trio.sleep(5)
        after = [m for t, m in dev.arrivals if t >= waking]
        kinds = [(m.mtype, m.code) for m in after]
        created = kinds.index((MessageType.ACK, Code.CREATED))
        first_get = next(i for i, (_, code) in enumerate(kinds) if code == Code.GET)
        assert created < first_get, kinds
        assert responses(server)[f"c{cycle}"]["status"] == 200


class _Steps(trio.abc.Instrument):
    """Counts the steps of tasks named "device" (the device actors' tasks)."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == "device":
            self.steps += 1


async def test_a_command_wakes_its_idle_device_task_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The submitter waits for the store anyway and lets the attempt go itself: the device's
    task is woken once per command (to arm its timer), not also to wait for the commit
    (docs/benchmarks.md, "Issue 12": that second wake-up cost 15-21 % CPU per command on
    SQLite). Checked with a store that commits only when the test says so."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store)
    store.open = False
    dev.mute = True  # it executes, but its answer is lost: no mail wakes the task
    await settle()
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        submitted = partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="once")
        nursery.start_soon(submitted)
        await settle()
        assert not dev.executed  # held: its Message ID and token are not durable yet
        store.commit()
        await settle()
        assert [r.path for r in dev.executed] == ["/3/0/1"]
        woken = steps.steps
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert woken == 1
