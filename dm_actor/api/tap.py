"""The administrators' event tap and results: what the console sees, apart from applications.

`EventTap` sees every event the notification hub reads (registrations, updates,
de-registrations, expirations, notifications, AsyncIDResponses: every application's, and the
administrators' own), before the hub fans them out. Each subscriber (an administrator's
WebSocket, `GET /admin/events`) has its own bounded buffer: beyond `capacity` the oldest
events are dropped and counted, so a slow or stalled subscriber never holds anything back;
the hub only appends (`deque.extend` on a bounded deque, per batch). At most `max_subscribers`
taps are open at once.

`AdminResults` keeps the AsyncIDResponses of administrators' own device requests and
subscriptions (an administrator owns no channel: the hub gives them here instead of keeping
them for a channel that will never come), the most recent `capacity` of them.

No network I/O here: `console.py` serves the WebSocket and the routes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dm_actor.actors.events import ChannelEvent

#: events buffered per tap subscriber before the oldest are dropped
TAP_CAPACITY = 1000
#: taps open at once (a further one is refused: WebSocket close 1013)
MAX_TAPS = 8
#: administrators' AsyncIDResponses kept for `GET /admin/async-responses/{id}`
RESULTS_CAPACITY = 1000
_ASYNC = "async-responses"


class TapSubscriber:
    """One subscriber's bounded buffer: `dropped` counts what fell off its bound."""

    __slots__ = ("_ready", "dropped", "events", "taken")

    def __init__(self, capacity: int) -> None:
        self.events: deque[ChannelEvent] = deque(maxlen=capacity)
        self.dropped = 0
        self.taken = 0
        self._ready = trio.Event()

    def offer(self, batch: Sequence[ChannelEvent]) -> None:
        """Append `batch` (never waits): the oldest events beyond the bound are dropped."""
        events = self.events
        capacity = events.maxlen
        assert capacity is not None
        over = len(events) + len(batch) - capacity
        if over > 0:
            self.dropped += over
        events.extend(batch)
        self._ready.set()

    async def wait(self) -> None:
        """Until there are events."""
        while not self.events:
            if self._ready.is_set():
                self._ready = trio.Event()
            await self._ready.wait()

    def take(self, limit: int) -> list[ChannelEvent]:
        """Up to `limit` events, oldest first."""
        events = self.events
        n = min(limit, len(events))
        self.taken += n
        return [events.popleft() for _ in range(n)]


class EventTap:
    """Every event of the server, for administrators' subscribers (see the module)."""

    __slots__ = ("_closed_dropped", "capacity", "max_subscribers", "refused", "seen", "subscribers")

    def __init__(self, capacity: int = TAP_CAPACITY, max_subscribers: int = MAX_TAPS) -> None:
        self.capacity = capacity
        self.max_subscribers = max_subscribers
        self.subscribers: list[TapSubscriber] = []
        self.seen = 0  # events the hub handed over, in all
        self.refused = 0  # subscriptions refused at `max_subscribers`
        self._closed_dropped = 0  # what the closed subscribers' bounds dropped

    @property
    def dropped(self) -> int:
        """Events the subscribers' bounds dropped, in all (closed subscribers' too)."""
        return self._closed_dropped + sum(s.dropped for s in self.subscribers)

    def __call__(self, batch: Sequence[ChannelEvent]) -> None:
        """The hub read `batch` (called once per batch, before the fan-out)."""
        self.seen += len(batch)
        for subscriber in self.subscribers:
            subscriber.offer(batch)

    def subscribe(self) -> TapSubscriber | None:
        """A new subscriber, or None when `max_subscribers` are open."""
        if len(self.subscribers) >= self.max_subscribers:
            self.refused += 1
            return None
        subscriber = TapSubscriber(self.capacity)
        self.subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: TapSubscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            self._closed_dropped += subscriber.dropped


class AdminResults:
    """The latest AsyncIDResponses of administrators, by (administrator, id)."""

    __slots__ = ("capacity", "items")

    def __init__(self, capacity: int = RESULTS_CAPACITY) -> None:
        self.capacity = capacity
        self.items: OrderedDict[tuple[str, str], dict[str, object]] = OrderedDict()

    def __call__(self, owner: str, event: ChannelEvent) -> None:
        """The hub's hand-over of an event owned by administrator `owner` (it has no
        channel): an AsyncIDResponse is kept; other events (its subscriptions'
        notifications) were seen by the tap already."""
        item = event.item
        if event.kind != _ASYNC or not isinstance(item, dict):
            return
        key = (owner, str(item.get("id", "")))
        items = self.items
        items[key] = item
        items.move_to_end(key)
        while len(items) > self.capacity:
            items.popitem(last=False)

    def get(self, owner: str, async_id: str) -> dict[str, object] | None:
        return self.items.get((owner, async_id))
