"""The smallest bounded mailbox a parked Trio task can wait on.

A list and a parked task: about half the memory of a Trio memory channel (measured in
docs/architecture.md), which matters at a million idle devices. Producers never block:
`put` raises `Overloaded` when the mailbox is full, or `MailboxClosed` after `close`. A
producer that must not drop (CoAP over TCP: nothing is retransmitted) awaits `wait_room`
after `Overloaded` and puts again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")


class Overloaded(Exception):
    """The mailbox is full: the producer should shed load (HTTP 503, drop a datagram)."""


class MailboxClosed(Exception):
    """The actor has stopped."""


class Mailbox(Generic[T]):
    __slots__ = ("_capacity", "_items", "_room", "_waiter", "closed", "interrupt")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        # made by the first `put` and handed over whole by `take`: an idle mailbox holds no
        # list (56 bytes per idle device)
        self._items: list[T] | None = None
        self._waiter: trio.lowlevel.Task | None = None
        # producers waiting for room (made when the first one waits: most mailboxes never fill)
        self._room: trio.lowlevel.ParkingLot | None = None
        self.closed = False
        # a scope the owner waits in for something else (the store): mail cancels it
        self.interrupt: trio.CancelScope | None = None

    def __len__(self) -> int:
        items = self._items
        return 0 if items is None else len(items)

    def put(self, item: T) -> None:
        if self.closed:
            raise MailboxClosed
        items = self._items
        if items is None:
            if self._capacity < 1:
                raise Overloaded
            self._items = [item]
        elif len(items) >= self._capacity:
            raise Overloaded
        else:
            items.append(item)
        self._wake()

    def close(self) -> None:
        """Refuse further items and wake the owner, which sees `closed` and returns."""
        self.closed = True
        self._wake()
        self._wake_producers()

    def poke(self) -> None:
        """Wake the owner without mail (its loop then looks at its state again)."""
        self._wake()

    def take(self) -> list[T]:
        """Everything queued, oldest first, leaving the mailbox empty."""
        items = self._items
        if items is None:
            return []
        self._items = None
        self._wake_producers()
        return items

    def wait(self) -> Awaitable[object]:
        """Await it: returns when an item is queued or the mailbox is closed.

        A plain method returning the awaitable (not a coroutine of its own) and a bound-method
        abort function: a parked actor then holds one frame fewer and no closure, about 390
        bytes less per idle device (docs/benchmarks.md, "Memory per idle device").
        """
        if self._items or self.closed:
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 - the caller awaits it
        if self._waiter is not None:
            raise RuntimeError("only the owning task may wait on a mailbox")
        self._waiter = trio.lowlevel.current_task()
        return trio.lowlevel.wait_task_rescheduled(self._abort)  # noqa: ASYNC105

    def wait_room(self) -> Awaitable[object]:
        """Await it: returns when the owner has taken what was queued (there is room again)
        or the mailbox is closed; at once (a checkpoint) when it is not full. Any number of
        producers may wait. Nothing is reserved: put again, and wait again on `Overloaded`.
        """
        if len(self) < self._capacity or self.closed:
            return trio.lowlevel.checkpoint()  # noqa: ASYNC105 - the caller awaits it
        room = self._room
        if room is None:
            room = self._room = trio.lowlevel.ParkingLot()
        return room.park()

    def _wake_producers(self) -> None:
        room = self._room
        if room is not None:
            self._room = None
            room.unpark_all()

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        elif self.interrupt is not None:
            self.interrupt.cancel()
