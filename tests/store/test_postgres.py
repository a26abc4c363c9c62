"""The PostgreSQL store's own promises, on a real server (`tests/store/postgres.py`): commits
with `synchronous_commit = on`, a versioned schema, refusing a foreign, newer or busy database,
and retrying (not failing) while the server is unreachable or read-only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import psycopg
import pytest
import trio
import trio.testing

from dm_actor.cli import EXIT_STORE, main
from dm_actor.store import postgres, schema
from dm_actor.store.base import StoreError
from dm_actor.store.postgres import PostgresStore

from .support import command, registration, running

if TYPE_CHECKING:
    from pathlib import Path

    from .postgres import PostgresServer


def sql(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        pg.execute(statement.encode())


def test_a_fresh_database_is_current_and_commits_synchronously(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    assert store._pg.execute("SHOW synchronous_commit").fetchone() == ("on",)
    store.close()
    with psycopg.connect(pg_dsn) as pg:
        row = pg.execute("SELECT application_id, version FROM dm_actor_store").fetchone()
    assert row == (schema.APPLICATION_ID, postgres.VERSION)
    PostgresStore(pg_dsn).close()  # opened again: nothing to migrate


def test_another_programs_database_is_refused(pg_dsn: str) -> None:
    sql(pg_dsn, "CREATE TABLE photos (name TEXT)")
    with pytest.raises(StoreError, match="not a dm-actor database"):
        PostgresStore(pg_dsn)


def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    PostgresStore(pg_dsn).close()
    sql(pg_dsn, f"UPDATE dm_actor_store SET version = {postgres.VERSION + 1}")
    with pytest.raises(
        StoreError, match=f"newer dm-actor \\(schema version {postgres.VERSION + 1}"
    ):
        PostgresStore(pg_dsn)


def test_a_database_in_use_by_another_daemon_is_refused(pg_dsn: str) -> None:
    first = PostgresStore(pg_dsn)
    with pytest.raises(StoreError, match="in use by another process"):
        PostgresStore(pg_dsn)
    first.close()  # (a killed process's session ends, and its lock with it)
    PostgresStore(pg_dsn).close()


def test_an_unreachable_server_is_a_store_error(tmp_path: object) -> None:
    with pytest.raises(StoreError, match="cannot connect"):
        PostgresStore(f"host={tmp_path} dbname=none connect_timeout=2")


def test_the_password_is_never_named() -> None:
    where = postgres.describe("postgresql://dm:secret@db.example/dm_actor")
    assert "secret" not in where and "dm_actor" in where and "db.example" in where


async def test_a_lost_connection_and_a_read_only_server_are_retried(
    pg_server: PostgresServer,
    pg_dsn: str,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The writer's session is killed, and the new session finds the database read-only:
    the batch is kept (`healthy()` False, logged once), retried, and committed once the
    database is writable; nothing is lost, nothing reported durable before."""
    autojump_clock.autojump_threshold = 0.05
    store = PostgresStore(pg_dsn)
    async with running(store):
        store.put_registration(registration("a"))
        await store.durable()
        sql(pg_server.dsn(), "ALTER DATABASE " + pg_dsn.rsplit("=", 1)[1] + " SET "
            "default_transaction_read_only = on")  # fmt: skip
        sql(pg_server.dsn(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'dm-actor'")  # fmt: skip
        store.put_command(command("a", "x"))
        mark = store.mark()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.durable)
            for _ in range(100):
                await trio.sleep(0.1)
                if store.write_retries >= 2:
                    break
            assert not store.healthy() and not store.is_durable(mark)
            assert store.problem() is not None
            sql(pg_server.dsn(), "ALTER DATABASE " + pg_dsn.rsplit("=", 1)[1] + " RESET "
                "default_transaction_read_only")  # fmt: skip
            sql(pg_server.dsn(), "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'dm-actor'")  # fmt: skip
        assert store.is_durable(mark) and store.healthy()
    store.close()
    again = PostgresStore(pg_dsn)
    assert [c.async_id for c in again.load().commands] == ["x"]
    again.close()
    errors = [
        r for r in caplog.records if r.levelno == logging.ERROR and "retried" in r.getMessage()
    ]
    assert len(errors) == 1


async def test_a_server_crash_and_restart_loses_no_acknowledged_write(
    pg_server: PostgresServer, pg_dsn: str, autojump_clock: trio.testing.MockClock
) -> None:
    """`pg_ctl stop -m immediate` (no checkpoint: recovery replays the WAL) while writes
    wait, then a start: what `durable()` acknowledged before is there, and what waited
    commits after."""
    autojump_clock.autojump_threshold = 0.05
    store = PostgresStore(pg_dsn)
    async with running(store):
        for i in range(50):
            store.put_command(command("a", f"before{i}"))
        await store.durable()
        await trio.to_thread.run_sync(pg_server.stop, "immediate")
        store.put_command(command("a", "during"))
        mark = store.mark()
        for _ in range(100):
            await trio.sleep(0.1)
            if not store.healthy():
                break
        assert not store.healthy() and not store.is_durable(mark)
        await trio.to_thread.run_sync(pg_server.start)
        await store.durable(mark)
    store.close()
    again = PostgresStore(pg_dsn)
    ids = [c.async_id for c in again.load().commands]
    again.close()
    assert ids == [f"before{i}" for i in range(50)] + ["during"]


def test_the_daemon_on_a_busy_database_exits_3_naming_it(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dm-actor serve --store postgres --dsn ...` opens the database the flags name (here
    held by another store, as by a running daemon): refused with exit code 3."""
    holder = PostgresStore(pg_dsn)
    try:
        code = main(["serve", "--store", "postgres", "--dsn", pg_dsn, "--data-dir",
                     str(tmp_path / "data"), "--host", "127.0.0.1", "--coap-port", "0",
                     "--http-port", "0"])  # fmt: skip
    finally:
        holder.close()
    assert code == EXIT_STORE
    err = capsys.readouterr().err
    assert "in use by another process" in err and pg_dsn.rsplit("=", 1)[1] in err


async def test_a_nul_in_a_stored_string_does_not_stop_the_writer(pg_dsn: str) -> None:
    """PostgreSQL's text cannot hold NUL (SQLite's can): it is stored as U+FFFD instead of
    failing the batch (a `DataError` would stop the daemon)."""
    store = PostgresStore(pg_dsn)
    async with running(store):
        store.put_registration(msgspec.structs.replace(registration("a"), links='</3/0>;x="\x00"'))
        store.put_command(command("a", "x", uri="/3/0/\x00"))
        await store.durable()
    store.close()
    again = PostgresStore(pg_dsn)
    snap = again.load()
    again.close()
    assert snap.registrations[0].links == '</3/0>;x="\ufffd"'
    assert snap.commands[0].uri == "/3/0/\ufffd"
