"""Disk faults: a full disk or a read-only store is retried until it can be written (the
server recovers without a restart), an I/O error stops the writer with `StoreFailed`, and
events other than AsyncIDResponses are kept within a budget and a free-disk headroom.

The full disk and the read-only store are real SQLite errors on a real file (`PRAGMA
max_page_count`, `PRAGMA query_only`); the I/O error, which a test cannot cause on demand,
is injected by `Faults`, a wrapper of the store's connection that raises at COMMIT what
`sqlite3` raises when the WAL's write or fsync fails. docs/operations.md describes a manual
run on a real small file system.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code
from dm_actor.store.base import KEPT_EVENT_KIND, EventRecord, StoreError, StoreFailed
from dm_actor.store.sqlite import SqliteStore

from .support import Engine, command, registration, running

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def sqlite_error(code: int, name: str, message: str) -> sqlite3.OperationalError:
    """The exception `sqlite3` raises for result code `code`."""
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = name
    return exc


def disk_full() -> sqlite3.OperationalError:
    return sqlite_error(sqlite3.SQLITE_FULL, "SQLITE_FULL", "database or disk is full")


def fsync_failed() -> sqlite3.OperationalError:
    return sqlite_error(sqlite3.SQLITE_IOERR_FSYNC, "SQLITE_IOERR_FSYNC", "disk I/O error")


class Faults:
    """The store's connection, raising `errors` (in order) at the next COMMITs."""

    def __init__(self, db: sqlite3.Connection, *errors: sqlite3.Error) -> None:
        self.db = db
        self.errors = list(errors)
        self.commits = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.commits += 1
            if self.errors:
                raise self.errors.pop(0)
        return self.db.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self.db.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self.db.in_transaction

    def close(self) -> None:
        self.db.close()


def inject(store: SqliteStore, *errors: sqlite3.Error) -> Faults:
    faults = Faults(store._db, *errors)
    store._db = faults  # type: ignore[assignment]
    return faults


def reopened(path: Path) -> list[str]:
    store = SqliteStore(path)
    try:
        return [c.async_id for c in store.load().commands]
    finally:
        store.close()


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("dm_")
    ]


async def test_a_full_disk_keeps_the_writes_and_recovers_without_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SQLITE_FULL: the file may not grow past `max_page_count`."""
    autojump_clock.autojump_threshold = 0.05  # commits run in a worker thread
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    done: list[str] = []

    async def wait(name: str) -> None:
        await store.durable()
        done.append(name)

    async with running(store), trio.open_nursery() as nursery:
        store.put_command(command("a", "before"))
        await store.durable()
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
        store.put_command(command("a", "big", payload=b"x" * 100_000))
        nursery.start_soon(wait, "big")
        await trio.sleep(60)
        assert done == [] and not store.healthy()
        problem = store.problem()
        assert problem is not None and str(path) in problem and "the disk is full" in problem
        for i in range(1000):  # an Update a second: one record, not a thousand
            store.put_registration(registration("a", at=float(i)))
        assert len(store._batches) == 2 and len(store._batches[1].regs) == 1
        assert store.write_retries >= 12  # 0.1 s doubling to 5 s: ~15 in a minute

        store._db.execute("PRAGMA max_page_count = 1073741823")  # space freed
        await trio.sleep(5)  # the next retry, at most 5 s later
        assert done == ["big"] and store.healthy() and store.problem() is None
        await store.durable()
    store.close()
    assert reopened(path) == ["before", "big"]
    [error] = records(caplog, logging.ERROR)  # once, however many retries
    assert "the disk is full" in error and "database or disk is full" in error
    assert str(path) in error
    [warning] = records(caplog, logging.WARNING)
    assert "writable again" in warning


async def test_a_read_only_store_is_retried_until_writable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A real SQLITE_READONLY (as a file system remounted read-only gives)."""
    autojump_clock.autojump_threshold = 0.05
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    async with running(store):
        store._db.execute("PRAGMA query_only = 1")
        store.put_command(command("a", "x"))
        with trio.move_on_after(10):
            await store.durable()
        assert not store.healthy()
        assert "read-only" in (store.problem() or "")
        store._db.execute("PRAGMA query_only = 0")
        with trio.fail_after(6):
            await store.durable()
        assert store.healthy()
    store.close()
    assert reopened(path) == ["x"]
    assert len(records(caplog, logging.ERROR)) == 1


