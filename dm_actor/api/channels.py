"""Notification channels: one per application, fed by one hub task.

The hub is the only reader of the supervisor's `EventStream`. It fans every event out to the
channel of each application the event is for (all of them when `owners` is None), into a
bounded per-channel buffer: beyond `capacity` the oldest event is dropped and counted, so a
slow or absent client never blocks a device (nor another application: pushing never waits),
and the next message taken tells the client how many it lost (`events-lost`). Every
`spill_interval` the events still waiting in a channel are written to the store (`spill`): an
application that is away does not lose them to a restart; a delivery forgets them again. A
delivery mechanism (a WebSocket session, a long poll, a webhook task of `webhook.py`) waits on
its channel and takes `NotificationMessage`s from it: up to `max_chunk_size` events grouped by
kind, encoded once. A message that could not be delivered is put back with `unread`; one that
was handed over is forgotten with `NotificationHub.delivered`, at the hand-over point of its
mechanism (docs/delivery.md, "Hand-over to the application"). A long poll's response is held
(`NotificationHub.hold`) until the application polls again (`NotificationHub.settle`). This
module never does network I/O.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
import trio.lowlevel

from dm_actor.actors.events import KINDS, ChannelEvent
from dm_actor.api.auth import is_admin
from dm_actor.api.schemas import DEFAULT_SERIALIZATION, Serialization
from dm_actor.store.base import ChannelRecord

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable, Sequence

    from dm_actor.actors.events import EventStream, Item
    from dm_actor.store.base import Store

WEB_SOCKET = "WEB_SOCKET"
LONG_POLLING = "LONG_POLLING"
CALLBACK = "CALLBACK"

#: Pelion's channel lifetimes without a consumer (seconds); see `NotificationHub`
IDLE_EXPIRY = {WEB_SOCKET: 24 * 3600.0, LONG_POLLING: 600.0}
_EXPIRY_SWEEP = 60.0
_SPILL_SLICE = 500  # events stored in one step of the event loop (others run in between)
log = logging.getLogger(__name__)

_ASYNC = "async-responses"
_DEREGISTRATION_KINDS = frozenset(("de-registrations", "registrations-expired"))
_ENDPOINT_KINDS = frozenset(("registrations", "reg-updates"))
_encode = msgspec.json.Encoder().encode
#: the key of a `NotificationMessage` that counts the events dropped before it (our addition:
#: Pelion has no gap marker; docs/api.md, "Buffering")
EVENTS_LOST = "events-lost"


def durable_uid(seq: int) -> str:
    """The UUID-shaped `uid` of durable event `seq` (the same in every process)."""
    h = f"{seq:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def iso_time(wall: float) -> str:
    """RFC 3339 UTC with milliseconds, as Pelion writes times."""
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class Session:
    """A consumer attached to a channel (a WebSocket); `close_code` set means: stop.

    `scope` surrounds the consumer's sending: `abort` cancels it, so that a send blocked on a
    client that stopped reading ends at once (`stop` lets a send in progress finish). A
    session attached for `patience` seconds whose channel still has to drop events (its
    buffer is full) is too slow: it is stopped with 1001 and a reason saying so.
    """

    __slots__ = ("close_code", "patience", "reason", "scope", "since")

    def __init__(self, patience: float = math.inf) -> None:
        self.close_code: int | None = None
        self.reason: str | None = None
        self.scope = trio.CancelScope()
        self.patience = patience
        self.since = trio.current_time()

    def stop(self, code: int, reason: str | None = None) -> None:
        """End after the message being sent (the first code and reason given stay)."""
        if self.close_code is None:
            self.close_code, self.reason = code, reason

    def abort(self, code: int, reason: str | None = None) -> None:
        """End now: a message being sent is abandoned (and put back by the consumer)."""
        self.stop(code, reason)
        self.scope.cancel()


class Relay(Protocol):
    """Where the events of applications homed on other nodes go (`EventRelay`)."""

    def outgoing(self, batch: Sequence[ChannelEvent]) -> Sequence[ChannelEvent]:
        """Send on the events (or owners) homed elsewhere; returns those for this node."""
        ...

    def homed(self, channels: Iterable[Channel]) -> Sequence[Channel]:
        """Those of `channels` whose application is homed here."""
        ...

    def is_home(self, app: str) -> bool:
        """Whether `app` is homed here now."""
        ...


class Receipt(Protocol):
    """What a long poll's response leaves behind, to tell later whether it arrived."""

    def lost(self) -> bool:
        """True when the response is known not to have reached the client."""
        ...

    def check(self) -> bool:
        """Called every second while held: True once there is nothing more to watch."""
        ...

    def close(self) -> None: ...


