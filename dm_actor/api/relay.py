"""Cluster mode: each application's events reach the node that hosts its channel.

An application's notification channel lives on the owner of its home slot
(`dm_actor.cluster.slots.home_slot`); its events are produced on the node that owns the
device. `EventRelay` sits in the hub's dispatch (`NotificationHub.relay`): an event for an
application homed on another node is queued for that node and sent there in batches
(`POST /internal/events`, through `send`, the internal HTTP client); an event for every
application (a registration, an update, a de-registration, an expiry) goes to every other
live node as well as to the channels here. The home node decodes a batch (`receive`) and
fans it out in its hub as if it had been published there: it numbers, spills, delivers and
forgets (`store.delete_events`) exactly as a single node does, and a durable event (an
AsyncIDResponse, stored with its `seq` in the commit that ended its command) keeps its `seq`
and so its `uid`.

Bounds and failures:
- a queue per destination, `limit` events: beyond it the oldest event that is not durable is
  dropped (counted); only a queue of durable events drops a durable one (counted apart:
  it stays in the store, and the next node to adopt its application loads it);
- a destination that does not answer (or answers 5xx) is retried with exponential back-off;
  the batch keeps its place and order; a 4xx (the peer refused the batch) is not retried;
- an event whose home moved while it waited is routed again at each attempt (to this
  node's hub, another node, or held while the home slot has no owner);
- a durable event seen here already (relayed twice after an unanswered attempt, or loaded
  by `adopt` and relayed too) is dropped: a bounded memory of the `(owner, seq)` seen.

A node that gains home slots loads the durable events owed to the applications homed there
(`adopt`); a node that hands them over closes their channels here (`release`).
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

import msgspec
import trio

from dm_actor.actors.events import ChannelEvent, Kind
from dm_actor.api.channels import CALLBACK, LONG_POLLING, WEB_SOCKET
from dm_actor.api.schemas import Serialization
from dm_actor.api.webhook import parse_target
from dm_actor.cluster.slots import home_slot

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence

    from dm_actor.api.channels import Channel, NotificationHub
    from dm_actor.api.webhook import Webhooks
    from dm_actor.cluster.view import ClusterView
    from dm_actor.store.base import ChannelRecord, EventRecord

log = logging.getLogger(__name__)

#: the largest batch body `receive` decodes (bytes)
MAX_BODY = 16 * 1024 * 1024
#: the most events a batch may carry
MAX_EVENTS = 10_000
#: an event arriving at a node that is not its home is routed on at most this many times
MAX_HOPS = 2
_OK = frozenset((200, 202, 204))
_UNOWNED_RETRY = 0.5  # the longest wait before looking again for the owner of a home slot

_Seq = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Name = Annotated[str, msgspec.Meta(max_length=1024)]


class WireEvent(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A `ChannelEvent` on the wire (JSON: the items are JSON already, see `put_event`)."""

    kind: Kind
    item: dict[str, Any] | str
    owners: Annotated[list[_Name], msgspec.Meta(max_length=100_000)] | None
    seq: _Seq | None
    #: the sender's number of the event (increasing per destination; 0: none): a batch
    #: sent again after an attempt whose answer was lost is recognised
    number: _Seq = 0
    hops: Annotated[int, msgspec.Meta(ge=0, le=MAX_HOPS)] = 0


class WireBatch(msgspec.Struct, forbid_unknown_fields=True):
    """One `POST /internal/events` body."""

    node: _Name
    #: the sender's run (a random string per process): its numbers start again at 1
    epoch: _Name
    events: Annotated[list[WireEvent], msgspec.Meta(max_length=MAX_EVENTS)]


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(WireBatch).decode


@dataclass(slots=True, kw_only=True)
class RelayStatistics:
    """What `EventRelay.statistics()` returns (a snapshot)."""

    sent: int  # events a peer accepted
    batches: int  # batches a peer accepted
    failures: int  # attempts that failed (peer down, timeout, 5xx): retried
    refused: int  # events of batches a peer refused (4xx): dropped
    dropped: int  # events not durable dropped at a queue's bound
    durable_dropped: int  # durable events dropped at a queue's bound (stored: adopt loads them)
    received: int  # events accepted from peers
    duplicates: int  # durable events received or loaded twice, dropped
    bad_batches: int  # bodies refused (400, 413)
    misrouted: int  # events for an application not homed here, beyond `MAX_HOPS`
    waiting: int  # events queued for other nodes now
    loaded: int  # durable events `adopt` loaded


