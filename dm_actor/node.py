"""Cluster mode's composition (issue 17): this dm-actor node among others on one PostgreSQL
database.

`ClusterNode` is what the rest of the server reads about the cluster (`ClusterView`: who owns
a slot, where a node is reached) and what the device layer asks it (`ClusterHooks`: the slot
in a registration id and in a token, and the way out of a datagram). It runs the lease loop:
every `lease_ttl / 3` seconds (at most every second) it renews this node's leases through the
`Coordinator` (in a worker thread), then takes free slots and slots of dead nodes, and hands
surplus slots to nodes below their share (a node that joins), as the pure `LeaseBook` plans.

- A slot gained (taken, or handed to this node) is adopted: its devices are loaded from the
  store (`PostgresStore.load_slots`) and served at once (`Supervisor.adopt`), and the events
  owed to the applications homed in it are loaded (`EventRelay.adopt`).
- A slot given away is first closed here (nothing routed to it, its devices forgotten:
  `Supervisor.release`), then, once everything written for it is committed, handed over.
- A slot lost without being given away (another node took it while this one was paused or
  cut off) ends the process (`Fenced`): the in-memory state of a node that lost a lease
  cannot be trusted; its supervisor restarts it and it loads what it then owns. The store
  refuses the commits of a stale owner on its own (its fencing query).
- Past the local deadline (the send time of the last successful renewal + TTL - margin,
  always before the database's expiry) nothing is sent to a device (`egress`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from dm_actor.cluster import slots as cluster_slots
from dm_actor.cluster.leases import LeaseBook
from dm_actor.store.base import Snapshot
from dm_actor.store.postgres import Fenced

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.address import Address
    from dm_actor.api.relay import EventRelay
    from dm_actor.cluster.leases import Table
    from dm_actor.cluster.view import HostPort
    from dm_actor.store.base import AnswerRecord, CommandRecord
    from dm_actor.store.coordinator import Coordinator
    from dm_actor.store.postgres import PostgresStore
    from dm_actor.transport.link import ClusterLink

log = logging.getLogger(__name__)

#: the longest pause between two lease rounds (takeovers are looked for this often)
MAX_ROUND = 1.0
#: devices handed to the supervisor per scheduler pass while slots are loaded
ADOPT_CHUNK = 1000


def host_port(text: str) -> HostPort:
    """`"127.0.0.2:7683"` (or `"[::1]:7683"`) as a host and a port.

    Raises:
        ValueError: not host:port.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"not host:port: {text!r}")
    return host.strip("[]"), int(port)