class Channel:
    """One application's notification channel and its bounded event buffer."""

    __slots__ = (
        "_ready",
        "_told",
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
        "in_flight",
        "lost",
        "mechanism",
        "polling",
        "receipt",
        "serialization",
        "session",
        "spill_due",
        "unacked",
        "unspilled",
        "unstored",
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
        self.events: deque[ChannelEvent] = deque()
        self.dropped = 0  # events dropped at the bound, in all
        self.lost = 0  # ... of which the next message taken tells the client
        self._told = 0  # what the last message taken told (given back by `unread`)
        self.delivered = 0
        self.closed = False
        self.polling = False  # a long poll is pending
        self.idle_since: float | None = trio.current_time()  # no consumer since (None: one)
        self.session: Session | None = None  # the live WebSocket
        self.extra: object = None  # what a delivery mechanism keeps (a webhook's url)
        self.unspilled = 0  # events in `events` that have no `seq` (not stored yet)
        self.unacked: list[ChannelEvent] = []  # a long poll's response, until the next poll
        # the batch last taken, until delivered, put back or held: stored by the spill like
        # the events waiting (a slow receiver may hold it for many seconds)
        self.in_flight: list[ChannelEvent] = []
        self.receipt: Receipt | None = None  # ... and how to tell whether it arrived
        self.unstored: list[int] = []  # seqs of stored events dropped, to forget at the spill
        self.forget: Callable[[str, list[int]], None] | None = None  # stored events dropped
        self.spill_due: Callable[[], None] | None = None  # events without a seq came back
        self._ready = trio.Event()
        self._transform = transform

    def __len__(self) -> int:
        return len(self.events)

    def push(self, event: ChannelEvent) -> None:
        events = self.events
        if len(events) >= self.capacity:
            self._dropped(events.popleft())
            session = self.session
            if session is not None and session.close_code is None:
                self._too_slow(session)
        transform = self._transform
        if transform is not None:
            kind, seq = event.kind, event.seq
            event = ChannelEvent(kind, transform(kind, event.item, seq), None, seq)
        if event.seq is None:
            self.unspilled += 1
        events.append(event)
        self._ready.set()

    def _too_slow(self, session: Session) -> None:
        """The buffer is full with `session` attached: after its `patience` (time to drain a
        buffer that was full when it came), it is too slow."""
        if trio.current_time() - session.since >= session.patience:
            session.stop(1001, f"Too slow: {self.capacity} events waiting, the oldest dropped.")
            self._ready.set()

    def _dropped(self, event: ChannelEvent) -> None:
        """`event` fell off the bound: counted for the client; its stored copy (if any) is
        forgotten at the next spill, with the others (one store call, not one per event)."""
        self.dropped += 1
        self.lost += 1
        seq = event.seq
        if seq is None:
            self.unspilled -= 1
        elif self.forget is not None:
            self.unstored.append(seq)
            if self.spill_due is not None and len(self.unstored) == 1:
                self.spill_due()

    def wake(self) -> None:
        self._ready.set()

    async def wait(self, session: Session | None = None) -> None:
        """Until there are events, the channel closes, or `session` is told to stop."""
        while not self.events and not self.closed and (session is None or not session.close_code):
            if self._ready.is_set():
                self._ready = trio.Event()
            await self._ready.wait()

    def take(self) -> tuple[bytes, list[ChannelEvent]]:
        """The next `NotificationMessage` (JSON) and the events it holds, removed.

        When events were dropped since the previous message, it says how many first:
        `{"events-lost": N, ...}`.
        """
        events = self.events
        n = min(len(events), self.serialization.max_chunk_size)
        batch = [events.popleft() for _ in range(n)]
        groups: dict[str, list[Item]] = {}
        unstored = 0
        for kind, item, _, seq in batch:
            group = groups.get(kind)
            if group is None:
                groups[kind] = [item]
            else:
                group.append(item)
            if seq is None:
                unstored += 1
        self.unspilled -= unstored
        message: dict[str, object] = {}
        self._told = lost = self.lost
        if lost:
            message[EVENTS_LOST] = lost
            self.lost = 0
        for kind in KINDS:
            if kind in groups:
                message[kind] = groups[kind]
        self.delivered += n
        self.in_flight = batch  # (the same list: a spill stores its events in place)
        return _encode(message), batch

    def unread(self, batch: list[ChannelEvent]) -> None:
        """Put back the last message taken, not delivered: at the head, in order (and the
        count of lost events it told is told again)."""
        if batch is self.in_flight:
            self.in_flight = []
        events = self.events
        events.extendleft(reversed(batch))
        self.delivered -= len(batch)
        self.lost += self._told
        self._told = 0
        unstored = sum(event.seq is None for event in batch)
        if unstored:  # (a spill may have run while they were out)
            self.unspilled += unstored
            if self.spill_due is not None:
                self.spill_due()
        while len(events) > self.capacity:
            self._dropped(events.pop())
        self._ready.set()

    def attach(self, session: Session) -> Session | None:
        """Make `session` the live consumer; the previous one (returned) is told 1001."""
        previous = self.session
        if previous is not None:
            previous.stop(1001, "Another socket took over the channel.")
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
        """The channel was deleted: its buffer (and a long poll's response waiting for its
        acknowledgement) is dropped and its consumer told `code`."""
        self.closed = True
        self.events.clear()
        self.unspilled = 0
        self.unacked = []
        self.in_flight = []
        if self.receipt is not None:
            self.receipt.close()
            self.receipt = None
        if self.session is not None:
            self.session.stop(code)
        self._ready.set()


@dataclass(frozen=True, slots=True, kw_only=True)
class HubStatistics:
    """What `NotificationHub.statistics()` returns (a frozen snapshot)."""

    channels: int  # open channels
    waiting: int  # events in the channels' buffers, not taken yet
    dropped: int  # events the channels' bounds dropped, in all (open channels)
    delivered: int  # events taken by the open channels' consumers, in all
    orphans: int  # events kept for applications without a channel
    owed: int  # AsyncIDResponses owed to applications without a channel
    unrouted: int  # events for applications without a channel, dropped
    expired: int  # channels deleted for want of a consumer


class NotificationHub:
    """The channels of every application, and the task that fills them.

    Args:
        events: the supervisor's event stream (the hub is its only reader).
        capacity: events kept per channel before the oldest are dropped.
        wall_clock: the wall clock for `include_timestamp` and the channels kept in the store:
            the server's one injected clock (`HttpServer` passes the supervisor's), never
            the hub's own `time.time()`.
        idle_expiry: how long a channel of each mechanism lives without a consumer: a
            WebSocket channel 24 h without a socket, a long-poll channel 10 min without a
            poll (Pelion's limits); then it is deleted with its queue. Callbacks expire
            after 24 h of failures (`webhook.py`).
        orphan_limit: events kept for an application without a channel (its own events
            only: async responses, its subscriptions' notifications) ...
        orphan_ttl: ... for at most this many seconds; a channel opened meanwhile gets them.
            An SDK that starts its long poll and sends a request at once (Pelion's Python
            SDK does) thus never loses the response to that race.

    An application's AsyncIDResponses (each stands for a 202) are not orphans: when it has no
    channel (deleted, expired, none after a restart) they are *owed* (`owed`: stored, at most
    `capacity` per application, the oldest dropped beyond) and its next channel of any type
    gets them first. Its other events go with a deleted channel, as in Pelion.
    """

    def __init__(
        self,
        events: EventStream,
        *,
        capacity: int = 100_000,
        wall_clock: Callable[[], float],
        orphan_limit: int = 1000,
        orphan_ttl: float = 60.0,
        on_delivered: Callable[[str, list[int]], None] | None = None,
        on_handed: Callable[[str, list[int]], None] | None = None,
        on_acknowledged: Callable[[str, list[int]], None] | None = None,
        keep: Callable[[str, str, Item], int] | None = None,
        spill_interval: float = 1.0,
        idle_expiry: dict[str, float] | None = None,
        store: Store | None = None,
    ) -> None:
        self.events = events
        self.on_delivered = on_delivered
        # a long poll's response was written (`hold`), then acknowledged by the next poll
        # (`settle`; instead of `on_delivered`): rule 1.7, a repeat of an AsyncIDResponse
        # in between gets it again
        self.on_handed = on_handed
        self.on_acknowledged = on_acknowledged
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
        self.orphans: dict[str, deque[tuple[float, ChannelEvent]]] = {}
        self.owed: dict[str, deque[ChannelEvent]] = {}  # AsyncIDResponses of apps without a channel
        self._owed_lost: dict[str, int] = {}  # ... dropped at the bound, for the next channel
        self.unrouted = 0  # events for applications without a channel, dropped
        self.nursery: trio.Nursery | None = None  # for delivery tasks (webhooks)
        self._held: set[Channel] = set()  # long-poll channels whose receipt is watched
        self._holding = trio.Event()  # set when `_held` gets one
        self._uid_prefix = secrets.token_hex(10)
        self._uids = itertools.count(1)
        # administrators (`console.py`): every batch read, before the fan-out (a tap that
        # only appends to bounded buffers), and the events an administrator owns (it has no
        # channel: they are handed over there, not kept for one)
        self.tap: Callable[[Sequence[ChannelEvent]], None] | None = None
        self.admin_sink: Callable[[str, ChannelEvent], None] | None = None
        # cluster mode (`dm_actor.api.relay`): the events of applications homed on another
        # node are relayed there; None on a single node
        self.relay: Relay | None = None

    def statistics(self) -> HubStatistics:
        """The hub's counters now (a walk over the channels: for monitoring, not per event)."""
        channels = self.channels.values()
        return HubStatistics(
            channels=len(self.channels),
            waiting=sum(len(c) for c in channels),
            dropped=sum(c.dropped for c in channels),
            delivered=sum(c.delivered for c in channels),
            orphans=sum(len(kept) for kept in self.orphans.values()),
            owed=sum(len(owed) for owed in self.owed.values()),
            unrouted=self.unrouted,
            expired=self.expired,
        )

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
        try:
            await self._run(nursery_started=task_status, before=before)
        finally:  # a long poll's receipt holds a socket: released with the hub
            for channel in self.channels.values():
                if channel.receipt is not None:
                    channel.receipt.close()
                    channel.receipt = None

    async def _run(
        self, *, nursery_started: trio.TaskStatus[None], before: Callable[[], None] | None
    ) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if self.keep is not None or self.on_delivered is not None:
                nursery.start_soon(self._spill_every_interval)
            nursery.start_soon(self._expire_idle_channels)
            nursery.start_soon(self._check_receipts)
            if before is not None:
                before()
            nursery_started.started()
            get = self.events.get
            channels = self.channels
            while True:
                batch = await get(10_000)
                self._spill_due.set()
                if self.tap is not None:
                    self.tap(batch)
                relay = self.relay
                if relay is None:
                    self._fan_out(batch, channels.values())
                else:  # cluster mode: the events of applications homed elsewhere go there
                    self._fan_out(relay.outgoing(batch), relay.homed(channels.values()))

    def accept(self, batch: Sequence[ChannelEvent]) -> None:
        """Events another node relayed here (`dm_actor.api.relay`), for applications homed
        here: fanned out as if published locally (events for all applications: to the
        channels of the applications homed here only). Never relayed again."""
        if not batch:
            return
        self._spill_due.set()
        relay = self.relay
        channels = self.channels
        self._fan_out(batch, channels.values() if relay is None else relay.homed(channels.values()))

    def _fan_out(self, batch: Sequence[ChannelEvent], everyone: Collection[Channel]) -> None:
        """Each event into the channel of each application it is for; an event for all of
        them into each channel of `everyone`."""
        channels = self.channels
        for event in batch:
            owners = event.owners
            if owners is None:
                for channel in everyone:
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

    async def _check_receipts(self) -> None:
        """Every second while long-poll responses are held, let their receipts check their
        connections (only then: an idle hub does not wake)."""
        held = self._held
        while True:
            await self._holding.wait()
            while held:
                await trio.sleep(1.0)
                for channel in list(held):
                    receipt = channel.receipt
                    if receipt is None or receipt.check():
                        held.discard(channel)
            self._holding = trio.Event()

    def _wake_spill(self) -> None:
        self._spill_due.set()

    async def _spill_every_interval(self) -> None:
        while True:
            await self._spill_due.wait()
            await trio.sleep(self.spill_interval)
            self._spill_due = trio.Event()
            while True:
                if not self.spill(_SPILL_SLICE):
                    break
                await trio.lowlevel.checkpoint()  # other tasks run between slices

    def spill(self, budget: int | None = None) -> bool:
        """Store every event waiting in a channel (or held in a long poll's response, or taken
        by a delivery not completed yet) that is not stored yet (with `keep`); forget the
        stored ones the bound dropped.

        Events that a connected client takes within the interval never touch the disk; those
        of an application that is away are kept within one interval, as the Pelion queue
        keeps them (24 h, a size cap: the store enforces both). A stored event gets its
        `seq`, and with `include_uid` its `uid` becomes the one it keeps across restarts.
        The events not stored yet are the newest (or ones put back at the head): only those
        ends of a buffer are visited, so a full buffer (100,000 events) costs no more than
        what arrived since the last spill. With a `budget`, at most that many are stored
        (the oldest first); returns True when some are left for another call.
        """
        keep = self.keep
        left = math.inf if budget is None else budget
        for channel in self.channels.values():
            app = channel.app
            if channel.unstored:
                seqs, channel.unstored = channel.unstored, []
                if channel.forget is not None:
                    channel.forget(app, seqs)
            if keep is None or left <= 0:
                continue
            unacked = channel.unacked  # (older than every event waiting: stored first)
            if unacked and any(event.seq is None for event in unacked):
                channel.unacked = [_stored(event, app, keep) for event in unacked]
                left -= len(unacked)
            in_flight = channel.in_flight  # (taken by a delivery not completed yet)
            if in_flight and any(event.seq is None for event in in_flight):
                in_flight[:] = [_stored(event, app, keep) for event in in_flight]
                left -= len(in_flight)
            if channel.unspilled > 0:
                stored = _store_newest(channel.events, channel.unspilled, app, keep, left)
                channel.unspilled -= stored
                left -= stored
        return left <= 0 and any(c.unspilled > 0 for c in self.channels.values())

    def hold(self, channel: Channel, batch: list[ChannelEvent], receipt: Receipt | None) -> None:
        """A long poll answered with `batch`: keep it (stored at the next spill like the
        events waiting) until the application polls again (`settle`) or deletes the channel.
        Pelion's pull has no acknowledgement: the next poll is one."""
        self.settle(channel)  # (never two: a poll settles the previous one first)
        if batch is channel.in_flight:
            channel.in_flight = []
        if channel.closed:  # deleted while the response was written: nothing to keep
            if receipt is not None:
                receipt.close()
            return
        channel.unacked, channel.receipt = batch, receipt
        if self.on_handed is not None:  # (written: a repeat of its request gets it again)
            seqs = [event.seq for event in batch if event.seq is not None]
            if seqs:
                self.on_handed(channel.app, seqs)
        if receipt is not None:
            self._held.add(channel)
            self._holding.set()
        if self.keep is not None and any(event.seq is None for event in batch):
            self._spill_due.set()

    def settle(self, channel: Channel) -> int:
        """The application polls again: the response held is acknowledged and forgotten,
        unless it is known not to have arrived (its connection was reset or its bytes never
        acknowledged by the client's TCP): then it is put back, to be sent again. Returns
        the number of events put back."""
        batch, receipt = channel.unacked, channel.receipt
        channel.unacked, channel.receipt = [], None
        lost = False
        if receipt is not None:
            lost = receipt.lost()
            receipt.close()
        if not batch:
            return 0
        if lost:
            channel.unread(batch)
            return len(batch)
        if self.on_acknowledged is None:
            self.delivered(channel, batch)
        else:  # (it keeps what was sent again meanwhile with the same seq: rule 1.7)
            seqs = [event.seq for event in batch if event.seq is not None]
            if seqs:
                self.on_acknowledged(channel.app, seqs)
        return 0

    def _orphan(self, app: str, event: ChannelEvent) -> None:
        """Keep an event of `app`, which has no channel, for a while (bounded); an
        AsyncIDResponse until its next channel (`owed`). An administrator's go to
        `admin_sink` (`_to_admin`)."""
        if is_admin(app):
            self._to_admin(app, event)
            return
        if event.kind == _ASYNC and event.seq is not None:  # (stored: every one a command ends)
            self._owe(app, event)
            return
        now = trio.current_time()
        kept = self.orphans.get(app)
        if kept is None:
            kept = self.orphans[app] = deque()
        kept.append((now, event))
        oldest = now - self.orphan_ttl
        while len(kept) > self.orphan_limit or kept[0][0] < oldest:
            kept.popleft()
            self.unrouted += 1

    def _to_admin(self, app: str, event: ChannelEvent) -> None:
        """An event an administrator owns (its device request's AsyncIDResponse, its
        subscription's notification): handed to `admin_sink`, and handed over (a stored
        copy is forgotten): an administrator never opens a channel to take it."""
        if self.admin_sink is not None:
            self.admin_sink(app, event)
        if event.seq is not None and self.on_delivered is not None:
            self.on_delivered(app, [event.seq])

    def _owe(self, app: str, event: ChannelEvent) -> None:
        """Keep `app`'s AsyncIDResponse until it has a channel again (at most `capacity`:
        beyond, the oldest is dropped, its stored copy forgotten, and the next channel's
        first message counts it in `events-lost`)."""
        owed = self.owed.get(app)
        if owed is None:
            owed = self.owed[app] = deque()
        owed.append(event)
        if len(owed) > self.capacity:
            seq = owed.popleft().seq
            self._owed_lost[app] = self._owed_lost.get(app, 0) + 1
            if seq is not None and self.on_delivered is not None:
                self.on_delivered(app, [seq])

    def restore(self, events: Sequence[ChannelEvent]) -> None:
        """The events a restart owes (each with one owner and its `seq`), into their owners'
        channels (call once the stored channels are open, before the hub reads the stream):
        a channel's bound drops the oldest and announces it (`events-lost`), as always. An
        application without a channel is owed its AsyncIDResponses; its other events went
        with its channel: their stored copies are forgotten. In cluster mode, only the
        events of applications homed here are restored: the others' home loads them
        (`EventRelay.adopt`)."""
        gone: dict[str, list[int]] = {}
        relay = self.relay
        for event in events:
            assert event.owners is not None and len(event.owners) == 1
            [app] = event.owners
            if relay is not None and not relay.is_home(app):
                continue
            channel = self.channels.get(app)
            if channel is not None:
                channel.push(event)
            elif is_admin(app):
                self._to_admin(app, event)
            elif event.kind == _ASYNC:
                self._owe(app, event)
            else:
                self.unrouted += 1
                if event.seq is not None:
                    gone.setdefault(app, []).append(event.seq)
        if self.on_delivered is not None:
            for app, seqs in gone.items():
                self.on_delivered(app, seqs)
        self._spill_due.set()  # (seqs of events the bounds dropped are forgotten there)

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
        owed = self.owed.pop(app, None)  # (older than the orphans)
        if owed:
            for event in owed:
                channel.push(event)
        channel.lost += self._owed_lost.pop(app, 0)
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

    def delivered(self, channel: Channel, batch: list[ChannelEvent]) -> None:
        """A delivery mechanism handed `batch` to its client: durable events may be forgotten."""
        if batch is channel.in_flight:
            channel.in_flight = []
        if self.on_delivered is not None:
            seqs = [event.seq for event in batch if event.seq is not None]
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
        """Delete `app`'s channel with its events, but its AsyncIDResponses not handed over
        yet (waiting, or taken by a delivery not completed): they are owed to its next
        channel. A long poll's response held is acknowledged by the deletion, unless it is
        known not to have arrived (then it is owed too, as a poll would send it again)."""
        channel = self.channels.pop(app, None)
        if channel is not None:
            self.settle(channel)
            owed = [e for e in (*channel.in_flight, *channel.events) if e.kind == _ASYNC]
            lost, unstored = channel.lost, channel.unstored
            channel.unstored = []
            channel.close(code)
            if unstored and self.on_delivered is not None:
                self.on_delivered(app, unstored)  # (dropped by the bound before)
            if self.store is not None:
                self.store.delete_channel(app)  # and the events it owed, but AsyncIDResponses
            for event in owed:
                self._owe(app, event)
            if owed and lost:
                self._owed_lost[app] = self._owed_lost.get(app, 0) + lost
        return channel

    def release(self, app: str) -> Channel | None:
        """`app` is homed on another node now (cluster mode, a planned handover): its
        channel here is closed with 1001 (its client reconnects, and reaches the new home),
        but kept in the store with every event it still owes: the events waiting, taken by
        a delivery not completed or held in a long poll's response are stored now (`keep`)
        and the new home loads them (`EventRelay.adopt`). What is owed or kept in memory for
        an application without a channel here is dropped: the AsyncIDResponses are stored,
        the orphans are not (counted in `unrouted`)."""
        self.owed.pop(app, None)
        self._owed_lost.pop(app, None)
        kept = self.orphans.pop(app, None)
        if kept:
            self.unrouted += len(kept)
        channel = self.channels.pop(app, None)
        if channel is None:
            return None
        self._held.discard(channel)
        keep = self.keep
        waiting = [*channel.unacked, *channel.in_flight, *channel.events]
        if keep is not None:
            for event in waiting:
                _stored(event, app, keep)
        else:
            self.unrouted += sum(event.seq is None for event in waiting)
        unstored, channel.unstored = channel.unstored, []
        if unstored and self.on_delivered is not None:
            self.on_delivered(app, unstored)  # (dropped by the bound before)
        channel.close(1001)
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


def _stored(event: ChannelEvent, app: str, keep: Callable[[str, str, Item], int]) -> ChannelEvent:
    """`event` with a `seq` (stored now if it had none), its item as it was (its uid)."""
    if event.seq is not None:
        return event
    kind, item = event.kind, event.item
    return ChannelEvent(kind, item, None, keep(app, kind, item))


def _store_newest(
    events: deque[ChannelEvent],
    count: int,
    app: str,
    keep: Callable[[str, str, Item], int],
    budget: float = math.inf,
) -> int:
    """Store the `count` events of `events` that have no `seq` (at most `budget` of them,
    the oldest first), visiting from the newest end (where pushed events are) and reaching
    further only for events put back at the head. Returns how many were stored."""
    newest: list[ChannelEvent] = []
    while count and events:
        event = events.pop()
        if event.seq is None:
            count -= 1
        newest.append(event)
    newest.reverse()  # stored oldest first: `seq` orders them after a restart
    stored = 0
    for i, event in enumerate(newest):
        if event.seq is None:
            if stored >= budget:
                break
            newest[i] = _stored(event, app, keep)
            stored += 1
    events.extend(newest)
    return stored
