"""The coordinator's lease rules on a real PostgreSQL (`tests/store/postgres.py`): several
Coordinators on one database, expiry on the database's clock (a real TTL of a fraction of a
second), takeover and handover bump the epoch, a stale node's renewal does not get a taken
slot back, and concurrent takes never give one slot to two nodes."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import psycopg
import pytest

from dm_actor.cluster.leases import LeaseBook
from dm_actor.store.base import StoreError
from dm_actor.store.coordinator import Coordinator
from tests.store.postgres import pg_dsn, pg_server

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["pg_dsn", "pg_server"]

P = 16
TTL = 0.6


@pytest.fixture
def nodes(pg_dsn: str) -> Iterator[dict[str, Coordinator]]:
    made = {
        name: Coordinator(pg_dsn, name, slots=P, ttl=TTL, http=f"{name}:80", link=f"{name}:7")
        for name in ("a", "b", "c")
    }
    yield made
    for c in made.values():
        c.close()


def test_join_creates_the_tables_numbers_nodes_and_refuses_another_slot_count(
    pg_dsn: str, nodes: dict[str, Coordinator]
) -> None:
    numbers = [c.join() for c in nodes.values()]
    assert sorted(numbers) == [0, 1, 2]
    assert nodes["a"].join() == numbers[0]  # a restart keeps the number
    held, table = nodes["a"].renew()
    assert held == {}
    assert [lease.slot for lease in table.leases] == list(range(P))
    assert {n.node for n in table.nodes} == {"a", "b", "c"}
    assert all(lease.node is None and lease.epoch == 0 for lease in table.leases)
    other = Coordinator(pg_dsn, "d", slots=P * 2, ttl=TTL, http="d:80", link="d:7")
    with pytest.raises(StoreError, match="the cluster has 16 slots"):
        other.join()
    other.close()


def test_take_renew_expiry_takeover_and_a_stale_renewal(nodes: dict[str, Coordinator]) -> None:
    a, b = nodes["a"], nodes["b"]
    a.join()
    b.join()
    assert a.take([0, 1, 2]) == {0: 1, 1: 1, 2: 1}
    assert b.take([2, 3]) == {3: 1}  # 2 is a's, unexpired
    held, table = a.renew()
    assert held == {0: 1, 1: 1, 2: 1}
    assert table.leases[3].node == "b" and table.leases[3].expires_in > 0
    time.sleep(TTL + 0.1)  # a's leases expire, but so does its heartbeat only now
    b.renew()
    # a's heartbeat is older than the TTL too: b may take its expired slots
    assert b.take([0, 1]) == {0: 2, 1: 2}
    held, table = a.renew()  # a, back: gets back what nobody took, with the same epoch
    assert held == {2: 1}
    assert table.leases[0].node == "b" and table.leases[0].epoch == 2


def test_an_expired_lease_of_a_live_node_is_not_taken(nodes: dict[str, Coordinator]) -> None:
    a, b = nodes["a"], nodes["b"]
    a.join()
    b.join()
    a.take([5])
    # a's lease expired but its heartbeat is fresh (as if its renewal came late)
    with psycopg.connect(a._conninfo, autocommit=True) as pg:
        pg.execute("UPDATE slot_leases SET expires = clock_timestamp() - interval '1 s'")
    assert b.take([5]) == {}
    held, _ = a.renew()  # its renewal extends it, same epoch
    assert held == {5: 1}


def test_handover_and_leave(nodes: dict[str, Coordinator]) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    for n in (a, b, c):
        n.join()
    a.take(range(P))
    assert a.handover([3, 4, 5], "b") == [3, 4, 5]
    assert a.handover([3], "c") == []  # not a's any more
    assert a.handover([6], "nobody") == []  # not a live node
    held, _ = b.renew()
    assert held == {3: 2, 4: 2, 5: 2}
    held, _ = a.renew()
    assert set(held) == set(range(P)) - {3, 4, 5}
    a.leave()
    # a's leases expired at once, and a is not a node any more: c takes them
    assert c.take(range(P)) == {s: 2 for s in range(P) if s not in (3, 4, 5)}
    with pytest.raises(StoreError, match="not in cluster_nodes"):
        a.renew()


def test_concurrent_takes_never_give_a_slot_to_two_nodes(
    pg_dsn: str, nodes: dict[str, Coordinator]
) -> None:
    for n in nodes.values():
        n.join()
    results: dict[str, dict[int, int]] = {}
    go = threading.Barrier(len(nodes))

    def take(name: str) -> None:
        go.wait()
        results[name] = nodes[name].take(range(P))

    threads = [threading.Thread(target=take, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [s for r in results.values() for s in r]
    assert sorted(got) == list(range(P))  # each slot exactly once
    _, table = nodes["a"].renew()
    for name, taken in results.items():
        for slot, epoch in taken.items():
            assert table.leases[slot].node == name and table.leases[slot].epoch == epoch == 1


def test_books_on_a_real_database_balance_and_fail_over(nodes: dict[str, Coordinator]) -> None:
    books = {name: LeaseBook(name, P, TTL) for name in nodes}
    for n in nodes.values():
        n.join()

    def round_(names: list[str]) -> None:
        for name in names:
            c, book = nodes[name], books[name]
            sent = time.monotonic()
            held, table = c.renew()
            book.renewed(held, sent)
            plan = book.plan(table)
            book.taken(c.take(plan.take), sent)
            for to, slots in plan.give.items():
                book.given(c.handover(slots, to))

    for _ in range(12):
        round_(["a", "b", "c"])
    counts = sorted(len(b.held) for b in books.values())
    assert counts == [5, 5, 6]
    assert sorted(s for b in books.values() for s in b.held) == list(range(P))
    # c stops; a and b go on renewing, and after its TTL they share its slots
    end = time.monotonic() + TTL * 2
    while time.monotonic() < end:
        round_(["a", "b"])
        time.sleep(TTL / 5)
    assert sorted(len(books[n].held) for n in ("a", "b")) == [8, 8]
    assert not books["c"].valid(time.monotonic())


def test_a_takeover_waits_for_a_batch_holding_the_lease_for_share(
    pg_dsn: str, nodes: dict[str, Coordinator]
) -> None:
    a, b = nodes["a"], nodes["b"]
    a.join()
    b.join()
    a.take([7])
    time.sleep(TTL + 0.1)
    b.renew()
    with psycopg.connect(pg_dsn) as batch:  # a's store, in the middle of a batch
        rows = batch.execute(
            "SELECT slot FROM slot_leases WHERE slot = 7 AND node = 'a' FOR SHARE"
        ).fetchall()
        assert rows == [(7,)]
        got: list[dict[int, int]] = []
        taker = threading.Thread(target=lambda: got.append(b.take([7])))
        taker.start()
        taker.join(0.3)
        assert taker.is_alive()  # waits for the batch's commit
        batch.commit()
        taker.join(5)
    assert got == [{7: 2}]
    a.close()
    with pytest.raises(StoreError, match="closed"):
        a.renew()
