"""The embedded SQLite `Store`: one file in WAL mode, written by one task with group commit.

Every `put_*`/`delete_*` only records the write in the batch being filled, coalesced by key
(repeated puts keep the last record; a put then a delete leaves only the delete). The writer
task (`run`) takes the oldest batch, writes it in one transaction in a worker thread, commits,
and wakes every `durable()` waiter whose writes it held: many 202s share one fsync. A batch
holds at most `max_batch` writes; further writes start the next batch, which commits next.
Transactions start at least `commit_interval` apart: under load one fsync then serves all the
writes of the interval instead of as many as the disk can take back to back.

Durability: `journal_mode=WAL` with `synchronous=FULL`, so each commit fsyncs the WAL. With
`NORMAL` a WAL commit survives a crash of the process but not of the machine, and an edge
gateway losing power must not lose an accepted command.

Opening checks the file before using it: a file that is not SQLite, a SQLite file that is not
ours, a newer schema, a damaged file (`PRAGMA quick_check`), one we may not read and write, or
one another process holds (its `.lock` file) raises `StoreError`, naming the file. Nothing is
ever recreated or dropped. An older schema is migrated in place, one transaction per version
(see `dm_actor.store.schema`).

This module never decides what to store or when a write must be durable; the actors do.
"""

from __future__ import annotations

