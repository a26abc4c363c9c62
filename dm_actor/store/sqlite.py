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

Write failures (docs/operations.md, "When the disk fails"): a full disk, a read-only file
system or a lock held past `busy_timeout` is retried. The batch is kept, retried with back-off
(0.1 s doubling to 5 s) until it commits, and meanwhile `healthy()` is False, so that the
server accepts nothing new it would have to store; later writes coalesce into one batch, so
memory is bounded by what they are about (devices, commands), not by how often they change.
Any other error (an I/O error, a failed fsync, a damaged file) is not retried: after a
failed fsync Linux may drop the unwritten pages and report the next fsync as successful, so
nothing written since could be trusted. The writer raises `StoreFailed` and the process
stops; a restart recovers what was committed.

Events other than AsyncIDResponses (which stand for an accepted command) are stored only
within `event_budget` bytes in total and while the file system keeps `disk_headroom` bytes
free: past either, they are refused (counted in `events_refused`, logged once), so that an
application nobody reads cannot fill the disk that registrations and commands need.

This module never decides what to store or when a write must be durable; the actors do.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import math
import os
import sqlite3
import time
from itertools import starmap
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from dm_actor.histogram import COMMIT_BOUNDS, Histogram
from dm_actor.store import schema
from dm_actor.store.base import (
    EVENT_BYTES_CAP,
    EVENT_LIFETIME,
    KEPT_EVENT_KIND,
    AnswerRecord,
    ApiKeyRecord,
    ChannelRecord,
    CommandRecord,
    CredentialRecord,
    EventRecord,
    PresubscriptionRecord,
    RegistrationRecord,
    Snapshot,
    StoreError,
    StoreFailed,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


log = logging.getLogger(__name__)

#: Primary result codes after which a write is retried: the disk is full, the file or file
#: system is read-only, another program holds a lock past `busy_timeout`. Anything else (an
#: I/O error above all) is not retryable.
_RETRYABLE = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_READONLY: "the store cannot be written (read-only)",
    sqlite3.SQLITE_BUSY: "another program holds the store's lock",
    sqlite3.SQLITE_LOCKED: "another program holds the store's lock",
}
RETRY_FIRST, RETRY_MAX = 0.1, 5.0  # seconds between attempts at a failed batch (doubling)
#: The default total of events kept (other than AsyncIDResponses), and the free disk space
#: below which they are not stored at all (docs/operations.md, "Disk space").
EVENT_BUDGET = 256 * 2**20
DISK_HEADROOM = 64 * 2**20

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

_EVENT_TOTAL = "SELECT coalesce(sum(bytes), 0) FROM event_bytes"
_ANSWER_FIELDS = AnswerRecord.__struct_fields__
_PUT_ANSWER = (
    f"INSERT OR REPLACE INTO answers ({', '.join(_ANSWER_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_ANSWER_FIELDS))})"
)

_json_encode = msgspec.json.encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode
_decode_paths = msgspec.json.Decoder(tuple[str, ...]).decode


