"""Remembered answers (delivery.md rule 1.7): kept per application and async-id until their
window ends, on both stores, and the schema migration that brings them to an older file."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from dm_actor.store import schema
from dm_actor.store.base import AnswerRecord, EventRecord
from dm_actor.store.sqlite import SqliteStore

from .support import Backend, command, running
from .test_sqlite import write_v1_store

if TYPE_CHECKING:
    from pathlib import Path

T0 = 1_700_000_000.0


def answer(owner: str, async_id: str, *, seq: int = 1, at: float = T0, window: float = 7200.0,
           endpoint: str = "dev-1") -> AnswerRecord:  # fmt: skip
    item = b'{"id":"%s","status":200,"payload":"MjE="}' % async_id.encode()
    return AnswerRecord(owner, async_id, endpoint, b"\x01" * 16, seq, item, at, at + window)


async def test_answers_round_trip_until_their_window_ends(backend: Backend) -> None:
    store = backend.open()
    async with running(store):
        store.put_answer(answer("app-1", "a", seq=1, window=100))
        store.put_answer(answer("app-1", "b", seq=2, at=T0 + 1))
        store.put_answer(answer("app-2", "a", seq=3, at=T0 + 2, endpoint="dev-2"))
        store.put_answer(answer("app-1", "c", seq=4, at=T0 + 3))
        await store.durable()
        store.delete_answers("app-1", ["c", "never-stored"])
        store.put_answer(answer("app-1", "b", seq=5, at=T0 + 4))  # replaced
        await store.durable()
    snap = backend.reopen(store)
    assert snap.answers == [
        answer("app-1", "a", seq=1, window=100),
        answer("app-2", "a", seq=3, at=T0 + 2, endpoint="dev-2"),
        answer("app-1", "b", seq=5, at=T0 + 4),
    ]
    backend.clock.now = T0 + 100  # a's window ended: a restart does not bring it back
    assert [(a.owner, a.async_id) for a in backend.reopen(store).answers] == [
        ("app-2", "a"),
        ("app-1", "b"),
    ]


async def test_answers_outlive_the_registration_and_the_events(backend: Backend) -> None:
    """An async-id is the application's: its answer stays when the device goes, and when
    the event that carried it was delivered."""
    store = backend.open()
    async with running(store):
        store.put_event(EventRecord("app-1", 1, "async-responses", b"{}", T0))
        store.put_answer(answer("app-1", "a"))
        await store.durable()
        store.delete_registration("dev-1")
        store.delete_events("app-1", [1])
        store.delete_channel("app-1")
        await store.durable()
    snap = backend.reopen(store)
    assert (snap.events, snap.answers) == ([], [answer("app-1", "a")])


async def test_sqlite_drops_answers_past_their_window_when_it_writes_answers(
    tmp_path: Path,
) -> None:
    backend = Backend("sqlite", tmp_path / "s.sqlite3")
    store = backend.open()
    assert isinstance(store, SqliteStore)
    async with running(store):
        store.put_answer(answer("app-1", "old", window=60))
        await store.durable()
        backend.clock.now = T0 + 61
        store.put_answer(answer("app-1", "new", seq=2, at=T0 + 61))
        await store.durable()
    rows = store._db.execute("SELECT async_id FROM answers").fetchall()
    assert rows == [("new",)]
    store.close()


async def test_a_version_5_store_is_migrated_and_remembers_answers_from_then_on(
    tmp_path: Path,
) -> None:
    """Version 6 adds the remembered answers; a version 5 file keeps all it had (its queued
    commands and owed AsyncIDResponses) and remembers none (as before: a repeat of a command
    that finished before the upgrade is a new command)."""
    path = tmp_path / "v5.sqlite3"
    write_v1_store(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(schema.V2 + schema.V3 + schema.V4 + schema.V5)
    db.execute("INSERT INTO events VALUES ('app-1', 7, 'async-responses', x'7B7D', ?)", (T0,))
    db.execute("PRAGMA user_version = 5")
    db.close()
    backend = Backend("sqlite", path)
    store = backend.open()
    snap = store.load()
    assert snap.commands == [command("dev-1", "c1"), command("dev-1", "c2", at=2.0, attempts=1)]
    assert [e.seq for e in snap.events] == [7]
    assert snap.answers == []
    version = store._db.execute("PRAGMA user_version").fetchone()  # type: ignore[attr-defined]
    assert version == (schema.VERSION,)
    assert schema.MIGRATIONS[5] == schema.V6
    async with running(store):
        store.put_answer(answer("app-1", "c0", seq=7))
        await store.durable()
    assert backend.reopen(store).answers == [answer("app-1", "c0", seq=7)]
