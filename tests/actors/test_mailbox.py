"""The actor's mailbox: bounded, ordered, and the three ways its owner is woken."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from dm_actor.actors.mailbox import Mailbox, MailboxClosed, Overloaded


def test_put_take_is_ordered_and_bounded() -> None:
    box: Mailbox[int] = Mailbox(3)
    assert len(box) == 0 and box.take() == []
    for i in range(3):
        box.put(i)
    with pytest.raises(Overloaded):
        box.put(3)
    assert len(box) == 3
    assert box.take() == [0, 1, 2]
    assert len(box) == 0 and box.take() == []
    box.put(4)
    assert box.take() == [4]


def test_a_mailbox_of_no_room_refuses_everything() -> None:
    box: Mailbox[int] = Mailbox(0)
    with pytest.raises(Overloaded):
        box.put(1)


def test_closed_refuses_mail() -> None:
    box: Mailbox[int] = Mailbox(3)
    box.close()
    with pytest.raises(MailboxClosed):
        box.put(1)


async def test_the_owner_wakes_for_mail_a_poke_and_the_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box: Mailbox[int] = Mailbox(3)
    woken: list[float] = []

    async def owner() -> None:
        for _ in range(3):
            await box.wait()
            woken.append(trio.current_time())
            box.take()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        await trio.sleep(1)
        box.put(1)
        await trio.sleep(1)
        box.poke()
        await trio.sleep(1)
        box.close()
    assert woken == [1, 2, 3]


async def test_mail_interrupts_a_wait_for_something_else(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An actor waiting for the store (in `interrupt`) reads its mail at once."""
    box: Mailbox[int] = Mailbox(3)
    interrupted: list[float] = []

    async def owner() -> None:
        with trio.CancelScope(deadline=math.inf) as scope:
            box.interrupt = scope
            await trio.sleep_forever()
        box.interrupt = None
        interrupted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(owner)
        await trio.sleep(5)
        box.put(1)
    assert interrupted == [5]
    assert box.take() == [1]


async def test_a_producer_waits_for_room(autojump_clock: trio.testing.MockClock) -> None:
    box: Mailbox[int] = Mailbox(1)
    box.put(0)
    done: list[float] = []

    async def producer() -> None:
        await box.wait_room()
        box.put(1)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.sleep(2)
        assert box.take() == [0]
    assert done == [2]
    assert box.take() == [1]