class _Batch:
    """The writes of one transaction, coalesced by key."""

    __slots__ = (
        "answers",
        "api_keys",
        "channels",
        "cmd_deletes",
        "cmd_index",
        "cmds",
        "count",
        "credentials",
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
        self.credentials: dict[str, CredentialRecord | None] = {}  # endpoint -> (None: delete)
        self.event_wipes: set[str] = set()  # owners whose events go (not AsyncIDResponses)
        self.event_deletes: dict[str, set[int]] = {}  # owner -> seqs to forget, before the puts
        self.events: dict[str, dict[int, EventRecord]] = {}  # owner -> seq ->
        self.answers: dict[tuple[str, str], AnswerRecord | None] = {}  # None: delete


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
        event_budget: the bytes of undelivered events kept in total, AsyncIDResponses aside;
            further events are refused (`events_refused`).
        disk_headroom: while the file system has less free space than this, no event but an
            AsyncIDResponse is stored, so registrations and commands still fit.
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
        event_budget: int = EVENT_BUDGET,
        disk_headroom: int = DISK_HEADROOM,
        check: bool = True,
    ) -> None:
        self.path = Path(path)
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self.clock = clock
        self.event_lifetime = event_lifetime
        self.event_bytes_cap = event_bytes_cap
        self.transactions = 0  # committed by the writer
        self.commit_latency = Histogram(COMMIT_BOUNDS)  # seconds per transaction (/metrics)
        self.writes = 0  # recorded by put_*/delete_*/set_*, before coalescing
        self._committed_writes = 0
        self._batches = collections.deque([_Batch(1)])  # the last one is being filled
        self._committed = 0  # seq of the last committed batch
        self._committed_event = trio.Event()
        self._kick = trio.Event()  # set when a write is recorded
        self._failure: StoreError | None = None
        self._last_commit = -math.inf  # when the last transaction started (Trio time)
        self.event_budget = event_budget
        self.disk_headroom = disk_headroom
        self._refused_early = 0  # events refused by `put_event` (the Trio thread)
        self._refused_late = 0  # ... by the writer (its worker thread)
        self.write_retries = 0  # transactions that failed with a retryable error
        self._refusing = False  # events are refused (set and cleared by the writer)
        self._problem: str | None = None  # why writes fail now (retryable), logged once
        self._problem_since = 0.0
        self._db, self._lock = _open(self.path, check=check)
        try:
            (total,) = self._db.execute(_EVENT_TOTAL).fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc
        self._event_total: int = total  # bytes of stored events (the writer keeps it)

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
                registrations=_load(db, RegistrationRecord, "registrations"),
                commands=_load(db, CommandRecord, "commands"),
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
                credentials=[
                    CredentialRecord(*r)
                    for r in db.execute(
                        "SELECT endpoint, psk_identity, psk_key, created_at FROM credentials "
                        "ORDER BY endpoint"
                    )
                ],
                answers=[
                    AnswerRecord(*r)
                    for r in db.execute(
                        f"SELECT {', '.join(_ANSWER_FIELDS)} FROM answers WHERE forget_at > ? "
                        "ORDER BY finished_at, seq",
                        (self.clock(),),
                    )
                ],
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc

    # ----------------------------------------------------------------------- buffered writes

    def _filling(self) -> _Batch:
        batch = self._batches[-1]
        # while writes fail, they all coalesce into one batch: memory is bounded by what
        # they are about, not by how often it changes (an Update a minute for a day)
        if batch.count >= self.max_batch and self._problem is None:
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
        """Forget the channel and the events still owed to it, but its AsyncIDResponses:
        each stands for a 202, owed to the owner's next channel."""
        batch = self._filling()
        batch.channels[owner] = None
        pending = batch.events.get(owner)
        if pending:
            kept = {seq: e for seq, e in pending.items() if e.kind == KEPT_EVENT_KIND}
            if kept:
                batch.events[owner] = kept
            else:
                del batch.events[owner]
        batch.event_wipes.add(owner)

    def put_api_key(self, record: ApiKeyRecord) -> None:
        self._filling().api_keys[record.key] = record

    def delete_api_key(self, key: str) -> None:
        self._filling().api_keys[key] = None

    def put_credential(self, record: CredentialRecord) -> None:
        self._filling().credentials[record.endpoint] = record

    def delete_credential(self, endpoint: str) -> None:
        self._filling().credentials[endpoint] = None

    def put_event(self, record: EventRecord) -> None:
        """Keep an event until delivered, expired, or pushed out by the owner's byte cap.

        Past the event budget or the disk headroom (or while writes fail), an event other
        than an AsyncIDResponse is refused and counted: it lives only in memory."""
        if (self._refusing or self._problem is not None) and record.kind != KEPT_EVENT_KIND:
            self._refused_early += 1
            return
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

    def put_answer(self, record: AnswerRecord) -> None:
        """Remember a finished command's answer until its `forget_at` (the transactions that
        write answers also drop those whose `forget_at` passed)."""
        self._filling().answers[record.owner, record.async_id] = record

    def delete_answers(self, owner: str, async_ids: Sequence[str]) -> None:
        answers = self._filling().answers
        for async_id in async_ids:
            answers[owner, async_id] = None

    # ------------------------------------------------------------------------------ commits

    def mark(self) -> int:
        """The batch that holds the latest write recorded (the commits' sequence number)."""
        last = self._batches[-1]
        return last.seq if last.count else last.seq - 1

    def is_durable(self, mark: int) -> bool:
        return self._committed >= mark

    def backlog(self) -> int:
        return self.writes - self._committed_writes

    @property
    def events_refused(self) -> int:
        """Events not stored since the start: past the event budget or the disk headroom, or
        while writes failed (AsyncIDResponses are never refused)."""
        return self._refused_early + self._refused_late

    def healthy(self) -> bool:
        """False while the last transaction failed with a retryable error (disk full,
        read-only, locked); true again once a transaction commits."""
        return self._problem is None

    def problem(self) -> str | None:
        return self._problem

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

        A transaction that fails with a retryable error (disk full, read-only, locked) is
        retried with back-off until it commits; `healthy()` is False meanwhile. Cancelled,
        it first commits what is already recorded (shielded; while writes fail, one try),
        then returns.

        Raises:
            StoreFailed: a transaction failed with an error that is not retryable (an I/O
                error, a failed fsync, a damaged file). Waiting `durable()` calls raise it
                too; nothing is dropped silently.
        """
        task_status.started()
        delay = RETRY_FIRST
        try:
            while True:
                if not self._batches[0].count:
                    self._kick = trio.Event()
                    await self._kick.wait()
                if self.commit_interval:
                    await trio.sleep_until(self._last_commit + self.commit_interval)
                self._last_commit = trio.current_time()
                if await self._commit_next():
                    delay = RETRY_FIRST
                else:
                    await trio.sleep(delay)
                    delay = min(2 * delay, RETRY_MAX)
        finally:
            if self._failure is None and self._batches[0].count:
                with trio.CancelScope(shield=True):
                    while self._batches[0].count:
                        if not await self._commit_next():
                            log.error(
                                "store %s: stopping with %d writes not committed (%s); none "
                                "of them was acknowledged", self.path, self.backlog(),
                                self._problem,
                            )  # fmt: skip
                            break

    async def _commit_next(self) -> bool:
        """Commit the oldest batch; False when it failed with a retryable error (it stays
        first, to be retried).

        Raises:
            StoreFailed: any other error.
        """
        batches = self._batches
        batch = batches[0]
        if len(batches) == 1:  # writes from now on go to the next batch
            batches.append(_Batch(batch.seq + 1))
        started = trio.current_time()
        try:
            with trio.CancelScope(shield=True):  # a commit that happened must be counted
                await trio.to_thread.run_sync(self._write, batch)
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _RETRYABLE:
                self._write_failed(exc, code & 0xFF)
                return False
            name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
            self._failure = StoreFailed(
                f"{self.path}: a write failed and cannot be retried: {exc} ({name}); writes "
                f"after batch {self._committed} are not durable and were not acknowledged; "
                f"stopping (a restart recovers what was committed)"
            )
            self._committed_event.set()
            raise self._failure from exc
        batches.popleft()
        self._batch_committed(batch, started)
        return True

    def _batch_committed(self, batch: _Batch, started: float) -> None:
        """`batch` is durable (committed at `started`): count it, say so if the store was
        failing, and wake whoever waits for it (SQLite's and PostgreSQL's commit loops)."""
        if self._problem is not None:
            log.warning(
                "store %s: writable again after %.1f s (%d failed attempts); committing the "
                "%d writes held", self.path, trio.current_time() - self._problem_since,
                self.write_retries, self.writes - self._committed_writes,
            )  # fmt: skip
            self._problem = None
        self._committed = batch.seq
        self._committed_writes += batch.count
        self.transactions += 1
        self.commit_latency.observe(trio.current_time() - started)
        committed, self._committed_event = self._committed_event, trio.Event()
        committed.set()

    def _write_failed(self, exc: sqlite3.Error, code: int) -> None:
        self.write_retries += 1
        if self._problem is not None:
            return
        self._problem = f"{self.path}: {_RETRYABLE[code]} ({exc})"
        self._problem_since = trio.current_time()
        log.error(
            "store %s: %s (%s, %s): %d writes wait in memory and are retried until they "
            "commit; meanwhile new commands get 503 STORE_IS_BEHIND and Registers are shed",
            self.path, _RETRYABLE[code], exc,
            getattr(exc, "sqlite_errorname", "?"), self.backlog(),
        )  # fmt: skip

    def _write(self, b: _Batch) -> None:
        """One transaction with everything in `b` (in a worker thread)."""
        db = self._db
        if db.in_transaction:  # a failed ROLLBACK left one open
            db.execute("ROLLBACK")
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
            if b.answers:
                self._write_answers(db, b)
            total = self._event_total
            if b.event_wipes or b.event_deletes or b.events or self._refusing:
                total = self._write_events(db, b)
            db.execute("COMMIT")
            self._event_total = total
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    log.debug("rollback failed after a failed write", exc_info=True)
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
        if b.credentials:  # every row of these endpoints goes first: an identity moved
            # from one endpoint to another within the batch is unique again at the inserts
            db.executemany(
                "DELETE FROM credentials WHERE endpoint = ?", [(e,) for e in b.credentials]
            )
            db.executemany(
                "INSERT INTO credentials VALUES (?, ?, ?, ?)",
                [msgspec.structs.astuple(c) for c in b.credentials.values() if c is not None],
            )

    def _write_answers(self, db: sqlite3.Connection, b: _Batch) -> None:
        db.executemany(
            "DELETE FROM answers WHERE owner = ? AND async_id = ?",
            [key for key, a in b.answers.items() if a is None],
        )
        puts = [msgspec.structs.astuple(a) for a in b.answers.values() if a is not None]
        if puts:
            db.executemany(_PUT_ANSWER, puts)
            db.execute("DELETE FROM answers WHERE forget_at <= ?", (self.clock(),))

    def _write_events(self, db: sqlite3.Connection, b: _Batch) -> int:
        """Write `b`'s events within the budget; returns the bytes of events stored after."""
        for owner in b.event_wipes:  # (AsyncIDResponses stay: see `delete_channel`)
            db.execute("DELETE FROM events WHERE owner = ? AND kind != ?", (owner, KEPT_EVENT_KIND))
            db.execute("DELETE FROM event_bytes WHERE owner = ? AND bytes <= 0", (owner,))
        if b.event_deletes:
            db.executemany(
                "DELETE FROM events WHERE owner = ? AND seq = ?",
                [(owner, seq) for owner, seqs in b.event_deletes.items() for seq in seqs],
            )
        rows = self._within_budget(
            db, [msgspec.structs.astuple(e) for per in b.events.values() for e in per.values()]
        )
        if rows:
            db.executemany(_PUT_EVENT, rows)
            db.execute(
                "DELETE FROM events WHERE created_at < ?", (self.clock() - self.event_lifetime,)
            )
            cap = self.event_bytes_cap
            for owner in b.events:
                (size,) = db.execute(
                    "SELECT bytes FROM event_bytes WHERE owner = ?", (owner,)
                ).fetchone() or (0,)
                if size > cap:
                    db.execute(_CAP_EVENTS, (owner, cap))
        total: int = db.execute(_EVENT_TOTAL).fetchone()[0]
        return total

    def _within_budget(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Any]:
        """The rows (owner, seq, kind, item, created_at) to store: AsyncIDResponses always,
        other events while the total stays within the budget and the disk keeps its headroom.
        Sets or clears `_refusing` (logged once each way)."""
        (total,) = db.execute(_EVENT_TOTAL).fetchone()
        free = self._disk_free()
        low = free is not None and free < self.disk_headroom
        kept: list[Any] = []
        refused = 0
        for row in rows:
            size = len(row[3])
            if row[2] == KEPT_EVENT_KIND or (not low and total + size <= self.event_budget):
                kept.append(row)
                total += size
            else:
                refused += 1
        self._refused_late += refused
        # refuse at `put_event` from now on, until the total is below 90 % of the budget
        refusing = low or refused > 0 or (self._refusing and total > 0.9 * self.event_budget)
        if refusing != self._refusing:
            self._refusing = refusing
            if refusing:
                log.warning(
                    "store %s: events (other than AsyncIDResponses) are no longer stored: "
                    "%d bytes stored (budget %d), %s bytes free on the disk (headroom %d); "
                    "they are delivered while the server runs but lost in a restart",
                    self.path, total, self.event_budget, free, self.disk_headroom,
                )  # fmt: skip
            else:
                log.warning(
                    "store %s: events are stored again (%d were refused)",
                    self.path, self.events_refused,
                )  # fmt: skip
        return kept

    def _disk_free(self) -> int | None:
        return _free_bytes(self.path.parent)


