"""Slot leases as one node sees them: what it holds (slot -> fencing epoch), until when it may
act on them, and what it should take or hand over next (`LeaseBook`).

The database (`dm_actor.store.coordinator`) is the authority: a lease names a node, an epoch
(bumped whenever the slot changes hands) and an expiry on the database's clock. This module is
pure (no I/O, no clock): `now` and `sent_at` are monotonic seconds the caller passes in.

Local deadline: a renewal sent at `sent_at` (monotonic) extends the leases on the database to
at least `sent_at + ttl` (the database stamps it later, with its own clock), so the node treats
them as its own until `sent_at + ttl - margin`: it stops sending and committing before anyone
may take them. Fencing (the epoch checked in every commit batch) covers what the deadline
cannot: a node paused past it.

Plan (one round of the lease loop): with L live nodes (heartbeat younger than the TTL, this
one included) the target is ceil(P / L) slots each. A node below it takes free slots and
expired slots whose node is not live; a node above it (once nothing is left to take) hands
its surplus to live nodes below floor(P / L), a bounded number per round, so a node that
joins receives its share progressively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

#: At most this many slots are handed over by one node in one round.
MAX_GIVE = 64


@dataclass(frozen=True, slots=True)
class Lease:
    """One slot's lease row: its node (None: never owned or released), its epoch, and the
    seconds until it expires on the database's clock (negative: expired)."""

    slot: int
    node: str | None
    epoch: int
    expires_in: float


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node's row: its name, number (0..1023, unique), HTTP and link addresses
    (`host:port`), and the seconds since its last heartbeat (database clock)."""

    node: str
    number: int
    http: str
    link: str
    age: float
    coap: str = ""  # the CoAP address its devices talk to (`[server] host:coap_port`)


@dataclass(frozen=True, slots=True)
class Table:
    """The lease table and the node table as read in one transaction; `leases[s].slot == s`."""

    leases: tuple[Lease, ...]
    nodes: tuple[NodeInfo, ...]

    def live(self, ttl: float) -> list[str]:
        """The nodes whose heartbeat is younger than `ttl`, sorted."""
        return sorted(n.node for n in self.nodes if n.age < ttl)

    def counts(self) -> dict[str, int]:
        """How many slots each node's name is on (expired or not)."""
        counts: dict[str, int] = {}
        for lease in self.leases:
            if lease.node is not None:
                counts[lease.node] = counts.get(lease.node, 0) + 1
        return counts


@dataclass(frozen=True, slots=True)
class Change:
    """What a renewal changed: slots now held that were not (or with another epoch), and
    slots held before that are not any more (or with another epoch: someone else owned them
    meanwhile). A slot can be in both."""

    gained: frozenset[int]
    lost: frozenset[int]


@dataclass(frozen=True, slots=True)
class Plan:
    """One round's moves: slots to take (`Coordinator.take`), and slots to hand over to each
    node (`Coordinator.handover`)."""

    take: tuple[int, ...] = ()
    give: dict[str, tuple[int, ...]] = field(default_factory=dict)


