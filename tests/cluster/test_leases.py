"""LeaseBook against a simulated lease table that follows the coordinator's rules
(`dm_actor.store.coordinator`): several books renew, take and hand over, with delays, pauses,
partitions from the database, crashes and graceful leaves; after every step no slot is held
by two books within their deadlines, a valid holder's epoch is the table's, and no deadline
falls after the database-side expiry; after a quiet period the live nodes are balanced."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dm_actor.cluster.leases import Lease, LeaseBook, NodeInfo, Plan, Table

TTL = 3.0
NAMES = ("a", "b", "c", "d")


class SimDB:
    """The coordinator's rules on one clock (`t`, seconds)."""

    def __init__(self, slots: int) -> None:
        self.t = 0.0
        self.rows: list[tuple[str | None, int, float]] = [
            (None, 0, 0.0)
        ] * slots  # node, epoch, expires
        self.heartbeat: dict[str, float] = {}

    def live(self, node: str) -> bool:
        beat = self.heartbeat.get(node)
        return beat is not None and self.t - beat < TTL

    def renew(self, me: str) -> tuple[dict[int, int], Table]:
        self.heartbeat[me] = self.t
        held = {}
        for s, (node, epoch, _) in enumerate(self.rows):
            if node == me:
                self.rows[s] = (node, epoch, self.t + TTL)
                held[s] = epoch
        return held, self.table()

    def table(self) -> Table:
        leases = tuple(Lease(s, n, e, x - self.t) for s, (n, e, x) in enumerate(self.rows))
        nodes = tuple(
            NodeInfo(n, i, "", "", self.t - beat)
            for i, (n, beat) in enumerate(sorted(self.heartbeat.items()))
        )
        return Table(leases, nodes)

    def take(self, me: str, slots: tuple[int, ...]) -> dict[int, int]:
        got = {}
        for s in slots:
            node, epoch, expires = self.rows[s]
            if node is None or (expires < self.t and (node == me or not self.live(node))):
                self.rows[s] = (me, epoch + 1, self.t + TTL)
                got[s] = epoch + 1
        return got

    def handover(self, me: str, slots: tuple[int, ...], to: str) -> list[int]:
        done: list[int] = []
        if not self.live(to):
            return done
        for s in slots:
            node, epoch, expires = self.rows[s]
            if node == me and expires > self.t:
                self.rows[s] = (to, epoch + 1, self.t + TTL)
                done.append(s)
        return done

    def leave(self, me: str) -> None:
        for s, (node, epoch, _) in enumerate(self.rows):
            if node == me:
                self.rows[s] = (node, epoch, self.t - 1)
        self.heartbeat.pop(me, None)


