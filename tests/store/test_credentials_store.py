"""Device credentials in the store: the migration that adds them, and both stores' promises."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from dm_actor.store import schema
from dm_actor.store.base import CredentialRecord
from dm_actor.store.sqlite import SqliteStore

from .support import registration, running
from .test_sqlite import write_v1_store

if TYPE_CHECKING:
    from pathlib import Path

    from .support import Backend

KEY = bytes(range(16))
A = CredentialRecord("dev-a", "id-a", KEY, 10.0)


def write_previous_version(path: Path) -> None:
    """A file as the version before the credentials wrote it, with a registration."""
    write_v1_store(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("".join(schema.MIGRATIONS[1 : schema.VERSION - 1]))
    db.execute(f"PRAGMA user_version = {schema.VERSION - 1}")
    db.close()


async def test_the_previous_version_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "previous.sqlite3"
    write_previous_version(path)
    store = SqliteStore(path)
    snap = store.load()
    assert [r.endpoint for r in snap.registrations] == ["dev-1"]
    assert snap.credentials == []
    assert store._db.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
    async with running(store):
        store.put_credential(A)
        await store.durable()
    store.close()
    store = SqliteStore(path)
    snap = store.load()
    assert snap.credentials == [A]
    assert [r.endpoint for r in snap.registrations] == ["dev-1"]
    store.close()


async def test_a_version_1_store_reaches_the_credentials_too(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite3"
    write_v1_store(path)
    store = SqliteStore(path)
    assert store.load().credentials == []
    async with running(store):
        store.put_credential(A)
        await store.durable()
    assert store.load().credentials == [A]
    store.close()


async def test_put_replace_delete(backend: Backend) -> None:
    store = backend.open()
    b = CredentialRecord("dev-b", "id-b", b"\xff" * 32, 11.0)
    async with running(store):
        store.put_registration(registration("dev-a"))
        store.put_credential(A)
        store.put_credential(b)
        await store.durable()
        replaced = CredentialRecord("dev-a", "id-a2", KEY[::-1], 12.0)
        store.put_credential(replaced)
        await store.durable()
        assert store.load().credentials == [replaced, b]
        store.delete_credential("dev-b")
        store.delete_credential("dev-unknown")
        await store.durable()
    snap = backend.reopen(store)
    assert snap.credentials == [replaced]
    assert [r.endpoint for r in snap.registrations] == ["dev-a"]  # untouched


async def test_an_identity_moved_within_one_batch(backend: Backend) -> None:
    """The table keeps an identity unique; a batch that gives dev-a a new identity and
    dev-b dev-a's old one in the same transaction commits (deletes go first)."""
    store = backend.open()
    async with running(store):
        store.put_credential(A)
        await store.durable()
        store.put_credential(CredentialRecord("dev-a", "id-new", KEY, 13.0))
        store.put_credential(CredentialRecord("dev-b", "id-a", KEY, 13.0))
        await store.durable()
    snap = backend.reopen(store)
    assert [(c.endpoint, c.psk_identity) for c in snap.credentials] == [
        ("dev-a", "id-new"),
        ("dev-b", "id-a"),
    ]


def test_a_record_never_shows_its_key() -> None:
    text = repr(CredentialRecord("dev-a", "id-a", bytes.fromhex("deadbeef" * 4), 1.0))
    assert "deadbeef" not in text.lower() and "\\xde" not in text