class LeaseBook:
    """This node's leases.

    Args:
        node: this node's name.
        slot_count: P, the number of slots.
        ttl: the lease TTL in seconds (the coordinator's).
        margin: seconds before `sent_at + ttl` where the local deadline falls (ttl / 5 by
            default): covers the drift of the two clocks over one TTL and the time to stop.
        max_give: at most this many slots handed over per round (also at most a quarter of
            the balanced share, at least one).
    """

    def __init__(
        self,
        node: str,
        slot_count: int,
        ttl: float,
        *,
        margin: float | None = None,
        max_give: int = MAX_GIVE,
    ) -> None:
        if slot_count < 1 or ttl <= 0:
            raise ValueError("slot_count and ttl must be positive")
        self.node = node
        self.slot_count = slot_count
        self.ttl = ttl
        self.margin = ttl / 5 if margin is None else margin
        if not 0 <= self.margin < ttl:
            raise ValueError("margin must be in [0, ttl)")
        self.max_give = max(1, max_give)
        #: slot -> epoch: what this node may commit for (the fencing epochs)
        self.held: dict[int, int] = {}
        #: monotonic time before which this node may send and commit for `held`
        self.deadline = -math.inf

    def renewed(self, held: dict[int, int], sent_at: float) -> Change:
        """A renewal sent at `sent_at` succeeded and the database says this node holds
        `held` (every lease naming it, now extended)."""
        old = self.held
        gained = frozenset(s for s, e in held.items() if old.get(s) != e)
        lost = frozenset(s for s, e in old.items() if held.get(s) != e)
        self.held = dict(held)
        self.deadline = sent_at + self.ttl - self.margin
        return Change(gained, lost)

    def taken(self, taken: dict[int, int], sent_at: float) -> frozenset[int]:
        """A take sent at `sent_at` gave this node `taken` (slot -> new epoch); returns
        the slots gained. Their leases run at least as long as the others' (the deadline
        only moves on for a book that held nothing)."""
        if not taken:
            return frozenset()
        limit = sent_at + self.ttl - self.margin
        self.deadline = limit if not self.held else min(self.deadline, limit)
        self.held.update(taken)
        return frozenset(taken)

    def given(self, slots: Iterable[int]) -> None:
        """`slots` were handed over (or are not to be used any more)."""
        for slot in slots:
            self.held.pop(slot, None)

    def valid(self, now: float) -> bool:
        """Whether this node may still send and commit for what it holds."""
        return now < self.deadline

    def targets(self, table: Table) -> dict[str, int]:
        """How many slots each live node (this one included) should hold: floor(P / L),
        one more for the first P mod L of them by name."""
        live = set(table.live(self.ttl))
        live.add(self.node)
        floor, extra = divmod(self.slot_count, len(live))
        return {node: floor + (i < extra) for i, node in enumerate(sorted(live))}

    def plan(self, table: Table) -> Plan:
        """The moves of one round, from the table of the last renewal."""
        count = self.slot_count
        targets = self.targets(table)
        counts = table.counts()
        mine = counts.get(self.node, 0)
        order = list(targets)
        # each node starts its search at its own part of the ring, so that nodes taking
        # at the same time mostly ask for different slots
        start = order.index(self.node) * count // len(order)
        own: list[int] = []
        free: list[int] = []
        dead: list[int] = []
        for i in range(count):
            slot = (start + i) % count
            if slot >= len(table.leases):
                free.append(slot)  # (no row yet)
                continue
            lease = table.leases[slot]
            if lease.node is None:
                free.append(slot)
            elif lease.node == self.node:
                if lease.expires_in < 0 and slot not in self.held:
                    own.append(slot)
            elif lease.expires_in < 0 and lease.node not in targets:
                dead.append(slot)
        if own or free or dead:
            # (own expired ones are counted in `mine` already)
            want = max(0, targets[self.node] - mine + len(own))
            return Plan(take=tuple((own + free + dead)[:want]))
        return Plan(give=self._give(table, targets, counts))

    def _give(
        self, table: Table, targets: dict[str, int], counts: dict[str, int]
    ) -> dict[str, tuple[int, ...]]:
        """Nothing is left to take: surplus goes to the nodes below their targets. Every
        node computes the same matching (givers and receivers in name order) from the same
        table and carries out its own part, at most `budget` slots per round."""
        surplus = {n: counts.get(n, 0) - t for n, t in targets.items()}
        if surplus[self.node] <= 0:
            return {}
        takers = [n for n, s in surplus.items() if s < 0]
        need = [-surplus[n] for n in takers]
        give: dict[str, int] = {}
        i = 0
        for giver, extra in surplus.items():
            while extra > 0 and i < len(takers):
                n = min(extra, need[i])
                if giver == self.node:
                    give[takers[i]] = give.get(takers[i], 0) + n
                extra -= n
                need[i] -= n
                if need[i] <= 0:
                    i += 1
        share = self.slot_count // len(targets)
        budget = min(self.max_give, max(1, share // 4))
        mine_slots = sorted(
            (s for s, lease in enumerate(table.leases) if lease.node == self.node),
            reverse=True,
        )
        moves: dict[str, tuple[int, ...]] = {}
        for other, wanted in give.items():
            n = min(wanted, budget)
            if n <= 0:
                break
            moves[other] = tuple(mine_slots[:n])
            del mine_slots[:n]
            budget -= n
        return moves