import collections
import fcntl
import math
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from dm_actor.store import schema
from dm_actor.store.base import (
    EVENT_BYTES_CAP,
    EVENT_LIFETIME,
    ApiKeyRecord,
    ChannelRecord,
    CommandRecord,
    EventRecord,
    PresubscriptionRecord,
    RegistrationRecord,
    Snapshot,
    StoreError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


_REG_FIELDS = RegistrationRecord.__struct_fields__
_CMD_FIELDS = CommandRecord.__struct_fields__
_PUT_REGISTRATION = (
    f"INSERT OR REPLACE INTO registrations ({', '.join(_REG_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_REG_FIELDS))})"
)
# an upsert keeps the row (and its rowid, the acceptance order) of a command put again
_PUT_COMMAND = (
    f"INSERT INTO commands ({', '.join(_CMD_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_CMD_FIELDS))}) ON CONFLICT (endpoint, async_id) DO UPDATE "
    f"SET {', '.join(f'{f} = excluded.{f}' for f in _CMD_FIELDS[2:])}"
)
_PUT_EVENT = (
    "INSERT INTO events VALUES (?, ?, ?, ?, ?) ON CONFLICT (owner, seq) DO UPDATE "
    "SET kind = excluded.kind, item = excluded.item, created_at = excluded.created_at"
)
# drop the oldest events of owner ?1 until the newest ones fit in ?2 bytes
_CAP_EVENTS = """
DELETE FROM events WHERE owner = ?1 AND seq <= (
    SELECT seq FROM (
        SELECT seq, sum(length(item)) OVER (ORDER BY seq DESC) AS newer
        FROM events WHERE owner = ?1
    ) WHERE newer > ?2 ORDER BY seq DESC LIMIT 1
)
"""

_json_encode = msgspec.json.encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode
_decode_paths = msgspec.json.Decoder(tuple[str, ...]).decode


class _Batch:
    """The writes of one transaction, coalesced by key."""

    __slots__ = (
        "api_keys",
        "channels",
        "cmd_deletes",
        "cmd_index",
        "cmds",
        "count",
        "event_deletes",
        "event_wipes",
        "events",
        "next_mids",
        "presubscriptions",
        "regs",
        "seq",
        "subs",
        "wiped",
    )

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.count = 0  # writes recorded, before coalescing
        self.regs: dict[str, RegistrationRecord | None] = {}  # None: delete
        self.wiped: set[str] = set()  # endpoints whose stored commands (and next MID) go
        self.next_mids: dict[str, int] = {}  # endpoint -> mid, after the wipes
        self.cmds: dict[tuple[str, str], CommandRecord] = {}  # in first-put order
        self.cmd_index: dict[str, list[str]] = {}  # endpoint -> async-ids put in cmds
        self.cmd_deletes: set[tuple[str, str]] = set()  # applied before the puts
        self.subs: dict[tuple[str, str, str], bool] = {}  # True: put, False: delete
        self.presubscriptions: dict[str, Sequence[PresubscriptionRecord]] = {}
        self.channels: dict[str, ChannelRecord | None] = {}
        self.api_keys: dict[str, ApiKeyRecord | None] = {}
        self.event_wipes: set[str] = set()  # owners whose events all go, before the puts
        self.event_deletes: dict[str, set[int]] = {}  # owner -> seqs to forget, before the puts
        self.events: dict[str, dict[int, EventRecord]] = {}  # owner -> seq ->


class SqliteStore:
    """A `Store` in one SQLite file. Open it, `load()` it, then run its writer.

    ```
    store = SqliteStore(data_dir / "store.sqlite3")
    snapshot = store.load()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        ...
    store.close()
    ```

    Args:
        path: the store file; created (with the current schema) when missing. Its directory
            must exist.
        max_batch: the most writes one transaction takes; later writes go to the next one.
        commit_interval: seconds from the start of one transaction to the start of the next,
            at least. A commit costs ~85 µs of CPU (most of it the fsync), whatever it holds:
            committing back to back spends a core on fsyncs under load. A `durable()` waits
            at most this much longer; 0 commits as soon as the last commit ended. The daemon
            sets it from `[server] commit_interval`.
        clock: the wall clock that ages events (`EventRecord.created_at` uses the same).
        event_lifetime: seconds an undelivered event is kept.
        event_bytes_cap: the bytes of undelivered events kept per owner; older ones are dropped.
        check: run `PRAGMA quick_check` on open (reads the whole file once).

    Raises:
        StoreError: the file cannot be opened, is not a dm-actor store, is damaged, or was
            written by a newer schema than this code knows.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_batch: int = 10_000,
        commit_interval: float = 0.0,
        clock: Callable[[], float] = time.time,
        event_lifetime: float = EVENT_LIFETIME,
        event_bytes_cap: int = EVENT_BYTES_CAP,
        check: bool = True,
    ) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self.clock = clock
        self.event_lifetime = event_lifetime
        self.event_bytes_cap = event_bytes_cap
        self.transactions = 0  # committed by the writer
        self.writes = 0  # recorded by put_*/delete_*/set_*, before coalescing
        self._committed_writes = 0
        self._batches = collections.deque([_Batch(1)])  # the last one is being filled
        self._committed = 0  # seq of the last committed batch
        self._committed_event = trio.Event()
        self._kick = trio.Event()  # set when a write is recorded
        self._failure: StoreError | None = None
        self._last_commit = -math.inf  # when the last transaction started (Trio time)
        self._db, self._lock = _open(self.path, check=check)

    def close(self) -> None:
        """Close the file and release its lock. Writes not yet committed are lost: stop the
        writer first."""
        self._db.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # ----------------------------------------------------------------------------- reading

    def load(self) -> Snapshot:
        """Everything stored, read in the calling thread. Call it before the writer runs."""
        db = self._db
        try:
            return Snapshot(
                registrations=[
                    _registration(*r)
                    for r in db.execute(
                        f"SELECT {', '.join(_REG_FIELDS)} FROM registrations ORDER BY rowid"
                    )
                ],
                commands=[
                    _command(*r)
                    for r in db.execute(
                        f"SELECT {', '.join(_CMD_FIELDS)} FROM commands ORDER BY rowid"
                    )
                ],
                subscriptions=_group(db.execute("SELECT * FROM subscriptions ORDER BY 1, 2, 3")),
                presubscriptions=_presubscriptions(
                    db.execute("SELECT * FROM presubscriptions ORDER BY owner, position")
                ),
                channels=[
                    ChannelRecord(owner, mechanism, created, url, _decode_headers(headers), ser)
                    for owner, mechanism, created, url, headers, ser in db.execute(
                        "SELECT * FROM channels ORDER BY owner"
                    )
                ],
                api_keys=[
                    ApiKeyRecord(*r) for r in db.execute("SELECT * FROM api_keys ORDER BY key")
                ],
                events=[
                    EventRecord(*r)
                    for r in db.execute(
                        "SELECT * FROM events WHERE created_at >= ? ORDER BY owner, seq",
                        (self.clock() - self.event_lifetime,),
                    )
                ],
                next_mids=dict(db.execute("SELECT endpoint, mid FROM next_mids")),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc

    # ----------------------------------------------------------------------- buffered writes

    def _filling(self) -> _Batch:
        batch = self._batches[-1]
        if batch.count >= self.max_batch:
            batch = _Batch(batch.seq + 1)
            self._batches.append(batch)
        batch.count += 1
        self.writes += 1
        self._kick.set()
        return batch

    def put_registration(self, record: RegistrationRecord) -> None:
        self._filling().regs[record.endpoint] = record

    def delete_registration(self, endpoint: str) -> None:
        """Forget the registration and its queued commands."""
        batch = self._filling()
        batch.regs[endpoint] = None
        batch.wiped.add(endpoint)
        batch.next_mids.pop(endpoint, None)
        cmds = batch.cmds
        for async_id in batch.cmd_index.pop(endpoint, ()):
            cmds.pop((endpoint, async_id), None)

    def put_command(self, record: CommandRecord) -> None:
        """Insert or replace (by endpoint and async-id) a queued command."""
        batch = self._filling()
        key = (record.endpoint, record.async_id)
        if key not in batch.cmds:
            batch.cmd_index.setdefault(record.endpoint, []).append(record.async_id)
        batch.cmds[key] = record

    def put_next_mid(self, endpoint: str, mid: int) -> None:
        self._filling().next_mids[endpoint] = mid

    def delete_command(self, endpoint: str, async_id: str) -> None:
        batch = self._filling()
        key = (endpoint, async_id)
        batch.cmds.pop(key, None)
        batch.cmd_deletes.add(key)

    def put_subscription(self, endpoint: str, path: str, owner: str) -> None:
        self._filling().subs[endpoint, path, owner] = True

    def delete_subscription(self, endpoint: str, path: str, owner: str) -> None:
        self._filling().subs[endpoint, path, owner] = False

    def set_presubscriptions(self, owner: str, entries: Sequence[PresubscriptionRecord]) -> None:
        """Replace `owner`'s pre-subscriptions; none removes them."""
        self._filling().presubscriptions[owner] = tuple(entries)

    def put_channel(self, record: ChannelRecord) -> None:
        self._filling().channels[record.owner] = record

    def delete_channel(self, owner: str) -> None:
        """Forget the channel and every event still owed to it."""
        batch = self._filling()
        batch.channels[owner] = None
        batch.events.pop(owner, None)
        batch.event_deletes.pop(owner, None)
        batch.event_wipes.add(owner)

    def put_api_key(self, record: ApiKeyRecord) -> None:
        self._filling().api_keys[record.key] = record

    def delete_api_key(self, key: str) -> None:
        self._filling().api_keys[key] = None

    def put_event(self, record: EventRecord) -> None:
        """Keep an event until delivered, expired, or pushed out by the owner's byte cap."""
        batch = self._filling()
        batch.events.setdefault(record.owner, {})[record.seq] = record
        deletes = batch.event_deletes.get(record.owner)
        if deletes:
            deletes.discard(record.seq)

    def delete_events(self, owner: str, seqs: Sequence[int]) -> None:
        """The channel delivered (or dropped) `owner`'s events `seqs`: forget them."""
        batch = self._filling()
        pending = batch.events.get(owner)
        if pending:
            for seq in seqs:
                pending.pop(seq, None)
        batch.event_deletes.setdefault(owner, set()).update(seqs)

    # ------------------------------------------------------------------------------ commits

    def mark(self) -> int:
        """The batch that holds the latest write recorded (the commits' sequence number)."""
        last = self._batches[-1]
        return last.seq if last.count else last.seq - 1

    def is_durable(self, mark: int) -> bool:
        return self._committed >= mark

    def backlog(self) -> int:
        return self.writes - self._committed_writes

    async def durable(self, mark: int | None = None) -> None:
        """Return once every write recorded before this call (or before `mark`) is committed.

        With nothing pending it returns at once, without a checkpoint (like the memory store).
        It needs `run` to be running.

        Raises:
            StoreError: the writer failed; what it held is not durable.
        """
        target = self.mark() if mark is None else mark
        while self._committed < target:
            if self._failure is not None:
                raise self._failure
            await self._committed_event.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one writer: commit batches in order, one transaction each, in a worker thread.

        Cancelled, it first commits what is already recorded (shielded), then returns.

        Raises:
            StoreError: a transaction failed (disk full, I/O error, damaged file). Waiting
                `durable()` calls raise it too; nothing is retried or dropped silently.
        """
        task_status.started()
        try:
            while True:
                if not self._batches[0].count:
                    self._kick = trio.Event()
                    await self._kick.wait()
                if self.commit_interval:
                    await trio.sleep_until(self._last_commit + self.commit_interval)
                self._last_commit = trio.current_time()
                await self._commit_next()
        finally:
            if self._failure is None and self._batches[0].count:
                with trio.CancelScope(shield=True):
                    while self._batches[0].count:
                        await self._commit_next()

    async def _commit_next(self) -> None:
        batches = self._batches
        batch = batches.popleft()
        if not batches:
            batches.append(_Batch(batch.seq + 1))
        try:
            with trio.CancelScope(shield=True):  # a commit that happened must be counted
                await trio.to_thread.run_sync(self._write, batch)
        except sqlite3.Error as exc:
            self._failure = StoreError(
                f"{self.path}: a write failed; writes after batch {self._committed} are not "
                f"durable: {exc}"
            )
            self._committed_event.set()
            raise self._failure from exc
        self._committed = batch.seq
        self._committed_writes += batch.count
        self.transactions += 1
        committed, self._committed_event = self._committed_event, trio.Event()
        committed.set()

    def _write(self, b: _Batch) -> None:
        """One transaction with everything in `b` (in a worker thread)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if b.regs:
                db.executemany(
                    "DELETE FROM registrations WHERE endpoint = ?",
                    [(ep,) for ep, r in b.regs.items() if r is None],
                )
                db.executemany(
                    _PUT_REGISTRATION,
                    [msgspec.structs.astuple(r) for r in b.regs.values() if r is not None],
                )
            if b.wiped:
                wiped = [(e,) for e in b.wiped]
                db.executemany("DELETE FROM commands WHERE endpoint = ?", wiped)
                db.executemany("DELETE FROM next_mids WHERE endpoint = ?", wiped)
            if b.next_mids:
                db.executemany("INSERT OR REPLACE INTO next_mids VALUES (?, ?)",
                               b.next_mids.items())  # fmt: skip
            if b.cmd_deletes:
                db.executemany(
                    "DELETE FROM commands WHERE endpoint = ? AND async_id = ?", b.cmd_deletes
                )
            if b.cmds:
                db.executemany(_PUT_COMMAND, [msgspec.structs.astuple(c) for c in b.cmds.values()])
            if b.subs:
                db.executemany(
                    "DELETE FROM subscriptions WHERE endpoint = ? AND path = ? AND owner = ?",
                    [k for k, put in b.subs.items() if not put],
                )
                db.executemany(
                    "INSERT OR IGNORE INTO subscriptions VALUES (?, ?, ?)",
                    [k for k, put in b.subs.items() if put],
                )
            self._write_settings(db, b)
            if b.event_wipes or b.event_deletes or b.events:
                self._write_events(db, b)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _write_settings(db: sqlite3.Connection, b: _Batch) -> None:
        for owner, entries in b.presubscriptions.items():
            db.execute("DELETE FROM presubscriptions WHERE owner = ?", (owner,))
            db.executemany(
                "INSERT INTO presubscriptions VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        owner,
                        i,
                        e.endpoint_name,
                        e.endpoint_type,
                        _json_encode(e.resource_paths).decode(),
                    )
                    for i, e in enumerate(entries)
                ],
            )
        for owner, channel in b.channels.items():
            if channel is None:
                db.execute("DELETE FROM channels WHERE owner = ?", (owner,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO channels VALUES (?, ?, ?, ?, ?, ?)",
                    (owner, channel.mechanism, channel.created_at, channel.url,
                     _json_encode(channel.headers).decode(), channel.serialization),
                )  # fmt: skip
        for key, api_key in b.api_keys.items():
            if api_key is None:
                db.execute("DELETE FROM api_keys WHERE key = ?", (key,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO api_keys VALUES (?, ?, ?)",
                    (key, api_key.owner, api_key.created_at),
                )

    def _write_events(self, db: sqlite3.Connection, b: _Batch) -> None:
        for owner in b.event_wipes:
            db.execute("DELETE FROM events WHERE owner = ?", (owner,))
            db.execute("DELETE FROM event_bytes WHERE owner = ?", (owner,))
        if b.event_deletes:
            db.executemany(
                "DELETE FROM events WHERE owner = ? AND seq = ?",
                [(owner, seq) for owner, seqs in b.event_deletes.items() for seq in seqs],
            )
        rows = [msgspec.structs.astuple(e) for per in b.events.values() for e in per.values()]
        if not rows:
            return
        db.executemany(_PUT_EVENT, rows)
        db.execute("DELETE FROM events WHERE created_at < ?", (self.clock() - self.event_lifetime,))
        cap = self.event_bytes_cap
        for owner in b.events:
            (size,) = db.execute(
                "SELECT bytes FROM event_bytes WHERE owner = ?", (owner,)
            ).fetchone() or (0,)
            if size > cap:
                db.execute(_CAP_EVENTS, (owner, cap))


def _open(path: Path, *, check: bool) -> tuple[sqlite3.Connection, int]:
    """Lock `path`, open it read-write, refuse what is not ours, migrate to the current
    schema. Returns the connection and the lock's file descriptor."""
    try:  # the OS says plainly why a file cannot be opened; SQLite does not
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except FileNotFoundError as exc:
        raise StoreError(f"{path}: its directory {path.parent} does not exist") from exc
    except IsADirectoryError as exc:
        raise StoreError(f"{path}: is a directory, not a store file") from exc
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the store for reading and writing: "
                         f"{exc.strerror}") from exc  # fmt: skip
    lock = _lock(path)
    try:
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: cannot open the store: {exc}") from exc
        try:
            _prepare(db, path, check=check)
        except BaseException:
            db.close()
            raise
    except BaseException:
        os.close(lock)
        raise
    return db, lock


def _lock(path: Path) -> int:
    """Take the store's lock file (`<store>.lock`, holding our pid) or say who holds it.

    Two daemons on one store would each believe their queues are the truth: one is refused.
    An advisory `flock`, released by the kernel when the process dies (kill -9 included).
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{lock_path}: cannot open the lock file: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"{path}: in use by another process (pid {holder}): one daemon per data directory"
        ) from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _prepare(db: sqlite3.Connection, path: Path, *, check: bool) -> None:
    try:
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        (objects,) = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a dm-actor store, or damaged: {exc}") from exc
    if app_id != schema.APPLICATION_ID and (app_id or version or objects):
        raise StoreError(
            f"{path}: a SQLite database, but not a dm-actor store "
            f"(application_id {app_id:#x}, user_version {version})"
        )
    if version > schema.VERSION:
        raise StoreError(
            f"{path}: written by a newer dm-actor (schema version {version}; this one knows "
            f"versions up to {schema.VERSION}); refusing to open it"
        )
    try:
        (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")  # a backup or a checkpoint may hold a lock
        db.execute("PRAGMA journal_size_limit = 67108864")
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot write the store: {exc}") from exc
    if mode != "wal":
        raise StoreError(f"{path}: the file system does not allow WAL mode ({mode})")
    for target in range(version + 1, schema.VERSION + 1):
        _migrate(db, path, target)
    if check:
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: the store is damaged: {exc}") from exc
        if problems != ["ok"]:
            raise StoreError(f"{path}: the store is damaged: {'; '.join(problems)}")


def _migrate(db: sqlite3.Connection, path: Path, target: int) -> None:
    try:
        db.executescript(
            f"BEGIN IMMEDIATE; {schema.MIGRATIONS[target - 1]} "
            f"PRAGMA application_id = {schema.APPLICATION_ID}; "
            f"PRAGMA user_version = {target}; COMMIT;"
        )
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise StoreError(f"{path}: migrating to schema version {target} failed: {exc}") from exc


def _group(rows: Any) -> dict[str, list[tuple[str, str]]]:
    grouped: dict[str, list[tuple[str, str]]] = {}
    for endpoint, path, owner in rows:
        grouped.setdefault(endpoint, []).append((path, owner))
    return grouped


def _presubscriptions(rows: Any) -> dict[str, list[PresubscriptionRecord]]:
    grouped: dict[str, list[PresubscriptionRecord]] = {}
    for owner, _position, name, kind, paths in rows:
        grouped.setdefault(owner, []).append(
            PresubscriptionRecord(name, kind, _decode_paths(paths))
        )
    return grouped


def _registration(
    endpoint: str, reg_id: str, lifetime: int, version: str, binding: str, queue_mode: int,
    links: str, registered_at: float, updated_at: float, endpoint_type: str | None,
) -> RegistrationRecord:  # fmt: skip
    return RegistrationRecord(endpoint, reg_id, lifetime, version, binding, bool(queue_mode),
                              links, registered_at, updated_at, endpoint_type)  # fmt: skip


def _command(
    endpoint: str, async_id: str, method: str, uri: str, payload: bytes,
    content_format: int | None, accept: int | None, accepted_at: float, expires_at: float,
    attempts_left: int, attempts: int, last_attempt_at: float | None, observe: int, owner: str,
    mid: int | None, token: bytes | None,
) -> CommandRecord:  # fmt: skip
    return CommandRecord(endpoint, async_id, method, uri, payload, content_format, accept,
                         accepted_at, expires_at, attempts_left, attempts, last_attempt_at,
                         bool(observe), owner, mid, token)  # fmt: skip
