"""Notification channels: one per application, fed by one hub task.

The hub is the only reader of the supervisor's `EventStream`. It fans every event out to the
channel of each application the event is for (all of them when `owners` is None), into a
bounded per-channel buffer: beyond `capacity` the oldest event is dropped and counted, so a
slow or absent client never blocks a device. Every `spill_interval` the events still waiting
in a channel are written to the store (`spill`): an application that is away does not lose
them to a restart; a delivery forgets them again. A delivery mechanism (a WebSocket session, a long
poll, a webhook task of `webhook.py`) waits on its channel and takes `NotificationMessage`s
from it: up to `max_chunk_size` events grouped by kind, encoded once. A message that could not
be delivered is put back with `unread`. This module never does network I/O.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections import deque
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor.actors.events import KINDS
from dm_actor.api.schemas import DEFAULT_SERIALIZATION, Serialization
from dm_actor.store.base import ChannelRecord

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.actors.events import Event, EventStream, Item
    from dm_actor.store.base import Store

WEB_SOCKET = "WEB_SOCKET"
LONG_POLLING = "LONG_POLLING"
CALLBACK = "CALLBACK"

#: Pelion's channel lifetimes without a consumer (seconds); see `NotificationHub`
IDLE_EXPIRY = {WEB_SOCKET: 24 * 3600.0, LONG_POLLING: 600.0}
_EXPIRY_SWEEP = 60.0
log = logging.getLogger(__name__)

_DEREGISTRATION_KINDS = frozenset(("de-registrations", "registrations-expired"))
_ENDPOINT_KINDS = frozenset(("registrations", "reg-updates"))
_encode = msgspec.json.Encoder().encode


def durable_uid(seq: int) -> str:
    """The UUID-shaped `uid` of durable event `seq` (the same in every process)."""
    h = f"{seq:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def iso_time(wall: float) -> str:
    """RFC 3339 UTC with milliseconds, as Pelion writes times."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class Session:
    """A consumer attached to a channel (a WebSocket); `close_code` set means: stop."""

    __slots__ = ("close_code",)

    def __init__(self) -> None:
        self.close_code: int | None = None


class Channel:
    """One application's notification channel and its bounded event buffer."""

    __slots__ = (
        "_ready",
        "_transform",
        "app",
        "capacity",
        "closed",
        "delivered",
        "dropped",
        "events",
        "extra",
        "forget",
        "idle_since",
        "mechanism",
        "polling",
        "serialization",
        "session",
        "spill_due",
        "unspilled",
    )

    def __init__(
        self,
        app: str,
        mechanism: str,
        serialization: Serialization,
        capacity: int,
        transform: Callable[[str, Item, int | None], Item] | None,
    ) -> None:
        self.app = app
        self.mechanism = mechanism
        self.serialization = serialization
        self.capacity = capacity
        self.events: deque[Event] = deque()
        self.dropped = 0
        self.delivered = 0
        self.closed = False
        self.polling = False  # a long poll is pending
        self.idle_since: float | None = trio.current_time()  # no consumer since (None: one)
        self.session: Session | None = None  # the live WebSocket
        self.extra: object = None  # what a delivery mechanism keeps (a webhook's url)
        self.unspilled = 0  # events pushed since the last spill that have no `seq`
        self.forget: Callable[[str, list[int]], None] | None = None  # stored events dropped
        self.spill_due: Callable[[], None] | None = None  # events without a seq came back
        self._ready = trio.Event()
        self._transform = transform

    def __len__(self) -> int:
        return len(self.events)

    def push(self, event: Event) -> None:
        events = self.events
        if len(events) >= self.capacity:
            self._dropped([events.popleft()])
        transform = self._transform
        if transform is not None:
            event = (event[0], transform(event[0], event[1], event[3]), None, event[3])
        if event[3] is None:
            self.unspilled += 1
        events.append(event)
        self._ready.set()

    def _dropped(self, gone: list[Event]) -> None:
        self.dropped += len(gone)
        seqs = [event[3] for event in gone if event[3] is not None]
        if seqs and self.forget is not None:
            self.forget(self.app, seqs)

    def wake(self) -> None:
        self._ready.set()

    async def wait(self, session: Session | None = None) -> None:
        """Until there are events, the channel closes, or `session` is told to stop."""
        while not self.events and not self.closed and (session is None or not session.close_code):
            if self._ready.is_set():
                self._ready = trio.Event()
            await self._ready.wait()

    def take(self) -> tuple[bytes, list[Event]]:
        """The next `NotificationMessage` (JSON) and the events it holds, removed."""
        events = self.events
        n = min(len(events), self.serialization.max_chunk_size)
        batch = [events.popleft() for _ in range(n)]
        groups: dict[str, list[Item]] = {}
        for kind, item, _, _ in batch:
            group = groups.get(kind)
            if group is None:
                groups[kind] = [item]
            else:
                group.append(item)
        message = {kind: groups[kind] for kind in KINDS if kind in groups}
        self.delivered += n
        return _encode(message), batch

    def unread(self, batch: list[Event]) -> None:
        """Put back a message that was not delivered, at the head, in order."""
        events = self.events
        events.extendleft(reversed(batch))
        unstored = sum(event[3] is None for event in batch)
        if unstored:  # (a spill may have run while they were out)
            self.unspilled += unstored
            if self.spill_due is not None:
                self.spill_due()
        if len(events) > self.capacity:
            self._dropped([events.pop() for _ in range(len(events) - self.capacity)])
        self._ready.set()

    def attach(self, session: Session) -> Session | None:
        """Make `session` the live consumer; the previous one (returned) is told 1001."""
        previous = self.session
        if previous is not None:
            previous.close_code = 1001
        self.session = session
        self.idle_since = None
        self._ready.set()
        return previous

    def detach(self, session: Session) -> None:
        if self.session is session:
            self.session = None
            self.idle_since = trio.current_time()

    def poll(self, *, pending: bool) -> None:
        """A long poll started (`pending`) or ended."""
        self.polling = pending
        self.idle_since = None if pending else trio.current_time()

    def close(self, code: int = 1000) -> None:
        """The channel was deleted: its buffer is dropped and its consumer told `code`."""
        self.closed = True
        self.events.clear()
        if self.session is not None:
            self.session.close_code = code
        self._ready.set()