class ClusterNode:
    """This node of the cluster: its view, its hooks and its lease loop."""

    def __init__(
        self, node: str, *, slot_count: int, secret: bytes, ttl: float, coordinator: Coordinator
    ) -> None:
        self.node = node
        self.number = 0  # this node's number in the cluster (`Coordinator.join`)
        self.slot_count = slot_count
        self.secret = secret
        self.ttl = ttl
        self.coordinator = coordinator
        self.book = LeaseBook(node, slot_count, ttl)  # (the store's fencing reads it too)
        self._store: PostgresStore | None = None
        self._supervisor: Supervisor | None = None
        self._readopt: set[int] = set()  # slots whose handover failed: load them again
        self.link: ClusterLink | None = None
        self.relay: EventRelay | None = None
        self._owners: list[str | None] = [None] * slot_count
        self._http: dict[str, HostPort] = {}
        self._links: dict[str, HostPort] = {}
        self._coap: dict[str, str] = {}
        self._live: list[str] = [node]
        self._leaving: set[int] = set()  # slots being handed over: served by nobody here
        self._loading: set[int] = set()  # slots held whose devices are not loaded yet
        # after this node could not reach the database, it takes no other node's slots for
        # one TTL: the others were cut off too and renew their own first (else the first
        # node back takes everyone's expired leases and the others stop, fenced)
        self._calm_until = -math.inf
        self._prefixes = [cluster_slots.token_prefix(s) for s in range(slot_count)]
        self.ready = trio.Event()  # set after the first round (leases held, devices loaded)
        self._left = False  # (`leave`: the loop stops)
        self._db_lock = trio.Lock()  # the coordinator's one connection: one caller at a time
        self._nursery: trio.Nursery | None = None
        self.statistics = {"held_back": 0, "slots_adopted": 0, "slots_given": 0, "rounds": 0,
                           "round_failures": 0}  # fmt: skip
        self._failing = False

    def attach(self, store: PostgresStore, supervisor: Supervisor) -> None:
        """The store this node commits to and the supervisor of its devices."""
        self._store = store
        self._supervisor = supervisor

    @property
    def store(self) -> PostgresStore:
        assert self._store is not None, "ClusterNode.attach() first"
        return self._store

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "ClusterNode.attach() first"
        return self._supervisor

    # -- ClusterView ------------------------------------------------------------------------

    def owner(self, slot: int) -> str | None:
        if slot in self.book.held:
            return None if slot in self._leaving or slot in self._loading else self.node
        return self._owners[slot] if 0 <= slot < self.slot_count else None

    def mine(self, slot: int) -> bool:
        return (
            slot in self.book.held
            and slot not in self._leaving
            and slot not in self._loading
            and self.book.valid(trio.current_time())
        )

    def http_address(self, node: str) -> HostPort | None:
        return self._http.get(node)

    def link_address(self, node: str) -> HostPort | None:
        return self._links.get(node)

    def live_nodes(self) -> Sequence[str]:
        return self._live

    def coap_address(self, node: str) -> str | None:
        return self._coap.get(node)

    # -- ClusterHooks -----------------------------------------------------------------------

    def slot(self, endpoint: str) -> int:
        return cluster_slots.slot_of(endpoint, self.slot_count)

    def token_prefix(self, endpoint: str) -> bytes:
        return self._prefixes[self.slot(endpoint)]

    def reg_id(self, endpoint: str) -> str:
        return cluster_slots.reg_id(self.slot(endpoint))

    def may_send(self) -> bool:
        """Whether this node may send to devices now: within its lease's local deadline."""
        return self.book.valid(trio.current_time())

    def egress(self, data: bytes, addr: Address) -> bool:
        if not self.book.valid(trio.current_time()):
            self.statistics["held_back"] += 1  # past the lease deadline: another node may
            return True  # serve these devices by now
        link = self.link
        return link is not None and link.egress(data, addr)

    def ingress_of(self, addr: Address) -> str | None:
        """The node whose address the device at `addr` talks to: another node it came in
        by, else this one. Stored with the registration, so that whoever owns the device
        next (a handover, a failover) sends through that node: from any other address the
        device would take a retransmission for a new exchange (executed twice)."""
        link = self.link
        return self.node if link is None else link.ingress.get(addr, self.node)

    def adopted(self, addr: Address, ingress: str) -> None:
        link = self.link
        if link is not None and ingress != self.node:
            link.remember_ingress(addr, ingress)

    # -- the lease loop ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold leases until cancelled (or `leave`); `started` once the first round is done
        and the devices of the slots it took are loaded. Slots are loaded in tasks of their
        own (`_load`), so that rounds go on renewing the leases meanwhile: loading 50,000
        devices takes seconds, and a round that waited for it renewed too late (another
        node took its slots: bench/cluster.py at 100k devices with a 2 s TTL)."""
        started = False
        pause = min(self.ttl / 3, MAX_ROUND)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while not self._left:
                started = await self._turn(started, pause, task_status)
                await trio.sleep(pause)
            nursery.cancel_scope.cancel()

    async def _turn(self, started: bool, pause: float, task_status: trio.TaskStatus[None]) -> bool:
        """One round, its failure logged once; whether the node has started."""
        try:
            async with self._db_lock:
                if self._left:
                    return started
                await self._round()
        except Fenced:
            raise
        except Exception as exc:  # (the database is away: the deadline closes the gate)
            self.statistics["round_failures"] += 1
            if not self._failing:
                log.error("cluster: a lease round failed: %s; retrying every %.1f s "
                          "(past the lease deadline nothing is sent to devices)",
                          exc, pause)  # fmt: skip
            self._failing = True
            return started
        if self._failing:
            log.warning("cluster: leases renewed again")
            self._calm_until = trio.current_time() + self.ttl
        self._failing = False
        if not started and not self._loading:
            started = True
            self.ready.set()
            task_status.started()
        return started

    async def _round(self) -> None:
        book, coordinator = self.book, self.coordinator
        self.statistics["rounds"] += 1
        sent_at = trio.current_time()
        held, table = await trio.to_thread.run_sync(coordinator.renew)
        change = book.renewed(held, sent_at)
        if change.lost:
            raise Fenced(
                f"cluster node {self.node}: slots {sorted(change.lost)[:16]} were taken by "
                f"another node while this one could not renew its leases (paused or cut off): "
                f"stopping; a restart loads what this node then owns"
            )
        self._read(table)
        gained = change.gained | (self._readopt & book.held.keys())
        self._readopt.clear()
        if gained:  # handed over to this node (or kept after a failed handover)
            await self._adopt(frozenset(gained))
        plan = book.plan(table)
        take = list(plan.take)
        if self._failing or trio.current_time() < self._calm_until:  # (free and our own only)
            leases = table.leases
            take = [s for s in take if s >= len(leases) or leases[s].node in (None, self.node)]
        if take:
            sent_at = trio.current_time()
            taken = await trio.to_thread.run_sync(coordinator.take, take)
            gained = book.taken(taken, sent_at)
            if gained:
                await self._adopt(gained)
        for to, offered in plan.give.items():
            ready = [s for s in offered if s not in self._loading]  # (handed on once loaded)
            if ready:
                await self._give(to, ready)

    def _read(self, table: Table) -> None:
        owners = self._owners
        for lease in table.leases:
            if 0 <= lease.slot < self.slot_count:
                owners[lease.slot] = lease.node if lease.expires_in > 0 else None
        live = []
        for info in table.nodes:
            try:
                self._http[info.node] = host_port(info.http)
                self._links[info.node] = host_port(info.link)
                self._coap[info.node] = info.coap
            except ValueError:
                continue
            if info.age < self.ttl:
                live.append(info.node)
        if self.node not in live:
            live.append(self.node)
        self._live = sorted(live)

    async def _adopt(self, slots: frozenset[int]) -> None:
        """Serve `slots` once their devices are loaded (`_load`, in a task of its own).
        Until then nobody serves them here (a request gets 503, a Register 5.03: never a
        404 for a device not loaded yet)."""
        slots = slots - self._loading  # (already being loaded)
        if not slots:
            return
        self._loading |= slots
        nursery = self._nursery
        assert nursery is not None, "ClusterNode.run() is not running"
        nursery.start_soon(self._load, slots)

    async def _load(self, slots: frozenset[int]) -> None:
        """Load `slots`' devices from the store and hand them to the supervisor, at most
        `ADOPT_CHUNK` devices per scheduler pass; then their applications' owed events."""
        try:
            snapshot = await trio.to_thread.run_sync(self.store.load_slots, sorted(slots))
        except Exception as exc:
            log.warning("cluster: loading %d slots failed (%s): again at the next round",
                        len(slots), exc)  # fmt: skip
            self._loading -= slots
            self._readopt |= slots
            return
        book = self.book
        for part in _chunks(snapshot, ADOPT_CHUNK):
            if not all(s in book.held for s in slots):
                return  # (lost meanwhile: the round that saw it stops the process)
            self.supervisor.adopt(part)
            await trio.lowlevel.checkpoint()
        self._loading -= slots
        self.statistics["slots_adopted"] += len(slots)
        if self.relay is not None:
            await self.relay.adopt(slots)
        log.info("cluster: serving %d more slots (%d devices loaded); %d slots held",
                 len(slots), len(snapshot.registrations), len(book.held))  # fmt: skip

    async def _give(self, to: str, slots: Sequence[int]) -> None:
        """A planned handover: close `slots` here, commit what was written for them, then
        move their leases to `to` (which loads them at its next round)."""
        chosen = frozenset(slots)
        self._leaving |= chosen
        try:
            count = self.slot_count
            released = self.supervisor.release(
                lambda ep: cluster_slots.slot_of(ep, count) in chosen
            )
            if self.relay is not None:
                self.relay.release(chosen)
            await self.store.durable()
            try:
                moved = await trio.to_thread.run_sync(self.coordinator.handover, list(slots), to)
            except Exception:
                self._readopt |= chosen  # (still ours: served again from the next round)
                raise
            self._readopt |= chosen - set(moved)
            self.book.given(moved)
            for slot in moved:  # (until the next table read)
                self._owners[slot] = to
            self.statistics["slots_given"] += len(moved)
            log.info("cluster: handed %d slots (%d devices) to %s", len(moved), released, to)
        finally:
            self._leaving -= chosen

    async def leave(self) -> None:
        """A graceful stop: this node's leases expire now, so that others take them at once.
        The lease loop stops first (after the round under way: one connection, one caller)."""
        with trio.move_on_after(2), trio.CancelScope(shield=True):
            async with self._db_lock:
                self._left = True
                try:
                    await trio.to_thread.run_sync(self.coordinator.leave)
                except Exception as exc:
                    log.warning("cluster: could not give up the leases on stopping: %s", exc)
        self.book.held.clear()
        self.book.deadline = -math.inf


def _chunks(snapshot: Snapshot, size: int) -> Iterator[Snapshot]:
    """`snapshot` (the devices of some slots) in parts of at most `size` devices, each with
    its devices' commands (in their order), subscriptions, Message IDs and answers."""
    regs = snapshot.registrations
    if len(regs) <= size:
        yield snapshot
        return
    commands: dict[str, list[CommandRecord]] = {}
    for c in snapshot.commands:
        commands.setdefault(c.endpoint, []).append(c)
    answers: dict[str, list[AnswerRecord]] = {}
    for a in snapshot.answers:
        answers.setdefault(a.endpoint, []).append(a)
    subscriptions, next_mids = snapshot.subscriptions, snapshot.next_mids
    for i in range(0, len(regs), size):
        part = regs[i : i + size]
        eps = [r.endpoint for r in part]
        yield Snapshot(
            registrations=part,
            commands=[c for ep in eps for c in commands.get(ep, ())],
            subscriptions={ep: subscriptions[ep] for ep in eps if ep in subscriptions},
            next_mids={ep: next_mids[ep] for ep in eps if ep in next_mids},
            answers=[a for ep in eps for a in answers.get(ep, ())],
        )
