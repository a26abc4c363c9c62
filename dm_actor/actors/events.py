"""The notification-channel event stream: Pelion-shaped events, bounded.

Devices publish events synchronously and never wait: when a reader falls behind by `capacity`
events, the oldest are dropped and counted (Pelion drops the oldest too, beyond its queue
size). The API layer batches what it reads into `NotificationMessage`s.
"""

from __future__ import annotations

from collections import deque
from typing import Literal, NamedTuple, cast, get_args

import trio

Kind = Literal[
    "notifications",
    "registrations",
    "reg-updates",
    "de-registrations",
    "registrations-expired",
    "async-responses",
]
#: The `NotificationMessage` keys, in the order Pelion documents them.
KINDS: tuple[Kind, ...] = get_args(Kind)
Item = dict[str, object] | str


class ChannelEvent(NamedTuple):
    """One event for the notification channels, as the stream hands it out.

    A NamedTuple: the memory of the plain tuple it replaces, with names instead of
    `event[3]` (it still unpacks as `kind, item, owners, seq`).
    """

    kind: Kind
    item: Item
    #: the applications the event is for, None for all of them
    owners: frozenset[str] | None
    #: numbers a durable event (an AsyncIDResponse kept in the store until a channel
    #: delivered it, see `Supervisor.events_delivered`), None for the others
    seq: int | None


class EventStream:
    """A bounded FIFO of `ChannelEvent`s with one reader."""

    __slots__ = ("_events", "_waiter", "capacity", "dropped", "published")

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._events: deque[ChannelEvent] = deque()
        self._waiter = trio.Event()
        self.dropped = 0
        self.published = 0

    def __len__(self) -> int:
        return len(self._events)

    def publish(
        self,
        kind: str,
        item: Item,
        owners: frozenset[str] | None = None,
        seq: int | None = None,
    ) -> None:
        events = self._events
        if len(events) >= self.capacity:
            events.popleft()
            self.dropped += 1
        # (publishers name kinds with plain strings: `kind` is one of KINDS)
        events.append(ChannelEvent(cast("Kind", kind), item, owners, seq))
        self.published += 1
        self._waiter.set()

    def take(self, limit: int = 10_000) -> list[ChannelEvent]:
        """Up to `limit` events, oldest first, without waiting."""
        events = self._events
        n = min(limit, len(events))
        return [events.popleft() for _ in range(n)]

    async def get(self, limit: int = 10_000) -> list[ChannelEvent]:
        """Wait for at least one event, then take up to `limit`."""
        while not self._events:
            self._waiter = trio.Event()
            await self._waiter.wait()
        return self.take(limit)