def _open(path: Path, *, check: bool) -> tuple[sqlite3.Connection, int]:
    """Lock `path`, open it read-write, refuse what is not ours, migrate to the current
    schema. Returns the connection and the lock's file descriptor."""
    if os.path.isdir(path.parent) and (why := read_only(path.parent)) is not None:
        raise StoreError(
            f"{path}: its directory {path.parent} is read-only ({why}); the store must "
            f"write there (its -wal, -shm and .lock files)"
        )
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
            db = _connect(path, check=check)
        except StoreError:
            if not _disk_full(path.parent) or not _release_reserve(path):
                raise
            db = _connect(path, check=check)  # with the reserve's space
        _keep_reserve(path)
    except BaseException:
        os.close(lock)
        raise
    return db, lock


def _connect(path: Path, *, check: bool) -> sqlite3.Connection:
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open the store: {exc}") from exc
    try:
        _prepare(db, path, check=check)
    except BaseException:
        db.close()
        raise
    return db


#: A file of this size is kept next to the store (`<store>.reserve`) while the disk has room
#: for it: a restart on a full disk deletes it, so that SQLite can create its -wal and -shm
#: files and the server starts (reads work, writes wait) instead of exiting again and again.
RESERVE_BYTES = 2**20


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(directory: Path) -> bool:
    free = _free_bytes(directory)
    return free is not None and free < 128 * 1024