async def test_retries_back_off_and_commit_in_order(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    autojump_clock.autojump_threshold = 0.05
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    faults = inject(store, *[disk_full() for _ in range(4)])
    async with running(store):
        start = trio.current_time()
        store.put_command(command("a", "first"))
        mark = store.mark()
        await trio.sleep(0.01)  # the first attempt fails
        store.put_command(command("a", "second"))  # the next batch, committed after
        await store.durable()
        assert store.is_durable(mark)
        waited = trio.current_time() - start
    store.close()
    assert store.write_retries == 4 and faults.commits == 6
    assert 0.1 + 0.2 + 0.4 + 0.8 <= waited < 3.0
    assert reopened(path) == ["first", "second"]


async def test_an_io_error_is_not_retried(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a failed fsync the kernel may drop the pages and report the next fsync as a
    success: nothing is retried, the writer stops with `StoreFailed` naming the file and
    the cause, the waiting writers are told, and a restart recovers what was committed."""
    autojump_clock.autojump_threshold = 0.05
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    failures: list[BaseException] = []

    async def waiter() -> None:
        try:
            await store.durable()
        except StoreFailed as exc:
            failures.append(exc)

    with pytest.RaisesGroup(StoreFailed) as raised:
        async with running(store):
            store.put_command(command("a", "kept"))
            await store.durable()
            inject(store, fsync_failed())
            store.put_command(command("a", "lost"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
    store.close()
    [failure] = raised.value.exceptions
    text = str(failure)
    assert str(path) in text and "disk I/O error" in text and "SQLITE_IOERR_FSYNC" in text
    assert "cannot be retried" in text
    assert failures == [failure]
    assert store.write_retries == 0
    assert reopened(path) == ["kept"]  # never acknowledged, so nothing acknowledged is lost


async def test_stopping_while_the_disk_is_full_does_not_hang(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    autojump_clock.autojump_threshold = 0.05
    path = tmp_path / "s.sqlite3"
    store = SqliteStore(path)
    inject(store, *[disk_full() for _ in range(100)])
    with trio.fail_after(30):
        async with running(store):
            store.put_command(command("a", "x"))
            await trio.sleep(1)
    store.close()
    assert any("stopping with 1 writes not committed" in m for m in records(caplog, 40))
    assert reopened(path) == []


async def test_events_past_the_budget_are_refused_but_async_responses_are_kept(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    store = engine.open(event_budget=1000)

    def event(seq: int, kind: str = "notifications") -> EventRecord:
        return EventRecord("idle-app", seq, kind, b"x" * 200, time.time())

    async with running(store):
        for seq in range(10):
            store.put_event(event(seq))
        await store.durable()
        store.put_event(event(10))  # refused before it is buffered
        for seq in range(20, 23):
            store.put_event(event(seq, KEPT_EVENT_KIND))
        await store.durable()
        assert store.events_refused == 6
        stored = {e.seq for e in store.load().events}
        assert stored == {0, 1, 2, 3, 4, 20, 21, 22}
        store.delete_events("idle-app", [0, 1, 2, 3, 4, 20, 21, 22])  # delivered
        await store.durable()  # the budget is checked again at this commit
        store.put_event(event(30))
        await store.durable()
        assert {e.seq for e in store.load().events} == {30}  # stored again
    store.close()
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert "no longer stored" in warnings[0] and "stored again" in warnings[1]


async def test_below_the_disk_headroom_only_async_responses_are_stored(tmp_path: Path) -> None:
    """Registrations and commands need the last of the disk; events nobody reads do not."""
    store = SqliteStore(tmp_path / "s.sqlite3", disk_headroom=2**62)
    async with running(store):
        store.put_event(EventRecord("app", 1, "notifications", b"{}", time.time()))
        store.put_event(EventRecord("app", 2, KEPT_EVENT_KIND, b"{}", time.time()))
        await store.durable()
    assert [e.seq for e in store.load().events] == [2]
    assert store.events_refused == 1
    store.close()


async def test_while_writes_fail_events_are_not_buffered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Only an AsyncIDResponse (a device's answer to an accepted command) waits in memory."""
    autojump_clock.autojump_threshold = 0.05
    store = SqliteStore(tmp_path / "s.sqlite3")
    inject(store, *[disk_full() for _ in range(3)])
    async with running(store):
        store.put_command(command("a", "x"))
        await trio.sleep(0.05)
        assert not store.healthy()
        store.put_event(EventRecord("app", 1, "notifications", b"{}", time.time()))
        store.put_event(EventRecord("app", 2, KEPT_EVENT_KIND, b"{}", time.time()))
        assert store.events_refused == 1
        await store.durable()
    assert [e.seq for e in store.load().events] == [2]
    store.close()


# ------------------------------------------------------------------ a real small file system


@contextmanager
def small_file_system(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, name: str = "fill") -> Path:
    """Fill the file system with a new file (ENOSPC ends it); returns the file."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


async def test_a_real_full_disk_restart_starts_reads_and_waits_to_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC on a real file system: the server must start on a full disk (not exit in a
    loop): the reserve file gives SQLite room for its -wal and -shm files; writes then wait
    for space and go on by themselves once it is freed."""
    autojump_clock.autojump_threshold = 0.05
    with small_file_system(tmp_path / "small") as small:
        path = small / "s.sqlite3"
        store = SqliteStore(path)
        assert (small / "s.sqlite3.reserve").stat().st_size == 2**20
        async with running(store):
            store.put_registration(registration("a"))
            await store.durable()
        store.close()  # (SQLite deletes its -wal and -shm files)
        filler = fill(small)

        store = SqliteStore(path)  # on the full disk
        assert [r.endpoint for r in store.load().registrations] == ["a"]
        assert not (small / "s.sqlite3.reserve").exists()
        async with running(store):
            more = fill(small, "more")  # what the reserve left is taken too
            store.put_command(command("a", "x", payload=b"p" * 300_000))
            with trio.move_on_after(30):
                await store.durable()
            assert not store.healthy() and "the disk is full" in (store.problem() or "")
            filler.unlink()
            more.unlink()
            with trio.fail_after(10):
                await store.durable()
            assert store.healthy()
        store.close()
        assert reopened(path) == ["x"]
    assert any("deleted the reserve file" in m for m in records(caplog, logging.WARNING))


def test_a_full_disk_without_a_reserve_is_not_called_damaged(tmp_path: Path) -> None:
    with small_file_system(tmp_path / "small", size="1m") as small:
        path = small / "s.sqlite3"
        SqliteStore(path).close()  # too small for a reserve
        assert not (small / "s.sqlite3.reserve").exists()
        fill(small)
        with pytest.raises(StoreError, match="the disk is full") as refused:
            SqliteStore(path)
        assert "damaged" not in str(refused.value)


# ------------------------------------------------------------------------- in the server


async def test_a_device_answer_while_the_disk_is_full_is_kept_and_delivered_after(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The answer arrives while commits fail: it waits in memory (its AsyncIDResponse is
    not published: it is not stored), the server keeps serving, and once the disk can be
    written the response is stored and delivered, without a restart."""
    from tests.actors.support import Device
    from tests.actors.test_restart import async_responses, run_server, slow_jumps

    slow_jumps(autojump_clock)
    _, server, events = await run_server(nursery, tmp_path, autojump_clock)
    store = server.supervisor.store
    assert isinstance(store, SqliteStore)
    dev = Device(server.coap_udp, "dev", lifetime=86400)
    await dev.start(nursery)
    await dev.register()
    accepted = await server.supervisor.submit("dev", "GET", "/3/0/1", async_id="a")
    assert accepted == Accepted()
    faults = inject(store, *[disk_full() for _ in range(1000)])  # before the answer comes
    await trio.sleep(60)
    assert [e.path for e in dev.executed] == ["/3/0/1"]  # answered by the device
    assert "a" not in async_responses(events)  # but not stored, so not handed over
    assert not store.healthy()
    # the server goes on answering: an Update is refused (its 2.04 would promise what the
    # store cannot keep) with Max-Age, so the device tries again later
    refused = await dev.update()
    assert (refused.code, refused.max_age) == (Code.SERVICE_UNAVAILABLE, 60)
    faults.errors.clear()  # space freed
    await trio.sleep(6)
    assert store.healthy()
    assert async_responses(events)["a"]["status"] == 200
    snapshot = store.load()
    assert snapshot.commands == [] and [e.kind for e in snapshot.events] == [KEPT_EVENT_KIND]


async def test_the_event_budget_and_headroom_are_settings(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from dm_actor import app
    from dm_actor.config import parse_settings

    text = (
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\ndata_dir = "{tmp_path}"\n'
        "event_disk_budget = 12345\ndisk_headroom = 678\n"
    )
    listening: app.Listening = await nursery.start(
        partial(app.serve, parse_settings(text), http=False)
    )
    store = listening.supervisor.store
    assert isinstance(store, SqliteStore)
    assert (store.event_budget, store.disk_headroom) == (12345, 678)


async def test_while_the_disk_is_full_commands_get_503_and_registers_are_shed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Nothing is accepted that could not be kept: no 202 or 2.01 waits for a disk that may
    stay full for hours."""
    from dm_actor.actors.supervisor import Rejected
    from tests.actors.support import Device
    from tests.actors.test_restart import run_server, slow_jumps

    slow_jumps(autojump_clock)
    _, server, _ = await run_server(nursery, tmp_path, autojump_clock)
    store = server.supervisor.store
    assert isinstance(store, SqliteStore)
    dev = Device(server.coap_udp, "dev", lifetime=86400)
    await dev.start(nursery)
    await dev.register()
    faults = inject(store, *[disk_full() for _ in range(1000)])
    nursery.start_soon(dev.update)  # a write that fails (its 2.04 waits for the store)
    await trio.sleep(1)
    assert not store.healthy()
    with trio.fail_after(5):
        refused = await server.supervisor.submit("dev", "GET", "/3/0/1", async_id="b")
    assert refused == Rejected(503, "STORE_IS_BEHIND")
    other = Device(server.coap_udp, "other", lifetime=86400)
    await other.start(nursery)
    with trio.fail_after(5):
        assert (await other.register()).code == Code.SERVICE_UNAVAILABLE
    faults.errors.clear()
    await trio.sleep(6)
    assert await server.supervisor.submit("dev", "GET", "/3/0/1", async_id="c") == Accepted()
