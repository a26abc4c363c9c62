"""The SQLite store's own promises: group commit, durability, migrations, refusing bad files.

Group commit and durability are the PostgreSQL store's promises too: those tests run on both
(`engine`)."""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING

import msgspec
import pytest
import trio
import trio.testing

from dm_actor.store import schema
from dm_actor.store.base import ChannelRecord, EventRecord, RegistrationRecord, StoreError
from dm_actor.store.sqlite import SqliteStore

from .support import Engine, command, registration, running

if TYPE_CHECKING:
    from pathlib import Path


async def test_a_fresh_file_is_wal_fsynced_and_current(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite3")
    # synchronous is per connection: read the store's own (FULL = 2)
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
    store.close()
    db = sqlite3.connect(tmp_path / "s.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    assert db.execute("PRAGMA application_id").fetchone() == (schema.APPLICATION_ID,)
    db.close()


async def test_one_transaction_for_many_concurrent_writers(engine: Engine) -> None:
    """1000 tasks put and wait at once: a handful of commits, and each task's write is on
    disk when its durable() returns."""
    store = engine.open()
    seen: list[bool] = []

    async def writer(i: int) -> None:
        store.put_command(command(f"ep{i % 50}", f"id{i}"))
        await store.durable()
        seen.append(engine.committed(f"id{i}"))

    async with running(store):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(writer, i)
        transactions = store.transactions
        await store.durable()  # nothing pending: no transaction
        assert store.transactions == transactions
    assert seen == [True] * 1000
    assert 1 <= transactions <= 3, transactions
    store.close()


async def test_a_full_batch_spills_into_the_next_transaction(engine: Engine) -> None:
    store = engine.open(max_batch=10)
    seen: list[bool] = []

    async def writer(i: int) -> None:
        store.put_command(command("ep", f"id{i}"))
        await store.durable()
        seen.append(engine.committed(f"id{i}"))

    async with running(store), trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(writer, i)
    assert seen == [True] * 100
    assert store.transactions >= 10
    store.close()


async def test_a_write_made_during_a_commit_waits_for_the_next(engine: Engine) -> None:
    store = engine.open()
    async with running(store):
        store.put_command(command("ep", "first"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.durable)
            await trio.testing.wait_all_tasks_blocked()  # the writer is in its thread now
            store.put_command(command("ep", "second"))
            before = store.transactions
            await store.durable()
            assert store.transactions >= before + 1
            assert engine.committed("second")
    store.close()


async def test_a_mark_is_durable_once_its_write_committed_not_before(engine: Engine) -> None:
    """`mark()` names the writes so far; `is_durable`/`durable(mark)` answer for exactly
    those, whatever was written after them (a device actor waits on its own write only)."""
    store = engine.open()
    async with running(store):
        assert store.is_durable(store.mark())  # nothing written yet
        store.put_command(command("ep", "first"))
        first = store.mark()
        assert not store.is_durable(first) and not engine.committed("first")
        assert store.backlog() == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.durable)
            await trio.testing.wait_all_tasks_blocked()  # "first" is being committed
            store.put_command(command("ep", "second"))
            second = store.mark()
            assert second > first
            await store.durable(first)
            assert store.is_durable(first) and engine.committed("first")
            assert not store.is_durable(second)  # (its commit may be under way already)
            await store.durable(second)
            assert store.is_durable(second) and engine.committed("second")
            assert store.backlog() == 0
    store.close()


async def test_commits_start_at_least_the_commit_interval_apart(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    """Writes made while a commit interval runs wait for its end and share one transaction;
    the first write after a quiet spell commits at once."""
    autojump_clock.autojump_threshold = 0.05  # a commit runs in a thread: let it end first
    store = engine.open(commit_interval=0.5)
    durable_at: dict[str, float] = {}

    async def writer(async_id: str) -> None:
        store.put_command(command("ep", async_id))
        await store.durable()
        durable_at[async_id] = trio.current_time()

    async with running(store), trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(writer, "a")
        await trio.sleep(0.1)
        for i in range(10):  # during a's interval
            nursery.start_soon(writer, f"b{i}")
            await trio.sleep(0.01)
        await trio.sleep(5)  # quiet
        quiet = trio.current_time()
        nursery.start_soon(writer, "c")
    assert durable_at["a"] - start <= 0.1  # at once (the test's next wake-up at the latest)
    [b_at] = {t - start for k, t in durable_at.items() if k[0] == "b"}  # one commit for all
    assert 0.5 <= b_at < 5  # not before the interval ended
    assert durable_at["c"] - quiet < 0.5
    assert store.transactions == 3
    store.close()


async def test_stopping_the_writer_commits_what_is_buffered(engine: Engine) -> None:
    store = engine.open()
    async with running(store):
        store.put_registration(registration("a"))
        store.put_command(command("a", "x"))
    store.close()
    store = engine.open()
    snap = store.load()
    assert snap.registrations == [registration("a")] and snap.commands == [command("a", "x")]
    store.close()


async def test_a_failed_commit_is_never_reported_durable(engine: Engine) -> None:
    store = engine.open()
    failures: list[StoreError] = []

    async def waiter() -> None:
        try:
            await store.durable()
        except StoreError as exc:
            failures.append(exc)

    with pytest.RaisesGroup(StoreError):
        async with running(store):
            store.put_command(command("a", "kept"))
            await store.durable()
            store.put_command(command("a", "next"))
            store.put_command(command("a", "bad", method=None))  # violates NOT NULL
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
    assert len(failures) == 1 and "a write failed" in str(failures[0])
    with pytest.raises(StoreError):
        await store.durable()
    store.close()
    store = engine.open()
    assert [c.async_id for c in store.load().commands] == ["kept"]  # the batch rolled back
    store.close()


# ------------------------------------------------------------------------------ migrations


def write_v1_store(path: Path) -> None:
    """A file as the first version of the code wrote it."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(schema.V1)
    db.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO registrations VALUES ('dev-1', 'r1', 300, '1.1', 'UQ', 1, '</3/0>', 1.0, 2.0)"
    )
    db.executemany(
        "INSERT INTO commands VALUES (?, ?, 'PUT', '/3/0/14', x'2B3032', 0, NULL, ?, ?, 3, ?,"
        " NULL, 0, 'app-1')",
        [("dev-1", "c1", 1.0, 7201.0, 0), ("dev-1", "c2", 2.0, 7202.0, 1)],
    )
    db.execute("INSERT INTO subscriptions VALUES ('dev-1', '/3/0/9', 'app-1')")
    db.close()


async def test_a_version_1_store_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    write_v1_store(path)
    store = SqliteStore(path)
    snap = store.load()
    assert snap.registrations == [
        RegistrationRecord("dev-1", "r1", 300, "1.1", "UQ", True, "</3/0>", 1.0, 2.0)
    ]
    assert snap.commands == [command("dev-1", "c1"), command("dev-1", "c2", at=2.0, attempts=1)]
    assert snap.subscriptions == {"dev-1": [("/3/0/9", "app-1")]}
    async with running(store):  # the version 2 and 3 parts work
        store.put_command(command("dev-1", "c1", mid=42, token=b"tk"))
        store.put_channel(ChannelRecord("app-1", "WEB_SOCKET", 5.0))
        store.put_event(EventRecord("app-1", 1, "notifications", b"{}", store.clock()))
        store.put_next_mid("dev-1", 298)
        await store.durable()
    store.close()
    store = SqliteStore(path)
    snap = store.load()
    assert snap.commands[0].mid == 42 and snap.commands[0].token == b"tk"
    assert len(snap.channels) == 1 and len(snap.events) == 1
    assert snap.next_mids == {"dev-1": 298}
    assert store._db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    store.close()


async def test_a_version_2_store_is_migrated_with_its_data(tmp_path: Path) -> None:
    """Version 2 is what the first release with durability wrote."""
    path = tmp_path / "v2.sqlite3"
    write_v1_store(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(schema.V2)
    db.execute("PRAGMA user_version = 2")
    db.execute("UPDATE commands SET mid = 42, token = x'746B' WHERE async_id = 'c1'")
    db.execute("INSERT INTO events VALUES ('app-1', 1, 'async-responses', x'7B7D', 1e12)")
    db.close()
    store = SqliteStore(path)
    snap = store.load()
    assert snap.commands[0] == command("dev-1", "c1", mid=42, token=b"tk")
    assert [e.seq for e in snap.events] == [1]
    assert snap.next_mids == {}  # none reserved: a restored device starts at a random MID
    async with running(store):
        store.put_next_mid("dev-1", 7)
        await store.durable()
    assert store.load().next_mids == {"dev-1": 7}
    assert store._db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    store.close()


async def test_a_version_4_store_is_migrated_and_keeps_addresses_from_then_on(
    tmp_path: Path,
) -> None:
    """Version 5 adds each UDP device's last address; a version 4 registration has none (its
    device is reached at its next contact, as before)."""
    path = tmp_path / "v4.sqlite3"
    write_v1_store(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(schema.V2 + schema.V3 + schema.V4)
    db.execute("UPDATE registrations SET endpoint_type = 'meter'")
    db.execute("PRAGMA user_version = 4")
    db.close()
    store = SqliteStore(path)
    [old] = store.load().registrations
    assert (old.endpoint_type, old.address) == ("meter", None)
    moved = msgspec.structs.replace(old, address='["127.0.0.1",56830]')
    async with running(store):
        store.put_registration(moved)
        await store.durable()
    store.close()
    store = SqliteStore(path)
    assert store.load().registrations == [moved]
    assert store._db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    store.close()


async def test_a_failed_migration_leaves_the_old_store_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    write_v1_store(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE channels (x)")  # something in the way of version 2
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="migrating to schema version 2 failed"):
        SqliteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM commands").fetchone() == (2,)
    assert "mid" not in [c[1] for c in db.execute("PRAGMA table_info(commands)")]
    db.close()


# -------------------------------------------------------------------------- refusing files


async def filled_store(path: Path, commands: int = 2000) -> None:
    store = SqliteStore(path)
    async with running(store):
        for i in range(commands):
            store.put_command(command(f"ep{i % 97}", f"id{i}", payload=b"p" * 40))
            store.put_registration(registration(f"ep{i}"))
        await store.durable()
    store.close()


def refused(path: Path, match: str) -> str:
    """Opening fails with a StoreError naming the file, and the file is left untouched."""
    before = path.read_bytes()
    with pytest.raises(StoreError, match=match) as info:
        SqliteStore(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before
    return str(info.value)


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"registrations: none, this is a text file\n" * 200)
    refused(path, "not a dm-actor store, or damaged: file is not a database")


async def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    with path.open("r+b") as f:
        f.write(b"SQLite format 4\x00")
    refused(path, "not a database")


async def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    os.truncate(path, path.stat().st_size // 2)
    refused(path, "damaged")


async def test_damaged_pages(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 3)
        f.write(bytes(range(256)) * (size // 3 // 256))
    refused(path, "the store is damaged")


def test_another_programs_database(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (name TEXT)")
    db.commit()
    db.close()
    refused(path, "a SQLite database, but not a dm-actor store")


async def test_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    await filled_store(path, commands=10)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    db.commit()
    db.close()
    message = refused(path, "written by a newer dm-actor")
    assert f"schema version {schema.VERSION + 1}" in message


def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    SqliteStore(path).close()
    if os.geteuid() != 0:
        path.chmod(0)
        refused_as = _open_refused
    else:  # root reads anything: become nobody for the open
        refused_as = _open_refused_as_nobody
    assert "Permission denied" in refused_as(path)


def _open_refused(path: Path) -> str:
    with pytest.raises(StoreError, match="cannot open the store for reading and writing") as e:
        SqliteStore(path)
    return str(e.value)


def _open_refused_as_nobody(path: Path) -> str:
    os.seteuid(65534)
    try:
        return _open_refused(path)
    finally:
        os.seteuid(0)


def test_a_directory_or_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SqliteStore(tmp_path)
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(tmp_path / "missing" / "s.sqlite3")


def test_a_store_in_use_by_another_daemon_is_refused(tmp_path: Path) -> None:
    """Two daemons on one data directory would both think their queues are the truth."""
    path = tmp_path / "s.sqlite3"
    first = SqliteStore(path)
    with pytest.raises(StoreError, match=rf"in use by another process \(pid {os.getpid()}\)"):
        SqliteStore(path)
    first.close()  # (a killed process's lock goes with it: the kernel drops it)
    SqliteStore(path).close()