def _release_reserve(path: Path) -> bool:
    reserve = path.with_name(path.name + ".reserve")
    try:
        reserve.unlink()
    except OSError:
        return False
    log.warning(
        "%s: the disk is full: deleted the reserve file %s (%d bytes) so that the store can "
        "open; writes wait until space is freed", path, reserve, RESERVE_BYTES,
    )  # fmt: skip
    return True


def _keep_reserve(path: Path) -> None:
    """Create the reserve file if it is missing and the disk has room for it twice over."""
    reserve = path.with_name(path.name + ".reserve")
    free = _free_bytes(path.parent)
    if reserve.exists() or free is None or free < 2 * RESERVE_BYTES:
        return
    try:
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        reserve.unlink(missing_ok=True)
        return
    os.close(fd)


def _open_failure(path: Path, exc: sqlite3.Error) -> str:
    """Why a store file could not be read at open, without calling a good store damaged."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN) and (
        _disk_full(path.parent)
    ):
        return (
            f"cannot open the store: the disk is full ({_free_bytes(path.parent)} bytes "
            f"free; SQLite must create its -wal and -shm files): {exc}"
        )
    if code == sqlite3.SQLITE_IOERR:
        return f"cannot read the store: an I/O error ({exc})"
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
        return f"cannot open the store: {exc}"
    return f"not a dm-actor store, or damaged: {exc}"


def read_only(directory: Path) -> str | None:
    """Why files cannot be created and written in `directory` (a read-only file system, no
    write permission for this process), or None."""
    try:
        flags = os.statvfs(directory).f_flag
    except OSError as exc:
        return exc.strerror or str(exc)
    if flags & os.ST_RDONLY:
        return "a read-only file system"
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        return "no write permission"
    return None


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
    try:  # (the pid is for the operator: a full disk must not stop the start)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        log.warning("%s: cannot write our pid (%s)", lock_path, exc.strerror)
    return fd


def _prepare(db: sqlite3.Connection, path: Path, *, check: bool) -> None:
    try:
        (app_id,) = db.execute("PRAGMA application_id").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
        (objects,) = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: {_open_failure(path, exc)}") from exc
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


R = TypeVar("R", RegistrationRecord, CommandRecord)


def _load(db: sqlite3.Connection, kind: type[R], table: str) -> list[R]:
    """Every row of `table` as a `kind`, in rowid order (for commands, the order of their
    acceptance): the columns are named as `kind`'s fields, and a bool, which SQLite keeps
    as an integer, is a bool again."""
    flags = [f.name for f in msgspec.structs.fields(kind) if f.type is bool]
    rows = db.execute(f"SELECT {', '.join(kind.__struct_fields__)} FROM {table} ORDER BY rowid")
    replace = msgspec.structs.replace
    return [replace(r, **{f: bool(getattr(r, f)) for f in flags}) for r in starmap(kind, rows)]
