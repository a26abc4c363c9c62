"""Test helpers: open either store, run its writer, reopen it to read it back.

A `MemoryStore` is "reopened" by loading the same object (nothing outlives it); a
`SqliteStore` is closed and a new one opened on the same file, so what comes back was read
from disk; a `PostgresStore` likewise on the same database.
"""

from __future__ import annotations

import sqlite3
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import psycopg
import trio

from dm_actor.store.base import CommandRecord, RegistrationRecord, Snapshot, Store
from dm_actor.store.memory import MemoryStore
from dm_actor.store.postgres import PostgresStore
from dm_actor.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Backend:
    def __init__(self, kind: str, path: Path, *, dsn: str | None = None) -> None:
        self.kind = kind
        self.path = path
        self.dsn = dsn  # postgres: the test's database
        self.clock = Clock()
        self.options: dict[str, Any] = {}

    def open(self, **options: Any) -> Store:
        self.options = options
        if self.kind == "memory":
            return MemoryStore(clock=self.clock, **options)
        return self._open_file()

    def _open_file(self) -> SqliteStore:
        if self.kind == "postgres":
            assert self.dsn is not None
            return PostgresStore(self.dsn, clock=self.clock, **self.options)
        return SqliteStore(self.path, clock=self.clock, **self.options)

    def reopen(self, store: Store) -> Snapshot:
        """What a restart would load."""
        if isinstance(store, SqliteStore):
            store.close()
            again = self._open_file()
            try:
                return again.load()
            finally:
                again.close()
        return store.load()


class Engine:
    """A SQLite file or a PostgreSQL database, opened again and again, and another
    connection's view of it."""

    def __init__(self, path: Path, dsn: str | None) -> None:
        self.path, self.dsn = path, dsn
        self._pg: psycopg.Connection[Any] | None = None

    def open(self, **options: Any) -> SqliteStore:
        if self.dsn is not None:
            return PostgresStore(self.dsn, **options)
        return SqliteStore(self.path, **options)

    def committed(self, async_id: str) -> bool:
        """Whether another connection (another process, after a crash) sees the command."""
        if self.dsn is None:
            db = sqlite3.connect(self.path)
            try:
                sql = "SELECT 1 FROM commands WHERE async_id = ?"
                return db.execute(sql, (async_id,)).fetchone() is not None
            finally:
                db.close()
        if self._pg is None:
            self._pg = psycopg.connect(self.dsn, autocommit=True)
        sql = "SELECT 1 FROM commands WHERE async_id = %s"
        return self._pg.execute(sql, (async_id,)).fetchone() is not None

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()


@asynccontextmanager
async def running(store: Store) -> AsyncIterator[Store]:
    """Run the store's writer (a SQLite store has one) around the block."""
    async with trio.open_nursery() as nursery:
        if isinstance(store, SqliteStore):
            await nursery.start(store.run)
        yield store
        nursery.cancel_scope.cancel()


def registration(endpoint: str, *, lifetime: int = 300, at: float = 1.0) -> RegistrationRecord:
    return RegistrationRecord(endpoint, f"r-{endpoint}", lifetime, "1.1", "UQ", True,
                              "</1/0>,</3/0>", at, at)  # fmt: skip


def command(
    endpoint: str, async_id: str, *, at: float = 1.0, attempts: int = 0, **fields: Any
) -> CommandRecord:
    values: dict[str, Any] = {
        "method": "PUT", "uri": "/3/0/14", "payload": b"+02", "content_format": 0,
        "accept": None, "accepted_at": at, "expires_at": at + 7200.0, "attempts_left": 3,
        "attempts": attempts, "last_attempt_at": None, "observe": False, "owner": "app-1",
    }  # fmt: skip
    values.update(fields)
    return CommandRecord(endpoint, async_id, **values)