class _Outbox:
    """The events queued for one destination (a node; None: homes nobody owns now), in order.

    Durable and other events are kept in two deques with one numbering, so that the oldest
    event that is not durable is dropped in O(1) and a batch is taken in order."""

    __slots__ = ("backoff", "durable", "light", "node", "number", "ready", "started")

    def __init__(self, node: str | None) -> None:
        self.node = node
        self.durable: deque[tuple[int, ChannelEvent, int]] = deque()  # (number, event, hops)
        self.light: deque[tuple[int, ChannelEvent, int]] = deque()
        self.number = 0
        self.ready = trio.Event()
        self.backoff = 0.0
        self.started = False  # its sender task runs

    def __len__(self) -> int:
        return len(self.durable) + len(self.light)

    def push(self, event: ChannelEvent, hops: int) -> None:
        self.number += 1
        entry = (self.number, event, hops)
        (self.light if event.seq is None else self.durable).append(entry)
        self.ready.set()

    def take(self, limit: int) -> list[tuple[int, ChannelEvent, int]]:
        """Up to `limit` events, oldest first."""
        durable, light = self.durable, self.light
        out: list[tuple[int, ChannelEvent, int]] = []
        while len(out) < limit and (durable or light):
            if not light or (durable and durable[0][0] < light[0][0]):
                out.append(durable.popleft())
            else:
                out.append(light.popleft())
        return out

    def unread(self, entries: Sequence[tuple[int, ChannelEvent, int]]) -> None:
        """Put back what `take` returned (older than everything queued), in order."""
        self.durable.extendleft(reversed([e for e in entries if e[1].seq is not None]))
        self.light.extendleft(reversed([e for e in entries if e[1].seq is None]))