class Cluster(RuleBasedStateMachine):
    @initialize(slots=st.sampled_from([1, 5, 16, 37]), count=st.integers(1, 4))
    def start(self, slots: int, count: int) -> None:
        self.slots = slots
        self.db = SimDB(slots)
        self.books = {n: LeaseBook(n, slots, TTL) for n in NAMES[:count]}
        self.alive = set(self.books)  # not crashed, not left
        self.cut: set[str] = set()  # partitioned from the database
        self.tables: dict[str, Table] = {}  # the table of each node's last renewal

    def round(self, name: str, delay: float, take_delay: float = 0.0) -> Plan | None:
        """One round of `name`'s lease loop; the database executes each call `delay`
        seconds after it was sent."""
        if name not in self.alive or name in self.cut:
            return None
        book = self.books[name]
        sent = self.db.t
        self.db.t += delay
        held, table = self.db.renew(name)
        book.renewed(held, sent)
        plan = book.plan(table)
        self.db.t += take_delay  # (the take is sent later, and executed at once)
        book.taken(self.db.take(name, plan.take), self.db.t)
        for to, slots in plan.give.items():
            book.given(self.db.handover(name, slots, to))
        return plan

    @rule(name=st.sampled_from(NAMES), delay=st.floats(0, TTL / 10), later=st.floats(0, 1))
    def a_round(self, name: str, delay: float, later: float) -> None:
        if name in self.books:
            self.round(name, delay, later)

    @rule(name=st.sampled_from(NAMES), delay=st.floats(0, TTL / 10))
    def renew_only(self, name: str, delay: float) -> None:
        if name in self.books and name in self.alive and name not in self.cut:
            sent = self.db.t
            self.db.t += delay
            held, self.tables[name] = self.db.renew(name)
            self.books[name].renewed(held, sent)

    @rule(name=st.sampled_from(NAMES))
    def act_on_an_old_table(self, name: str) -> None:
        """Take and hand over by the plan of a table read some steps ago."""
        table = self.tables.get(name)
        if table is None or name not in self.alive or name in self.cut:
            return
        book = self.books[name]
        plan = book.plan(table)
        book.taken(self.db.take(name, plan.take), self.db.t)
        for to, slots in plan.give.items():
            book.given(self.db.handover(name, slots, to))

    @rule(dt=st.floats(0, TTL * 2))
    def time_passes(self, dt: float) -> None:
        self.db.t += dt

    @rule(name=st.sampled_from(NAMES))
    def cut_off(self, name: str) -> None:
        self.cut.add(name)

    @rule(name=st.sampled_from(NAMES))
    def reconnect(self, name: str) -> None:
        self.cut.discard(name)

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        if len(self.alive) > 1:
            self.alive.discard(name)

    @rule(name=st.sampled_from(NAMES))
    def leave(self, name: str) -> None:
        if name in self.alive and name not in self.cut and len(self.alive) > 1:
            self.db.leave(name)
            self.books[name].given(list(self.books[name].held))
            self.alive.discard(name)

    @invariant()
    def one_valid_holder_with_the_tables_epoch(self) -> None:
        now = self.db.t
        for s in range(self.slots):
            holders = [b for b in self.books.values() if s in b.held and b.valid(now)]
            assert len(holders) <= 1, (s, [b.node for b in holders])
            if holders:
                node, epoch, expires = self.db.rows[s]
                assert (node, epoch) == (holders[0].node, holders[0].held[s])
                assert expires > now

    @invariant()
    def deadlines_before_the_database_expiry(self) -> None:
        for b in self.books.values():
            for s, e in b.held.items():
                node, epoch, expires = self.db.rows[s]
                if (node, epoch) == (b.node, e):
                    assert b.deadline <= expires - b.margin + 1e-9

    @rule()
    def settle(self) -> None:
        """Every survivor reconnects; after a TTL, rounds every TTL/4 balance them."""
        self.cut.clear()
        self.db.t += TTL * 1.5
        live = sorted(self.alive)
        for _ in range(40):
            for name in live:
                self.round(name, 0.0)
            self.db.t += TTL / 4
        for name in live:
            self.round(name, 0.0)
        floor = self.slots // len(live)
        ceil = math.ceil(self.slots / len(live))
        now = self.db.t
        held = [s for n in live for s in self.books[n].held]
        assert sorted(held) == list(range(self.slots))
        for name in live:
            assert self.books[name].valid(now)
            assert floor <= len(self.books[name].held) <= ceil, (name, live)
        # and a settled cluster plans nothing
        for name in live:
            assert self.books[name].plan(self.db.table()) == Plan()


TestCluster = Cluster.TestCase
TestCluster.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_deadline_and_change() -> None:
    book = LeaseBook("a", 8, 10.0)
    assert not book.valid(0.0)
    change = book.renewed({1: 3, 2: 1}, sent_at=100.0)
    assert change.gained == {1, 2} and change.lost == set()
    assert book.deadline == pytest.approx(108.0) and book.valid(107.9) and not book.valid(108.0)
    change = book.renewed({1: 4, 3: 1}, sent_at=103.0)  # 1 changed hands meanwhile
    assert change.gained == {1, 3} and change.lost == {1, 2}
    assert book.taken({5: 2}, sent_at=104.0) == {5}
    assert book.deadline == pytest.approx(111.0)  # (the renewal's, earlier)
    book.given([5, 3])
    assert book.held == {1: 4}


def test_a_joining_node_receives_its_share_progressively() -> None:
    db = SimDB(64)
    a, b = LeaseBook("a", 64, TTL), LeaseBook("b", 64, TTL)
    held, table = db.renew("a")
    a.renewed(held, 0.0)
    a.taken(db.take("a", a.plan(table).take), 0.0)
    assert len(a.held) == 64

    held, table = db.renew("b")
    b.renewed(held, 0.0)
    assert b.plan(table) == Plan()  # nothing to take
    held, table = db.renew("a")
    a.renewed(held, 0.0)
    plan = a.plan(table)
    assert list(plan.give) == ["b"] and len(plan.give["b"]) == 8  # a quarter of 32 per round
