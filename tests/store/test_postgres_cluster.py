"""The PostgreSQL store in cluster mode, on a real server (`tests/store/postgres.py`): the slot
column (schema version 2, migrated from version 1 with its rows), reading some slots' rows
while the writer runs, fencing against the lease table (a real takeover through
`Coordinator`), and the database lock shared among the nodes of a cluster and exclusive for
a single daemon."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psycopg
import pytest
import trio

from dm_actor.cluster.leases import LeaseBook
from dm_actor.cluster.slots import slot_of
from dm_actor.store import postgres, schema
from dm_actor.store.base import AnswerRecord, ChannelRecord, EventRecord, StoreError
from dm_actor.store.coordinator import Coordinator
from dm_actor.store.postgres import Fenced, PostgresStore

from .support import command, registration

if TYPE_CHECKING:
    from collections.abc import Iterator

P = 16
TTL = 0.5


@dataclass
class Leases:
    """A fencing object (what a LeaseBook offers the store)."""

    node: str
    held: dict[int, int] = field(default_factory=dict)


def slots_in(dsn: str, table: str) -> dict[str, int]:
    with psycopg.connect(dsn) as pg:
        return dict(pg.execute(f"SELECT DISTINCT endpoint, slot FROM {table}").fetchall())


async def commit(store: PostgresStore) -> list[BaseException]:
    """Run the writer until what was recorded is committed; the errors it ended with."""
    errors: list[BaseException] = []

    def leaves(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for e in exc.exceptions:
                leaves(e)
        else:
            errors.append(exc)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.durable()
            nursery.cancel_scope.cancel()
    except BaseException as exc:
        leaves(exc)
    return errors


def test_a_version_1_database_is_migrated_and_its_slots_filled(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as pg:
        pg.execute(postgres.V1.encode())
        pg.execute("INSERT INTO dm_actor_store VALUES (%s, 1)", (schema.APPLICATION_ID,))
        for ep in ("ep-1", "ep-2", "ep-3"):
            pg.execute(
                "INSERT INTO registrations (endpoint, reg_id, lifetime, lwm2m_version, "
                "binding, queue_mode, links, registered_at, updated_at) "
                "VALUES (%s, 'r', 60, '1.1', 'U', false, '', 1, 1)",
                (ep,),
            )
        pg.execute(
            "INSERT INTO commands (endpoint, async_id, method, uri, payload, accepted_at, "
            "expires_at, attempts_left, attempts, observe, owner) "
            "VALUES ('ep-1', 'x', 'GET', '/3/0', '', 1, 9, 3, 0, false, 'app')"
        )
        pg.execute("INSERT INTO subscriptions VALUES ('ep-2', '/3/0/1', 'app')")
        pg.execute("INSERT INTO next_mids VALUES ('ep-3', 77)")
    PostgresStore(pg_dsn, slot_count=P).close()
    with psycopg.connect(pg_dsn) as pg:
        assert pg.execute("SELECT version, slot_count FROM dm_actor_store").fetchone() == (
            postgres.VERSION,
            P,
        )
    assert slots_in(pg_dsn, "registrations") == {e: slot_of(e, P) for e in ("ep-1", "ep-2", "ep-3")}
    assert slots_in(pg_dsn, "commands") == {"ep-1": slot_of("ep-1", P)}
    assert slots_in(pg_dsn, "subscriptions") == {"ep-2": slot_of("ep-2", P)}
    assert slots_in(pg_dsn, "next_mids") == {"ep-3": slot_of("ep-3", P)}
    # another slot count: a single daemon computes them again; a cluster node refuses
    store = PostgresStore(pg_dsn, slot_count=1000)
    snapshot = store.load()
    store.close()
    assert slots_in(pg_dsn, "registrations") == {
        e: slot_of(e, 1000) for e in ("ep-1", "ep-2", "ep-3")
    }
    assert snapshot.subscriptions == {"ep-2": [("/3/0/1", "app")]}
    assert snapshot.next_mids == {"ep-3": 77}
    with pytest.raises(StoreError, match="its rows are in 1000 slots"):
        PostgresStore(pg_dsn, slot_count=P, fencing=Leases("a"))


async def test_puts_write_the_slot_and_load_slots_reads_only_those(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, slot_count=P)
    endpoints = [f"dev-{i}" for i in range(40)]
    for ep in endpoints:
        store.put_registration(registration(ep))
        store.put_command(command(ep, f"id-{ep}"))
        store.put_subscription(ep, "/3/0/13", "app")
        store.put_next_mid(ep, 5)
    store.put_event(EventRecord("app", 1, "notification", b"{}", time.time()))
    store.put_event(EventRecord("other", 1, "notification", b"{}", time.time()))
    assert await commit(store) == []
    for table in postgres.SLOT_TABLES:
        assert slots_in(pg_dsn, table) == {ep: slot_of(ep, P) for ep in endpoints}
    wanted = {slot_of("dev-0", P), slot_of("dev-1", P)}
    inside = sorted(ep for ep in endpoints if slot_of(ep, P) in wanted)
    async with trio.open_nursery() as nursery:  # (the writer runs meanwhile)
        await nursery.start(store.run)
        store.put_registration(registration("dev-0", at=2.0))
        snapshot = await trio.to_thread.run_sync(store.load_slots, wanted)
        events = await trio.to_thread.run_sync(store.load_events, ["app"])
        await store.durable()
        nursery.cancel_scope.cancel()
    assert sorted(r.endpoint for r in snapshot.registrations) == inside
    assert sorted(c.endpoint for c in snapshot.commands) == inside
    assert sorted(snapshot.subscriptions) == inside
    assert snapshot.next_mids == dict.fromkeys(inside, 5)
    assert snapshot.channels == [] and snapshot.events == [] and snapshot.api_keys == []
    assert [(e.owner, e.seq) for e in events] == [("app", 1)]
    assert store.load_slots(set()).registrations == []
    again = store.load_slots(wanted)
    assert {r.endpoint: r.updated_at for r in again.registrations}["dev-0"] == 2.0
    store.close()


@pytest.fixture
def coordinators(pg_dsn: str) -> Iterator[tuple[Coordinator, Coordinator]]:
    a = Coordinator(pg_dsn, "a", slots=P, ttl=TTL, http="a:1", link="a:2")
    b = Coordinator(pg_dsn, "b", slots=P, ttl=TTL, http="b:1", link="b:2")
    a.join()
    b.join()
    yield a, b
    a.close()
    b.close()


async def test_fencing_refuses_a_batch_after_a_takeover(
    pg_dsn: str, coordinators: tuple[Coordinator, Coordinator]
) -> None:
    a, b = coordinators
    book = LeaseBook("a", P, TTL)
    book.taken(a.take(range(P)), time.monotonic())
    store = PostgresStore(pg_dsn, slot_count=P, fencing=book)
    store.put_registration(registration("dev-1", at=1.0))
    store.put_command(command("dev-2", "c-1"))
    assert await commit(store) == []
    # a is cut off past its TTL; b takes every slot
    await trio.sleep(TTL + 0.2)
    b.renew()
    assert len(b.take(range(P))) == P
    store.put_channel(ChannelRecord("app", "callback", 1.0, "http://x", {}, None))
    store.put_registration(registration("dev-1", at=2.0))
    errors = await commit(store)
    assert errors and all(isinstance(e, Fenced) for e in errors)
    fenced = errors[0]
    assert isinstance(fenced, Fenced)
    assert fenced.slots == {slot_of("dev-1", P)}
    assert f"slots {slot_of('dev-1', P)}, which another node owns now" in str(fenced)
    store.close()
    with psycopg.connect(pg_dsn) as pg:  # nothing of the batch was committed
        assert pg.execute("SELECT updated_at FROM registrations").fetchall() == [(1.0,)]
        assert pg.execute("SELECT count(*) FROM channels").fetchone() == (0,)


async def test_fencing_after_a_handover_and_for_a_slot_not_held(
    pg_dsn: str, coordinators: tuple[Coordinator, Coordinator]
) -> None:
    a, b = coordinators
    b.renew()
    leases = Leases("a", a.take(range(P)))
    store = PostgresStore(pg_dsn, slot_count=P, fencing=leases)
    # a batch touching no device's rows is not checked
    store.put_channel(ChannelRecord("app", "callback", 1.0, "http://x", {}, None))
    assert await commit(store) == []
    slot = slot_of("dev-1", P)
    assert a.handover([slot], "b") == [slot]
    # the stale copy of the leases still names the slot: the database refuses it
    store.put_subscription("dev-1", "/3/0/1", "app")
    errors = await commit(store)
    assert errors and isinstance(errors[0], Fenced) and errors[0].slots == {slot}
    store.close()
    # a slot not held at all is refused before asking the database
    leases.held.pop(slot_of("dev-2", P))
    store = PostgresStore(pg_dsn, slot_count=P, fencing=leases)
    for what in ("next mid", "answer"):
        if what == "answer":
            store.put_answer(AnswerRecord("app", "x", "dev-2", b"", 1, b"{}", 1.0, 1e12))
        else:
            store.put_next_mid("dev-2", 9)
        errors = await commit(store)
        assert errors and isinstance(errors[0], Fenced)
        assert errors[0].slots == {slot_of("dev-2", P)}
        store.close()
        store = PostgresStore(pg_dsn, slot_count=P, fencing=leases)
    store.close()
    with psycopg.connect(pg_dsn) as pg:
        assert pg.execute("SELECT count(*) FROM subscriptions").fetchone() == (0,)
        assert pg.execute("SELECT count(*) FROM next_mids").fetchone() == (0,)
        assert pg.execute("SELECT count(*) FROM answers").fetchone() == (0,)


def test_cluster_nodes_share_the_database_and_a_single_daemon_does_not(pg_dsn: str) -> None:
    single = PostgresStore(pg_dsn)
    with pytest.raises(StoreError, match=r"in use by another process.*a cluster node"):
        PostgresStore(pg_dsn, fencing=Leases("a"))
    single.close()
    a = PostgresStore(pg_dsn, fencing=Leases("a"))
    b = PostgresStore(pg_dsn, fencing=Leases("b"))
    with pytest.raises(StoreError, match=r"in use by another process.*a single daemon"):
        PostgresStore(pg_dsn)
    a.close()
    with pytest.raises(StoreError, match="in use by another process"):
        PostgresStore(pg_dsn)
    b.close()
    PostgresStore(pg_dsn).close()


async def test_a_batch_waits_while_its_lease_expired_until_the_renewal(
    pg_dsn: str, coordinators: tuple[Coordinator, Coordinator]
) -> None:
    a, _ = coordinators
    leases = Leases("a", a.take(range(P)))
    store = PostgresStore(pg_dsn, slot_count=P, fencing=leases)
    await trio.sleep(TTL + 0.1)  # a's renewal is late: its leases expired, nobody took them
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        store.put_registration(registration("dev-1"))
        with trio.fail_after(5):
            while store.healthy():  # noqa: ASYNC110 (the writer retries in a thread)
                await trio.sleep(0.01)
        assert "leases expired" in (store.problem() or "")
        assert slots_in(pg_dsn, "registrations") == {}  # not committed
        held, _ = await trio.to_thread.run_sync(a.renew)
        assert held == leases.held  # same epochs
        with trio.fail_after(5):
            await store.durable()
        assert store.healthy()
        nursery.cancel_scope.cancel()
    store.close()
    assert slots_in(pg_dsn, "registrations") == {"dev-1": slot_of("dev-1", P)}