class EventRelay:
    """Routes the hub's events by their applications' home nodes (see the module).

    Args:
        view: the cluster as this node sees it (which node owns each home slot).
        hub: this node's hub (`hub.relay` is set to this relay).
        send: `await send(node, body)` posts a batch to `node`'s `/internal/events` and
            returns the HTTP status; an exception counts as a failure (retried).
        load_events: `await load_events(owners)`: the stored events of those applications
            (`store.load_events` in a worker thread), for `adopt`.
        load_channels: `await load_channels()`: the stored channels (of every application);
            `adopt` reopens those homed in the slots it adopts before their events are
            restored (None: none is reopened, and `adopt` forgets what they are owed).
        apps: the applications known (the API keys'): `adopt` and `release` given slots
            look for the applications homed there among them, the stored channels', and
            those whose events this node has routed.
        webhooks: the server's callback senders (`api.webhooks`): `adopt` restarts the
            callback channels of the applications it adopts with them (None: it does not).
        reopen: reopens one stored channel, instead of the default (WebSocket and long-poll
            channels into the hub, callbacks with `webhooks`).
        limit: events queued per destination (beyond, the oldest not durable is dropped).
        batch_size, batch_delay: a batch leaves when it has `batch_size` events or the
            first of them waited `batch_delay` seconds.
        backoff, max_backoff: the first and the longest wait before retrying a destination.
        max_body: the largest batch body sent (bytes): the peers' `[api] max_body` (a peer
            that answers 413 teaches a lower one; a single event beyond it is dropped).
        remember: how many durable events `(owner, seq)` are remembered, to drop repeats.
    """

    def __init__(
        self,
        view: ClusterView,
        hub: NotificationHub,
        send: Callable[[str, bytes], Awaitable[int]],
        *,
        load_events: Callable[[frozenset[str]], Awaitable[Sequence[EventRecord]]] | None = None,
        load_channels: Callable[[], Awaitable[Sequence[ChannelRecord]]] | None = None,
        apps: Callable[[], Iterable[str]] | None = None,
        webhooks: Webhooks | None = None,
        reopen: Callable[[ChannelRecord], None] | None = None,
        limit: int = 100_000,
        batch_size: int = 256,
        batch_delay: float = 0.01,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_body: int = 1 << 20,
        remember: int = 100_000,
    ) -> None:
        self.view = view
        self.hub = hub
        hub.relay = self
        self.send = send
        self.load_events = load_events
        self.load_channels = load_channels
        self.apps = apps
        self.webhooks = webhooks
        self.reopen = reopen if reopen is not None else self._reopen
        self.limit = limit
        self.batch_size = min(batch_size, MAX_EVENTS)
        self.batch_delay = batch_delay
        self.first_backoff = backoff
        self.max_backoff = max_backoff
        self.max_body = max_body
        self.remember = remember
        self._boxes: dict[str | None, _Outbox] = {}
        self._homes: dict[str, int] = {}  # application -> home slot (a cache)
        # durable events waiting here, not handed over yet (dropped when seen again)
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._epoch = secrets.token_hex(8)
        self._highest: dict[tuple[str, str], int] = {}  # (sender, epoch) -> number received
        # a durable event handed over (or dropped) here is no longer waiting: a repeat of
        # its request sends it again (rule 1.7), and that is no duplicate
        delivered, handed = hub.on_delivered, hub.on_handed
        hub.on_delivered = self._wrap(delivered)
        hub.on_handed = self._wrap(handed)
        for channel in hub.channels.values():
            channel.forget = hub.on_delivered
        self._nursery: trio.Nursery | None = None
        self._down: set[str | None] = set()  # destinations failing now (logged once)
        self._counts = dict.fromkeys(
            ("sent", "batches", "failures", "refused", "dropped", "durable_dropped", "received",
             "duplicates", "bad_batches", "misrouted", "loaded"), 0,
        )  # fmt: skip

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(**self._counts, waiting=sum(map(len, self._boxes.values())))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the senders (one task per destination) until cancelled. Optional: without
        it they run in the hub's nursery (`NotificationHub.run`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for box in self._boxes.values():  # (events queued before the start)
                if not box.started:
                    nursery.start_soon(self._drain, box)
                    box.started = True
            task_status.started()
            await trio.sleep_forever()

    # -- routing ------------------------------------------------------------------------

    def home(self, app: str) -> str | None:
        """The node `app`'s channel lives on now; None while its home slot has no owner,
        or is this node's but not served (being handed over, or past the lease's local
        deadline): its events wait, and follow the slot."""
        homes = self._homes
        slot = homes.get(app)
        view = self.view
        if slot is None:
            if len(homes) >= 65_536:
                homes.clear()
            slot = homes[app] = home_slot(app, view.slot_count)
        owner = view.owner(slot)
        if owner == view.node and not view.mine(slot):
            return None
        return owner

    def homed(self, channels: Iterable[Channel]) -> Sequence[Channel]:
        node = self.view.node
        return [c for c in channels if self.home(c.app) == node]

    def is_home(self, app: str) -> bool:
        return self.home(app) == self.view.node

    def outgoing(self, batch: Sequence[ChannelEvent]) -> Sequence[ChannelEvent]:
        """The hub's dispatch: queue the events (or the owners of an event) homed on other
        nodes, an event for all applications for every other live node too; return what
        this node's channels get."""
        node = self.view.node
        local: list[ChannelEvent] = []
        others: list[str] | None = None
        for event in batch:
            owners = event.owners
            if owners is None:
                if others is None:
                    others = [n for n in self.view.live_nodes() if n != node]
                for other in others:
                    self._queue(other, event, 0)
                local.append(event)
                continue
            kept = self._split(event, owners, 0)
            if kept is not None:
                local.append(kept)
        return local

    def _split(self, event: ChannelEvent, owners: frozenset[str], hops: int) -> ChannelEvent | None:
        """Queue `event` for the homes of its owners that are not here; return it (for the
        owners homed here) or None (no owner is)."""
        node = self.view.node
        if len(owners) == 1:  # (the common case: no set built)
            for owner in owners:
                where = self.home(owner)
                if where != node:
                    self._queue(where, event, hops)
                elif self._saw(owner, event.seq):  # (loaded by `adopt` meanwhile)
                    self._counts["duplicates"] += 1
                else:
                    return event
            return None
        by_node: dict[str | None, set[str]] = {}
        for owner in owners:
            by_node.setdefault(self.home(owner), set()).add(owner)
        mine = by_node.pop(node, None)
        for where, apps in by_node.items():
            self._queue(where, event._replace(owners=frozenset(apps)), hops)
        if mine is None:
            return None
        return event if len(mine) == len(owners) else event._replace(owners=frozenset(mine))

    def _queue(self, node: str | None, event: ChannelEvent, hops: int) -> None:
        box = self._boxes.get(node)
        if box is None:
            box = self._boxes[node] = _Outbox(node)
        if not box.started:
            nursery = self._nursery or self.hub.nursery  # (`run`, or the hub's)
            if nursery is not None:
                nursery.start_soon(self._drain, box)
                box.started = True
        box.push(event, hops)
        if len(box) > self.limit:
            if box.light:
                box.light.popleft()
                self._counts["dropped"] += 1
            else:
                box.durable.popleft()
                self._counts["durable_dropped"] += 1

    def _wrap(
        self, then: Callable[[str, list[int]], None] | None
    ) -> Callable[[str, list[int]], None]:
        seen = self._seen

        def handed(owner: str, seqs: list[int]) -> None:
            for seq in seqs:
                seen.pop((owner, seq), None)
            if then is not None:
                then(owner, seqs)

        return handed

    def _saw(self, owner: str, seq: int | None) -> bool:
        """Remember durable event `seq` of `owner` as delivered here; True if it was."""
        if seq is None:
            return False
        seen = self._seen
        key = (owner, seq)
        if key in seen:
            return True
        seen[key] = None
        if len(seen) > self.remember:
            seen.popitem(last=False)
        return False

    # -- sending ------------------------------------------------------------------------

    async def _drain(self, box: _Outbox) -> None:
        """Send `box`'s events to its node, a batch at a time, in order; retried with
        back-off while the node fails (a box of homes nobody owns only re-routes)."""
        while True:
            while not len(box):
                box.ready = trio.Event()
                await box.ready.wait()
            if len(box) < self.batch_size:
                await trio.sleep(self.batch_delay)  # (more may come: one batch for them)
            while len(box):
                entries = self._reroute(box, box.take(self.batch_size))
                if not entries:
                    continue
                if box.node is None or not await self._post(box.node, entries):
                    box.unread(entries)
                    # (homes nobody owns: looked at again soon, a failover is under way)
                    longest = self.max_backoff if box.node is not None else _UNOWNED_RETRY
                    box.backoff = min(
                        longest, box.backoff * 2 if box.backoff else self.first_backoff
                    )
                    await trio.sleep(box.backoff)
                else:
                    box.backoff = 0.0

    def _reroute(
        self, box: _Outbox, entries: list[tuple[int, ChannelEvent, int]]
    ) -> list[tuple[int, ChannelEvent, int]]:
        """Those of `entries` still for `box`'s node; the others routed again (the home of
        their application moved, or their node left)."""
        target = box.node
        live: Collection[str] | None = None
        kept: list[tuple[int, ChannelEvent, int]] = []
        here: list[ChannelEvent] = []
        for entry in entries:
            _, event, hops = entry
            owners = event.owners
            if owners is None:  # for every node that was live: dropped if it left
                if live is None:
                    live = set(self.view.live_nodes())
                if target in live:
                    kept.append(entry)
                continue
            if all(self.home(owner) == target for owner in owners):
                kept.append(entry)
                continue
            mine = self._split(event, owners, hops)  # (re-queued behind, for their homes)
            if mine is not None:
                here.append(mine)
        if here:
            self.hub.accept(here)
        return kept

    async def _post(self, node: str, entries: list[tuple[int, ChannelEvent, int]]) -> bool:
        """Send one batch; True when it is done with (accepted, or refused: not retried)."""
        events = [
            WireEvent(e.kind, e.item, None if e.owners is None else sorted(e.owners), e.seq, n, h)
            for n, e, h in entries
        ]
        body = _encode(WireBatch(self.view.node, self._epoch, events))
        if len(body) > self.max_body and len(entries) > 1:  # in two halves, each in turn
            half = len(entries) // 2
            return await self._post(node, entries[:half]) and await self._post(node, entries[half:])
        try:
            status = await self.send(node, body)
        except Exception as exc:  # (a peer down: never ends the node)
            status, reason = None, repr(exc)
        else:
            reason = f"status {status}"
        if status == 413 and len(entries) > 1:  # (the peer's bound is lower: learnt)
            self.max_body = max(1024, min(self.max_body, len(body) // 2))
            half = len(entries) // 2
            return await self._post(node, entries[:half]) and await self._post(node, entries[half:])
        if status in _OK:
            self._counts["sent"] += len(entries)
            self._counts["batches"] += 1
            if node in self._down:
                self._down.discard(node)
                log.info("relaying events to node %s again", node)
            return True
        if status is not None and 400 <= status < 500:
            self._counts["refused"] += len(entries)
            log.warning("node %s refused %d events (%s): dropped", node, len(entries), reason)
            return True
        self._counts["failures"] += 1
        if node not in self._down:
            self._down.add(node)
            log.warning("relaying events to node %s failed (%s): retrying", node, reason)
        return False

    # -- receiving ----------------------------------------------------------------------

    async def receive(self, body: bytes) -> int:
        """A batch another node relayed (the body of `POST /internal/events`, authenticated
        by the caller): its events into this hub, for the applications homed here (an
        event for another node's application is routed on, at most `MAX_HOPS` times).
        Returns the HTTP status: 204, or 400 / 413 for a body that is not a batch."""
        await trio.lowlevel.checkpoint()
        if len(body) > MAX_BODY:
            return self._refuse(413, f"{len(body)} bytes")
        try:
            batch = _decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            return self._refuse(400, str(exc)[:200])
        for wire in batch.events:
            if wire.owners is None and wire.seq is not None:
                return self._refuse(400, "a durable event for every application")
        local: list[ChannelEvent] = []
        node = self.view.node
        counts = self._counts
        run = (batch.node, batch.epoch)
        highest = first = self._highest.get(run, 0)
        for wire in batch.events:
            kind = wire.kind
            number = wire.number
            if number:
                if number <= first:  # (sent again: the answer to its attempt was lost)
                    counts["duplicates"] += 1
                    continue
                highest = max(highest, number)
            if wire.owners is None:
                local.append(ChannelEvent(kind, wire.item, None, None))
                continue
            owners: set[str] = set()
            hops = wire.hops + 1
            for owner in wire.owners:
                where = self.home(owner)
                if where != node and hops > MAX_HOPS:
                    counts["misrouted"] += 1
                elif where == node and self._saw(owner, wire.seq):
                    counts["duplicates"] += 1
                elif where == node:
                    owners.add(owner)
                else:
                    self._queue(where, ChannelEvent(kind, wire.item, frozenset((owner,)),
                                                    wire.seq), hops)  # fmt: skip
            if owners:
                local.append(ChannelEvent(kind, wire.item, frozenset(owners), wire.seq))
        if highest > first:
            if run not in self._highest and len(self._highest) >= 4096:
                self._highest.clear()
            self._highest[run] = highest
        counts["received"] += len(local)
        self.hub.accept(local)
        return 204

    def _refuse(self, status: int, why: str) -> int:
        self._counts["bad_batches"] += 1
        if self._counts["bad_batches"] == 1 or self._counts["bad_batches"] % 1000 == 0:
            log.warning("relayed events refused (%d, %d in all): %s", status,
                        self._counts["bad_batches"], why)  # fmt: skip
        return status

    # -- home slots gained and lost -----------------------------------------------------

    async def adopt(self, homes: Iterable[int] | Iterable[str]) -> None:
        """This node became the home of the applications of `homes` (home slots, or
        application names): a failover or a handover. Their stored channels are reopened
        (`load_channels`), and the stored events owed to them loaded (`load_events`) into
        the hub, as a restart restores them (`NotificationHub.restore`), but for those
        this node has already (relayed here meanwhile, not handed over yet)."""
        slots, apps = _split_homes(homes)
        hub = self.hub
        records: Sequence[ChannelRecord] = ()
        if self.load_channels is not None and (slots or apps):
            records = await self.load_channels()
        count = self.view.slot_count
        if slots:
            known = {r.owner for r in records}.union(self._known())
            apps |= {app for app in known if home_slot(app, count) in slots}
        if not apps:
            return
        for record in records:
            if record.owner in apps and record.owner not in hub.channels:
                try:
                    self.reopen(record)
                except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                    log.warning("stored channel of %s not reopened: %s", record.owner, exc)
        if self.load_events is None:
            return
        stored_events = await self.load_events(frozenset(apps))
        events: list[ChannelEvent] = []
        for stored in sorted(stored_events, key=lambda r: r.seq):
            if stored.owner not in apps or self._saw(stored.owner, stored.seq):
                continue
            try:
                item = msgspec.json.decode(stored.item)
            except msgspec.DecodeError:
                log.warning("stored event %d of %s unreadable", stored.seq, stored.owner)
                continue
            kind = cast("Kind", stored.kind)
            events.append(ChannelEvent(kind, item, frozenset((stored.owner,)), stored.seq))
        self._counts["loaded"] += len(events)
        hub.restore(events)

    def release(self, homes: Iterable[int] | Iterable[str]) -> None:
        """The applications of `homes` (home slots, or application names) are homed on
        another node now: their channels here are closed (their clients reconnect, and
        reach the new home through the proxy), the events they still owe stored for the
        new home to load (`NotificationHub.release`; commit them before the handover:
        `store.durable()`)."""
        slots, apps = _split_homes(homes)
        hub = self.hub
        if slots:
            count = self.view.slot_count
            here = {*hub.channels, *hub.owed, *hub.orphans}
            apps |= {app for app in here if home_slot(app, count) in slots}
        for app in apps:
            hub.release(app)
        seen = self._seen
        for key in [key for key in seen if key[0] in apps]:
            del seen[key]  # (given back later, they are loaded again)

    def _known(self) -> set[str]:
        """Applications this node knows of: the API keys', and those it routed events for."""
        known = set(self._homes)
        if self.apps is not None:
            known.update(self.apps())
        hub = self.hub
        known.update(hub.channels, hub.owed, hub.orphans)
        return known

    def _reopen(self, record: ChannelRecord) -> None:
        """As a restart reopens a stored channel (`HttpServer._restore_channels`)."""
        serialization = msgspec.json.decode(record.serialization or "{}", type=Serialization)
        if record.mechanism == CALLBACK and record.url is not None:
            if self.webhooks is not None:
                target = parse_target(record.url, record.headers)
                self.webhooks.start(record.owner, target, serialization)
        elif record.mechanism in (WEB_SOCKET, LONG_POLLING):
            self.hub.open(record.owner, record.mechanism, serialization)


def _split_homes(homes: Iterable[int] | Iterable[str]) -> tuple[frozenset[int], set[str]]:
    """Home slots and application names, apart."""
    slots: set[int] = set()
    apps: set[str] = set()
    for home in homes:
        if isinstance(home, int):
            slots.add(home)
        else:
            apps.add(home)
    return frozenset(slots), apps


#: the path of the internal route a batch is posted to
EVENTS_PATH = b"/internal/events"


def http_sender(
    view: ClusterView,
    request: Callable[..., Awaitable[tuple[int, Any, Any]]],
    sign: Callable[[bytes, bytes, bytes], list[tuple[bytes, bytes]]],
    *,
    timeout: float = 10.0,
) -> Callable[[str, bytes], Awaitable[int]]:
    """An `EventRelay.send` over the internal HTTP client: `request` and `sign` are the
    `ClusterRouter`'s (`router.pool.request`, `router.sign`, dm_actor/api/proxy.py)."""

    async def send(node: str, body: bytes) -> int:
        address = view.http_address(node)
        if address is None:
            raise LookupError(f"node {node} has no known HTTP address")
        headers = [*sign(b"POST", EVENTS_PATH, body), (b"content-type", b"application/json")]
        status, _, _ = await request(address, b"POST", EVENTS_PATH, headers, body, timeout)
        return status

    return send