class NotificationHub:
    """The channels of every application, and the task that fills them.

    Args:
        events: the supervisor's event stream (the hub is its only reader).
        capacity: events kept per channel before the oldest are dropped.
        wall_clock: the wall clock for `include_timestamp` (injected for tests).
        idle_expiry: how long a channel of each mechanism lives without a consumer: a
            WebSocket channel 24 h without a socket, a long-poll channel 10 min without a
            poll (Pelion's limits); then it is deleted with its queue. Callbacks expire
            after 24 h of failures (`webhook.py`).
        orphan_limit: events kept for an application without a channel (its own events
            only: async responses, its subscriptions' notifications) ...
        orphan_ttl: ... for at most this many seconds; a channel opened meanwhile gets them.
            An SDK that starts its long poll and sends a request at once (Pelion's Python
            SDK does) thus never loses the response to that race.
    """

    def __init__(
        self,
        events: EventStream,
        *,
        capacity: int = 100_000,
        wall_clock: Callable[[], float] = time.time,
        orphan_limit: int = 1000,
        orphan_ttl: float = 60.0,
        on_delivered: Callable[[str, list[int]], None] | None = None,
        keep: Callable[[str, str, Item], int] | None = None,
        spill_interval: float = 1.0,
        idle_expiry: dict[str, float] | None = None,
        store: Store | None = None,
    ) -> None:
        self.events = events
        self.on_delivered = on_delivered
        self.keep = keep
        self.spill_interval = spill_interval
        self._spill_due = trio.Event()  # set when events arrived (no timer while idle)
        self.idle_expiry = IDLE_EXPIRY if idle_expiry is None else idle_expiry
        self.expired = 0  # channels deleted for want of a consumer
        self.store = store  # channels are kept there, so that they survive a restart
        self.capacity = capacity
        self.wall_clock = wall_clock
        self.orphan_limit = orphan_limit
        self.orphan_ttl = orphan_ttl
        self.channels: dict[str, Channel] = {}
        self.orphans: dict[str, deque[tuple[float, Event]]] = {}
        self.unrouted = 0  # events for applications without a channel, dropped
        self.nursery: trio.Nursery | None = None  # for delivery tasks (webhooks)
        self._uid_prefix = secrets.token_hex(10)
        self._uids = itertools.count(1)

    async def run(
        self,
        *,
        before: Callable[[], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read the event stream forever, fanning events out; hosts delivery tasks too.

        `before` runs once the hub can host delivery tasks and before it reads anything:
        channels restored there get the events a restart owes them (not the orphans' bound).
        """
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.keep is not None:
                nursery.start_soon(self._spill_every_interval)
            nursery.start_soon(self._expire_idle_channels)
            if before is not None:
                before()
            task_status.started()
            get = self.events.get
            channels = self.channels
            while True:
                batch = await get(10_000)
                self._spill_due.set()
                for event in batch:
                    owners = event[2]
                    if owners is None:
                        for channel in channels.values():
                            channel.push(event)
                        continue
                    for owner in owners:
                        found = channels.get(owner)
                        if found is None:
                            self._orphan(owner, event)
                        else:
                            found.push(event)

    async def _expire_idle_channels(self) -> None:
        """Delete, once a minute, the channels idle for longer than their `idle_expiry`."""
        expiry = self.idle_expiry
        while True:
            await trio.sleep(_EXPIRY_SWEEP)
            now = trio.current_time()
            for app, channel in list(self.channels.items()):
                limit = expiry.get(channel.mechanism)
                idle = channel.idle_since
                if limit is not None and idle is not None and now - idle >= limit:
                    log.info("%s channel of %s idle for %.0f s: deleted", channel.mechanism,
                             app, now - idle)  # fmt: skip
                    self.delete(app)
                    self.expired += 1

    def _wake_spill(self) -> None:
        self._spill_due.set()

    async def _spill_every_interval(self) -> None:
        while True:
            await self._spill_due.wait()
            await trio.sleep(self.spill_interval)
            self._spill_due = trio.Event()
            self.spill()

    def spill(self) -> None:
        """Store every event waiting in a channel that is not stored yet (with `keep`).

        Events that a connected client takes within the interval never touch the disk; those
        of an application that is away are kept within one interval, as the Pelion queue
        keeps them (24 h, a size cap: the store enforces both). A stored event gets its
        `seq`, and with `include_uid` its `uid` becomes the one it keeps across restarts.
        """
        keep = self.keep
        if keep is None:
            return
        for channel in self.channels.values():
            if not channel.unspilled:
                continue
            app = channel.app
            kept: deque[Event] = deque()
            for event in channel.events:
                if event[3] is None:
                    kind, item = event[0], event[1]
                    event = (kind, item, None, keep(app, kind, item))  # as it was (its uid)
                kept.append(event)
            channel.events = kept
            channel.unspilled = 0

    def _orphan(self, app: str, event: Event) -> None:
        """Keep an event of `app`, which has no channel, for a while (bounded)."""
        now = trio.current_time()
        kept = self.orphans.get(app)
        if kept is None:
            kept = self.orphans[app] = deque()
        kept.append((now, event))
        oldest = now - self.orphan_ttl
        while len(kept) > self.orphan_limit or kept[0][0] < oldest:
            kept.popleft()
            self.unrouted += 1

    def open(
        self, app: str, mechanism: str, serialization: Serialization = DEFAULT_SERIALIZATION
    ) -> Channel:
        """A new channel for `app` (replacing none: check `channels` first), holding the
        app's own events of the last `orphan_ttl` seconds."""
        channel = Channel(
            app, mechanism, serialization, self.capacity, self._transform_for(serialization)
        )
        channel.forget = self.on_delivered
        channel.spill_due = self._wake_spill
        self.channels[app] = channel
        self.persist(channel)
        kept = self.orphans.pop(app, None)
        if kept:
            oldest = trio.current_time() - self.orphan_ttl
            for at, event in kept:
                if at >= oldest:
                    channel.push(event)
                else:
                    self.unrouted += 1
            self._spill_due.set()
        return channel

    def delivered(self, channel: Channel, batch: list[Event]) -> None:
        """A delivery mechanism handed `batch` to its client: durable events may be forgotten."""
        if self.on_delivered is not None:
            seqs = [event[3] for event in batch if event[3] is not None]
            if seqs:
                self.on_delivered(channel.app, seqs)

    def reconfigure(self, channel: Channel, serialization: Serialization) -> None:
        """Serialize `channel`'s events arriving from now on with `serialization`."""
        channel.serialization = serialization
        channel._transform = self._transform_for(serialization)
        self.persist(channel)

    def persist(
        self, channel: Channel, url: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """Keep `channel` (a callback's `url` and `headers` too) in the store."""
        if self.store is not None:
            self.store.put_channel(
                ChannelRecord(
                    channel.app, channel.mechanism, self.wall_clock(), url, headers or {},
                    _encode(channel.serialization).decode(),
                )
            )  # fmt: skip

    def delete(self, app: str, code: int = 1000) -> Channel | None:
        channel = self.channels.pop(app, None)
        if channel is not None:
            channel.close(code)
            if self.store is not None:
                self.store.delete_channel(app)  # and the events it still owed
        return channel

    def _transform_for(
        self, serialization: Serialization
    ) -> Callable[[str, Item, int | None], Item] | None:
        """How this channel's serialization options rewrite each event's item (None: as is)."""
        cfg = serialization.cfg
        as_object = cfg.deregistrations_as_object
        uid, timestamp, original = cfg.include_uid, cfg.include_timestamp, cfg.include_original_ep
        if not (as_object or uid or timestamp) and original:
            return None
        uids, clock = self._uids, self.wall_clock
        p = self._uid_prefix
        prefix = f"{p[:8]}-{p[8:12]}-{p[12:16]}-{p[16:]}-"  # a UUID-shaped message id

        def transform(kind: str, item: Item, seq: int | None) -> Item:
            if isinstance(item, str):
                if kind not in _DEREGISTRATION_KINDS or not as_object:
                    return item
                out: dict[str, object] = {"ep": item}
                if original:
                    out["original-ep"] = item
            elif not uid and not timestamp and (original or kind not in _ENDPOINT_KINDS):
                return item  # shared by every channel: never modified
            else:
                out = dict(item)
                if not original:
                    out.pop("original-ep", None)
            # a stored event keeps its uid (and timestamp) across restarts: an event stored
            # after its transform has them already, an AsyncIDResponse's uid is made from seq
            if uid and "uid" not in out:
                out["uid"] = durable_uid(seq) if seq is not None else f"{prefix}{next(uids):012x}"
            if timestamp and "timestamp" not in out:
                out["timestamp"] = iso_time(clock())
            return out

        return transform
