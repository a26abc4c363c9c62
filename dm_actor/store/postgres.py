"""The PostgreSQL `Store` (`[server] store = "postgres"`): the SQLite store's semantics, kept
in a PostgreSQL database.

It is `SqliteStore` with another engine under it: the same buffered writes coalesced by key,
the same batches, the same writer task committing one transaction per batch in a worker thread
(group commit: many 202s share one commit), the same `mark()`/`is_durable()`/`durable()`
contract, the same event budget and per-owner cap. Only the transaction, the reading and the
opening are PostgreSQL's, with the synchronous psycopg 3 driver.

Durability: every session sets `synchronous_commit = on`, so a commit returns once PostgreSQL
flushed its WAL (and, with synchronous standbys configured, once they have it): a 202 is sent
only after that. The server's own `fsync` must be on (PostgreSQL's default).

Opening: one dm-actor daemon per database, or the nodes of one cluster. The writer's session
holds an advisory lock (`pg_try_advisory_lock(APPLICATION_ID)`; cluster nodes, `fencing` set:
`pg_try_advisory_lock_shared`): a second daemon, or a single daemon and a cluster on one
database, is refused with `StoreError`. The
schema is versioned in the table `dm_actor_store` (`application_id`, `version`); a database
whose current schema holds other tables but not this one is refused as foreign, a newer
version is refused, an older one is migrated in place, one transaction per version (the
migration path is the creation path, as with SQLite: never edit a released version's DDL, add
the next). Tables go to the session's current schema (`search_path`): give dm-actor its own
database, or its own schema with `options=-csearch_path=dm_actor` in the DSN.

Cluster mode (schema version 2): registrations, commands, subscriptions and next_mids carry
the `slot` of their endpoint (`dm_actor.cluster.slots.slot_of(endpoint, slot_count)`, indexed),
written by every put; `dm_actor_store.slot_count` says which count the column was computed
with, and a single daemon opened with another count computes it again (a cluster node refuses
to). `load_slots(slots)` and `load_events(owners)` read on a second connection (no lock), in a
worker thread while the writer runs. Fencing: every batch first locks, FOR SHARE and in slot
order, the `slot_leases` rows (`dm_actor.store.coordinator`) of the slots of the endpoints it
writes, requiring this node's name and the epochs of its `fencing.held` (copied in the Trio
thread before the batch goes to the worker). A slot not held, or whose row names another node
or epoch, rolls the batch back with `Fenced` (the node stops: another node owns the slot); a
lease still this node's but expired (a late renewal) keeps the batch and retries it, like a
lost connection, until the renewal or a takeover decides. Channels, API keys, events and
answers' owners are not slot data: not fenced (answers are, by their endpoint).

Write failures: losing the connection (the server restarting, a failover, the network), a full
disk on the server, a read-only (standby) server, a lock or deadlock are retried like SQLite's
full disk: the batch is kept and retried with back-off (reconnecting first), `healthy()` is
False meanwhile (503 `STORE_IS_BEHIND`, shed Registers). A batch whose commit's outcome was
lost with the connection is simply written again: every write in it is an upsert or a delete
by key, so applying it twice leaves what applying it once did. Any other error (a constraint
the data breaks, a damaged table) is not retried: `StoreFailed`, the process stops.

The free disk space is the database server's, which this process cannot see: the event
budget (`event_budget`) applies, `disk_headroom` does not.

Text: PostgreSQL's cannot hold NUL, which SQLite's can: a NUL in a stored string is written as
U+FFFD (and a lone surrogate as "?"), so that what a peer managed to put in a string never
fails a batch.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import msgspec
import psycopg
import psycopg.conninfo
import psycopg.errors
import trio
from psycopg.adapt import Dumper

from dm_actor.cluster.slots import DEFAULT_SLOTS, slot_of
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
    RegistrationRecord,
    Snapshot,
    StoreError,
    StoreFailed,
)
from dm_actor.store.sqlite import EVENT_BUDGET, SqliteStore, _Batch, _group, _presubscriptions

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable

log = logging.getLogger(__name__)
_R = TypeVar("_R")

#: Text compares byte by byte (as SQLite's BINARY), whatever the database's collation.
_T = 'TEXT COLLATE "C"'

#: Version 1: everything SQLite's schema version 7 holds. `position` keeps the order of
#: acceptance of commands (an upsert keeps it) and of the last put of registrations, as
#: SQLite's rowid does.
V1 = f"""
CREATE TABLE dm_actor_store (
    application_id BIGINT NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE registrations (
    endpoint {_T} PRIMARY KEY,
    reg_id {_T} NOT NULL,
    lifetime BIGINT NOT NULL,
    lwm2m_version {_T} NOT NULL,
    binding {_T} NOT NULL,
    queue_mode BOOLEAN NOT NULL,
    links {_T} NOT NULL,
    registered_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    endpoint_type {_T},
    address {_T},
    position BIGSERIAL NOT NULL
);
CREATE TABLE commands (
    endpoint {_T} NOT NULL,
    async_id {_T} NOT NULL,
    method {_T} NOT NULL,
    uri {_T} NOT NULL,
    payload BYTEA NOT NULL,
    content_format INTEGER,
    accept INTEGER,
    accepted_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    attempts_left INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_attempt_at DOUBLE PRECISION,
    observe BOOLEAN NOT NULL,
    owner {_T} NOT NULL,
    mid INTEGER,
    token BYTEA,
    position BIGSERIAL NOT NULL,
    PRIMARY KEY (endpoint, async_id)
);
CREATE TABLE subscriptions (
    endpoint {_T} NOT NULL,
    path {_T} NOT NULL,
    owner {_T} NOT NULL,
    PRIMARY KEY (endpoint, path, owner)
);
CREATE TABLE presubscriptions (
    owner {_T} NOT NULL,
    position INTEGER NOT NULL,
    endpoint_name {_T},
    endpoint_type {_T},
    resource_paths {_T} NOT NULL,
    PRIMARY KEY (owner, position)
);
CREATE TABLE channels (
    owner {_T} PRIMARY KEY,
    mechanism {_T} NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    url {_T},
    headers {_T} NOT NULL,
    serialization {_T}
);
CREATE TABLE api_keys (
    key {_T} PRIMARY KEY,
    owner {_T} NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE events (
    owner {_T} NOT NULL,
    seq BIGINT NOT NULL,
    kind {_T} NOT NULL,
    item BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (owner, seq)
);
CREATE INDEX events_by_age ON events (created_at);
-- per owner at most the event cap (50 MiB by default) plus one event: an INTEGER holds it,
-- and its sum() is a BIGINT (an int, not a Decimal, in Python)
CREATE TABLE event_bytes (
    owner {_T} PRIMARY KEY,
    bytes INTEGER NOT NULL
);
CREATE FUNCTION dm_actor_event_bytes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        UPDATE event_bytes SET bytes = bytes - octet_length(OLD.item) WHERE owner = OLD.owner;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO event_bytes VALUES (NEW.owner, octet_length(NEW.item))
            ON CONFLICT (owner) DO UPDATE SET bytes = event_bytes.bytes + excluded.bytes;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER event_bytes AFTER INSERT OR UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION dm_actor_event_bytes();
CREATE TABLE next_mids (
    endpoint {_T} PRIMARY KEY,
    mid INTEGER NOT NULL
);
CREATE TABLE answers (
    owner {_T} NOT NULL,
    async_id {_T} NOT NULL,
    endpoint {_T} NOT NULL,
    request BYTEA NOT NULL,
    seq BIGINT NOT NULL,
    item BYTEA NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL,
    forget_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (owner, async_id)
);
CREATE INDEX answers_by_end ON answers (forget_at);
CREATE TABLE credentials (
    endpoint {_T} PRIMARY KEY,
    psk_identity {_T} NOT NULL UNIQUE,
    psk_key BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
"""

#: Version 2 (cluster mode): the slot of each per-device row (`slot_of(endpoint, slot_count)`),
#: and the slot count they were computed with (0: not yet; `_pg_prepare` fills them).
V2 = """
ALTER TABLE dm_actor_store ADD COLUMN slot_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE registrations ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE commands ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subscriptions ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE next_mids ADD COLUMN slot INTEGER NOT NULL DEFAULT 0;
CREATE INDEX registrations_by_slot ON registrations (slot);
CREATE INDEX commands_by_slot ON commands (slot);
CREATE INDEX subscriptions_by_slot ON subscriptions (slot);
CREATE INDEX next_mids_by_slot ON next_mids (slot);
"""

#: `MIGRATIONS[n - 1]` takes a database from version n - 1 to n (0: no dm-actor table).
#: Version 3: the node a device's datagrams come in by (`RegistrationRecord.ingress`).
V3 = f"""
ALTER TABLE registrations ADD COLUMN ingress {_T};
"""

MIGRATIONS = (V1, V2, V3)
VERSION = len(MIGRATIONS)
#: The advisory lock one daemon holds on its database (the nodes of a cluster: shared).
LOCK_KEY = schema.APPLICATION_ID
#: The advisory lock serialising the opening (migrations, the slot column) of several nodes.
PREPARE_LOCK = 0x646D4163_0002
#: The coordinator's tables (`dm_actor.store.coordinator`), in the same database.
CLUSTER_TABLES = ("cluster_config", "cluster_nodes", "slot_leases")
#: The tables with a `slot` column.
SLOT_TABLES = ("registrations", "commands", "subscriptions", "next_mids")

#: The first statement of every batch in cluster mode (scale-out.md section 5): the lease
#: rows of the slots the batch touches, this node's, with the epochs it holds, locked FOR
#: SHARE (a takeover waits for the batch; in slot order, as the coordinator locks), and
#: whether each is unexpired.
_FENCE = """
SELECT l.slot, l.expires > clock_timestamp() FROM slot_leases l
  JOIN unnest(%(slots)s::integer[], %(epochs)s::bigint[]) AS t(slot, epoch)
    ON l.slot = t.slot AND l.epoch = t.epoch
 WHERE l.node = %(node)s
 ORDER BY l.slot
   FOR SHARE OF l
"""


class _Expired(Exception):
    """A batch touches slots whose leases still name this node with its epochs but expired
    (its renewal is late: the database was unreachable): not committed now, retried."""


class Fencing(Protocol):
    """What a cluster node's store checks every batch against (a `LeaseBook`)."""

    #: this node's name
    node: str
    #: slot -> epoch: the leases it holds
    held: dict[int, int]


class Fenced(StoreFailed):
    """A batch wrote to slots this node does not hold (any more): another node owns them.
    Nothing of the batch was committed; the node stops."""

    def __init__(self, message: str, slots: Collection[int] = ()) -> None:
        super().__init__(message)
        self.slots = frozenset(slots)


_REG_FIELDS = RegistrationRecord.__struct_fields__
_CMD_FIELDS = CommandRecord.__struct_fields__
_ANSWER_FIELDS = AnswerRecord.__struct_fields__


def _upsert(table: str, fields: tuple[str, ...], key: int, *extra: str) -> str:
    """INSERT of `fields`, replacing the row with the same first `key` fields."""
    sets = [f"{f} = excluded.{f}" for f in (*fields[key:], *extra)]
    return (
        f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({', '.join(['%s'] * len(fields))}) "
        f"ON CONFLICT ({', '.join(fields[:key])}) DO UPDATE SET {', '.join(sets)}"
    )


# a registration put again moves to the end (SQLite's INSERT OR REPLACE takes a new rowid);
# a command put again keeps its place (the order of acceptance)
_PUT_REGISTRATION = _upsert("registrations", (*_REG_FIELDS, "slot"), 1, "position")
_PUT_COMMAND = _upsert("commands", (*_CMD_FIELDS, "slot"), 2)
_PUT_ANSWER = _upsert("answers", _ANSWER_FIELDS, 2)
_PUT_EVENT = _upsert("events", EventRecord.__struct_fields__, 2)
_PUT_CHANNEL = _upsert(
    "channels", ("owner", "mechanism", "created_at", "url", "headers", "serialization"), 1
)
_PUT_API_KEY = _upsert("api_keys", ("key", "owner", "created_at"), 1)
_PUT_NEXT_MID = _upsert("next_mids", ("endpoint", "mid", "slot"), 1)
_PUT_SUBSCRIPTION = (
    "INSERT INTO subscriptions (endpoint, path, owner, slot) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT DO NOTHING"
)
# drop the oldest events of an owner until the newest ones fit in the cap
_CAP_EVENTS = """
DELETE FROM events WHERE owner = %(owner)s AND seq <= (
    SELECT seq FROM (
        SELECT seq, sum(octet_length(item)) OVER (ORDER BY seq DESC) AS newer
        FROM events WHERE owner = %(owner)s
    ) AS sizes WHERE newer > %(cap)s ORDER BY seq DESC LIMIT 1
)
"""
_EVENT_TOTAL = "SELECT coalesce(sum(bytes), 0) FROM event_bytes"

_json_encode = msgspec.json.encode
_decode_headers = msgspec.json.Decoder(dict[str, str]).decode

#: SQLSTATE classes and codes after which a batch is retried, and why (the connection's
#: loss, psycopg.OperationalError, is retried too).
_RETRYABLE_CLASSES = {
    "08": "the database cannot be reached",
    "53": "the database server is out of resources (disk full?)",
    "57": "the database server is shutting down or restarting",
    "40": "a transaction conflict (deadlock or serialization failure)",
}
_RETRYABLE_CODES = {
    "25006": "the database is read-only (a standby?)",
    "55P03": "a lock is held by another session",
}


def _retryable(exc: psycopg.Error) -> str | None:
    """Why a failed batch may succeed later, or None: it never will."""
    state = exc.sqlstate or ""
    if state in _RETRYABLE_CODES:
        return _RETRYABLE_CODES[state]
    if state[:2] in _RETRYABLE_CLASSES:
        return _RETRYABLE_CLASSES[state[:2]]
    if isinstance(exc, psycopg.OperationalError) and not state:  # no answer from the server
        return "the database cannot be reached"
    return None


class _Text(Dumper):
    """Strings as text, with NUL (which PostgreSQL's text cannot hold, and which SQLite keeps)
    replaced by U+FFFD: a NUL that a peer managed to put in a stored string (a link's
    attribute, a header) must not stop the writer with a `DataError`."""

    oid = 25  # text

    def dump(self, obj: str) -> bytes:
        if "\x00" in obj:
            obj = obj.replace("\x00", "\ufffd")
        return obj.encode(errors="replace")  # (a lone surrogate: "?", as it cannot be UTF-8)


def describe(dsn: str) -> str:
    """The DSN for a log line: database, user and host, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgres (an invalid DSN)"
    db = info.get("dbname") or "(default database)"
    host = info.get("host") or "(default host)"
    return f"postgres database {db} on {host}"


class PostgresStore(SqliteStore):
    """A `Store` in a PostgreSQL database. Open it, `load()` it, then run its writer.

    Args:
        dsn: a libpq connection string or URI (`host=/run/postgresql dbname=dm_actor`,
            `postgresql://dm@db.example/dm_actor`); the PG* environment variables and
            `~/.pgpass` fill in what it leaves out (a password belongs there, not here).
        connect_timeout: seconds to wait for a connection, unless the DSN says.
        slot_count: the slot count of the `slot` column (`dm_actor.cluster.slots.slot_of`);
            a database whose rows were written with another count is recomputed on opening,
            except in cluster mode (refused: the cluster's count is fixed).
        fencing: cluster mode: this node's leases (`.node`, `.held`); every batch is
            checked against them (`Fenced`), and the database lock is shared among nodes.
        The others: as `SqliteStore`'s (`disk_headroom` is not known here; `check` runs
        nothing).

    Raises:
        StoreError: the database cannot be reached, is in use by another daemon (or, in
            cluster mode, by a single daemon; single: by a cluster), is not a dm-actor
            database, or was written by a newer schema than this code knows.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_batch: int = 10_000,
        commit_interval: float = 0.0,
        clock: Callable[[], float] = time.time,
        event_lifetime: float = EVENT_LIFETIME,
        event_bytes_cap: int = EVENT_BYTES_CAP,
        event_budget: int = EVENT_BUDGET,
        disk_headroom: int = 0,
        check: bool = True,
        connect_timeout: float = 10.0,
        slot_count: int = DEFAULT_SLOTS,
        fencing: Fencing | None = None,
    ) -> None:
        del check
        if slot_count < 1:
            raise ValueError("slot_count must be positive")
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.slot_count = slot_count
        self.fencing = fencing
        self._reader: psycopg.Connection[Any] | None = None
        self._reader_lock = threading.Lock()
        # (`path` names the store in SqliteStore's log lines)
        self.path = Path(describe(dsn))
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self.clock = clock
        self.event_lifetime = event_lifetime
        self.event_bytes_cap = min(event_bytes_cap, 2**31 - 2**26)  # (event_bytes.bytes)
        self.transactions = 0
        self.commit_latency = Histogram(COMMIT_BOUNDS)
        self.writes = 0
        self._committed_writes = 0
        self._batches = collections.deque([_Batch(1)])
        self._committed = 0
        self._committed_event = trio.Event()
        self._kick = trio.Event()
        self._failure: StoreError | None = None
        self._last_commit = -math.inf
        self.event_budget = event_budget
        self.disk_headroom = disk_headroom
        self._refused_early = 0
        self._refused_late = 0
        self.write_retries = 0
        self._refusing = False
        self._problem: str | None = None
        self._problem_since = 0.0
        self._lock = -1
        self._pg = self._connect(first=True)
        try:
            self._pg_prepare()
            (total,) = _one(self._pg, _EVENT_TOTAL)
            self._pg.commit()
        except psycopg.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self._event_total = int(total)

    def close(self) -> None:
        """Close the connections (and release the daemon's lock). Writes not yet committed
        are lost: stop the writer first."""
        self._pg.close()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()

    # ----------------------------------------------------------------------------- opening

    def _connect(self, *, first: bool = False) -> psycopg.Connection[Any]:
        """A connection holding the daemon's lock (shared in cluster mode), with
        `synchronous_commit = on`."""
        pg = self._open(first=first)
        shared = self.fencing is not None
        try:
            pg.execute("SET synchronous_commit = on")
            try_lock = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
            (locked,) = _one(pg, f"SELECT {try_lock}(%s)", (LOCK_KEY,))
            pg.commit()
        except BaseException:
            pg.close()
            raise
        if not locked:
            pg.close()
            raise StoreError(
                f"{self.path}: in use by another process (it holds the advisory lock "
                f"{LOCK_KEY}): one daemon per database, or the nodes of one cluster "
                f"({'this one is a cluster node' if shared else 'this one is a single daemon'})"
            )
        return pg

    def _open(self, *, first: bool = False) -> psycopg.Connection[Any]:
        """A connection to the database (no lock)."""
        try:
            params: dict[str, Any] = dict(psycopg.conninfo.conninfo_to_dict(self.dsn))
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"postgres: an invalid dsn: {exc}") from exc
        params.setdefault("connect_timeout", max(2, round(self.connect_timeout)))
        params.setdefault("application_name", "dm-actor")
        params["client_encoding"] = "UTF8"  # (`_Text` encodes UTF-8)
        # a dead peer is noticed in ~25 s over TCP instead of the kernel's two hours
        if not str(params.get("host", "/")).startswith("/"):
            params.setdefault("keepalives_idle", 10)
            params.setdefault("keepalives_interval", 5)
            params.setdefault("keepalives_count", 3)
        try:
            pg = psycopg.connect(psycopg.conninfo.make_conninfo("", **params))
        except psycopg.Error as exc:
            if first:
                raise StoreError(f"{self.path}: cannot connect: {exc}".rstrip()) from exc
            raise
        pg.adapters.register_dumper(str, _Text)
        return pg

    def _pg_prepare(self) -> None:
        """Refuse a foreign or newer database; migrate an older one; fill the slot column
        (one node at a time)."""
        pg = self._pg
        pg.execute("SELECT pg_advisory_lock(%s)", (PREPARE_LOCK,))
        pg.commit()
        try:
            self._pg_migrate()
            self._pg_slots()
        finally:
            if not pg.closed and not pg.broken:
                pg.rollback()
                pg.execute("SELECT pg_advisory_unlock(%s)", (PREPARE_LOCK,))
                pg.commit()

    def _pg_migrate(self) -> None:
        pg = self._pg
        (table, where) = _one(pg, "SELECT to_regclass('dm_actor_store'), current_schema()")
        if where is None:
            raise StoreError(f"{self.path}: no schema to create tables in (search_path)")
        if table is None:
            # (the coordinator's tables may come first: `dm_actor.store.coordinator`)
            (others,) = _one(
                pg,
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename <> ALL(%s)",
                (list(CLUSTER_TABLES),),
            )
            if others:
                raise StoreError(
                    f"{self.path}: not a dm-actor database (schema {where} holds {others} "
                    f"other tables and no dm_actor_store)"
                )
            version = 0
        else:
            row = pg.execute("SELECT application_id, version FROM dm_actor_store").fetchone()
            app_id, version = row if row is not None else (0, 0)
            if app_id != schema.APPLICATION_ID:
                raise StoreError(f"{self.path}: not a dm-actor database (application_id "
                                 f"{app_id:#x})")  # fmt: skip
            if version > VERSION:
                raise StoreError(
                    f"{self.path}: written by a newer dm-actor (schema version {version}; "
                    f"this one knows versions up to {VERSION}); refusing to open it"
                )
        pg.commit()
        for target in range(version + 1, VERSION + 1):
            try:
                with pg.transaction():
                    pg.execute(MIGRATIONS[target - 1].encode())
                    if target == 1:
                        pg.execute(
                            "INSERT INTO dm_actor_store VALUES (%s, %s)",
                            (schema.APPLICATION_ID, target),
                        )
                    else:
                        pg.execute("UPDATE dm_actor_store SET version = %s", (target,))
                pg.commit()
            except psycopg.Error as exc:
                raise StoreError(
                    f"{self.path}: migrating to schema version {target} failed: {exc}"
                ) from exc

    def _pg_slots(self) -> None:
        """The slot column of rows written with another slot count (or none: a database
        migrated from version 1) is computed again."""
        pg = self._pg
        (stored,) = _one(pg, "SELECT slot_count FROM dm_actor_store")
        pg.commit()
        if stored == self.slot_count:
            return
        if stored and self.fencing is not None:
            raise StoreError(
                f"{self.path}: its rows are in {stored} slots, this node is configured with "
                f"{self.slot_count} (a cluster's slot count is fixed)"
            )
        try:
            with pg.transaction():
                endpoints: set[str] = set()
                for table in SLOT_TABLES:
                    endpoints.update(e for (e,) in pg.execute(f"SELECT endpoint FROM {table}"))
                names = sorted(endpoints)
                slots = [slot_of(e, self.slot_count) for e in names]
                for table in SLOT_TABLES:
                    pg.execute(
                        f"UPDATE {table} t SET slot = v.slot FROM unnest(%s::text[], "
                        f"%s::integer[]) AS v(endpoint, slot) WHERE t.endpoint = v.endpoint "
                        f"AND t.slot <> v.slot",
                        (names, slots),
                    )
                pg.execute("UPDATE dm_actor_store SET slot_count = %s", (self.slot_count,))
            pg.commit()
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: computing the slot column failed: {exc}") from exc
        if endpoints:
            log.info(
                "store %s: the slots of %d endpoints computed for %d slots (were %d)",
                self.path, len(names), self.slot_count, stored,
            )  # fmt: skip

    # ----------------------------------------------------------------------------- reading

    def load(self) -> Snapshot:
        """Everything stored, read in the calling thread. Call it before the writer runs."""
        pg = self._pg
        now = self.clock()
        try:
            with pg.transaction():
                snapshot = Snapshot(
                    registrations=[
                        RegistrationRecord(*r)
                        for r in pg.execute(
                            f"SELECT {', '.join(_REG_FIELDS)} FROM registrations ORDER BY position"
                        )
                    ],
                    commands=[
                        CommandRecord(*r)
                        for r in pg.execute(
                            f"SELECT {', '.join(_CMD_FIELDS)} FROM commands ORDER BY position"
                        )
                    ],
                    subscriptions=_group(
                        pg.execute(
                            "SELECT endpoint, path, owner FROM subscriptions ORDER BY 1, 2, 3"
                        )
                    ),
                    presubscriptions=_presubscriptions(
                        pg.execute(
                            "SELECT owner, position, endpoint_name, endpoint_type, "
                            "resource_paths FROM presubscriptions ORDER BY owner, position"
                        )
                    ),
                    channels=[
                        ChannelRecord(owner, mech, created, url, _decode_headers(headers), ser)
                        for owner, mech, created, url, headers, ser in pg.execute(
                            "SELECT owner, mechanism, created_at, url, headers, serialization "
                            "FROM channels ORDER BY owner"
                        )
                    ],
                    api_keys=[
                        ApiKeyRecord(*r)
                        for r in pg.execute(
                            "SELECT key, owner, created_at FROM api_keys ORDER BY key"
                        )
                    ],
                    events=[
                        EventRecord(*r)
                        for r in pg.execute(
                            "SELECT owner, seq, kind, item, created_at FROM events "
                            "WHERE created_at >= %s ORDER BY owner, seq",
                            (now - self.event_lifetime,),
                        )
                    ],
                    next_mids=dict(pg.execute("SELECT endpoint, mid FROM next_mids")),
                    credentials=[
                        CredentialRecord(*r)
                        for r in pg.execute(
                            "SELECT endpoint, psk_identity, psk_key, created_at "
                            "FROM credentials ORDER BY endpoint"
                        )
                    ],
                    answers=[
                        AnswerRecord(*r)
                        for r in pg.execute(
                            f"SELECT {', '.join(_ANSWER_FIELDS)} FROM answers "
                            "WHERE forget_at > %s ORDER BY finished_at, seq",
                            (now,),
                        )
                    ],
                )
            pg.commit()
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc
        return snapshot

    def load_slots(self, slots: Iterable[int]) -> Snapshot:
        """The registrations, commands, subscriptions and next Message IDs of the endpoints
        in `slots` (the other fields empty), read in one snapshot on the reader connection:
        callable from a worker thread while the writer runs.

        Raises:
            StoreError: the database cannot be read (the next call connects again).
        """
        wanted = sorted(set(slots))
        where = "WHERE slot = ANY(%s) ORDER BY position"
        now = self.clock()

        def read(pg: psycopg.Connection[Any]) -> Snapshot:
            return Snapshot(
                registrations=[
                    RegistrationRecord(*r)
                    for r in pg.execute(
                        f"SELECT {', '.join(_REG_FIELDS)} FROM registrations {where}", (wanted,)
                    )
                ],
                commands=[
                    CommandRecord(*r)
                    for r in pg.execute(
                        f"SELECT {', '.join(_CMD_FIELDS)} FROM commands {where}", (wanted,)
                    )
                ],
                subscriptions=_group(
                    pg.execute(
                        "SELECT endpoint, path, owner FROM subscriptions WHERE slot = ANY(%s) "
                        "ORDER BY 1, 2, 3",
                        (wanted,),
                    )
                ),
                next_mids=dict(
                    pg.execute(
                        "SELECT endpoint, mid FROM next_mids WHERE slot = ANY(%s)", (wanted,)
                    )
                ),
                # the answers remembered for repeats of their async-ids (rule 1.7) of these
                # devices: the node that finished them may be gone
                answers=[
                    AnswerRecord(*r)
                    for r in pg.execute(
                        f"SELECT {', '.join(_ANSWER_FIELDS)} FROM answers WHERE forget_at > %s "
                        "AND endpoint IN (SELECT endpoint FROM registrations "
                        "WHERE slot = ANY(%s)) ORDER BY finished_at, seq",
                        (now, wanted),
                    )
                ],
            )

        return self._read(read)

    def load_channels(self) -> list[ChannelRecord]:
        """Every stored notification channel, on the reader connection (see `load_slots`):
        a cluster node reopens those of the applications it becomes the home of."""

        def read(pg: psycopg.Connection[Any]) -> list[ChannelRecord]:
            return [
                ChannelRecord(owner, mech, created, url, _decode_headers(headers), ser)
                for owner, mech, created, url, headers, ser in pg.execute(
                    "SELECT owner, mechanism, created_at, url, headers, serialization "
                    "FROM channels ORDER BY owner"
                )
            ]

        return self._read(read)

    def load_events(self, owners: Iterable[str]) -> list[EventRecord]:
        """The stored events of `owners` (by owner, then seq; none older than the event
        lifetime), on the reader connection (see `load_slots`)."""
        wanted = sorted(set(owners))
        since = self.clock() - self.event_lifetime

        def read(pg: psycopg.Connection[Any]) -> list[EventRecord]:
            return [
                EventRecord(*r)
                for r in pg.execute(
                    "SELECT owner, seq, kind, item, created_at FROM events "
                    "WHERE owner = ANY(%s) AND created_at >= %s ORDER BY owner, seq",
                    (wanted, since),
                )
            ]

        return self._read(read)

    def _read(self, read: Callable[[psycopg.Connection[Any]], _R]) -> _R:
        """`read` in one read-only, repeatable-read transaction on the reader connection
        (opened when first needed; it holds no lock)."""
        with self._reader_lock:
            try:
                pg = self._reader
                if pg is None or pg.closed or pg.broken:
                    if pg is not None:
                        pg.close()
                    pg = self._reader = self._open()
                    pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                    pg.read_only = True
                with pg.transaction():
                    return read(pg)
            except psycopg.Error as exc:
                if self._reader is not None:
                    self._reader.close()
                    self._reader = None
                raise StoreError(f"{self.path}: cannot read the store: {exc}") from exc

    # ------------------------------------------------------------------------------ commits

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
        # (the lease loop changes `held` in this thread: the worker gets a copy)
        held = None if self.fencing is None else dict(self.fencing.held)
        try:
            with trio.CancelScope(shield=True):  # a commit that happened must be counted
                await trio.to_thread.run_sync(self._write, batch, held)
        except psycopg.Error as exc:
            why = _retryable(exc)
            if why is not None:
                self._pg_failed(exc, why)
                return False
            self._failure = StoreFailed(
                f"{self.path}: a write failed and cannot be retried: {exc} "
                f"({exc.sqlstate or type(exc).__name__}); writes after batch "
                f"{self._committed} are not durable and were not acknowledged; stopping "
                f"(a restart recovers what was committed)"
            )
            self._committed_event.set()
            raise self._failure from exc
        except _Expired as exc:
            self._pg_failed(exc, "this node's leases expired (a late renewal): waiting for it")
            return False
        except Fenced as exc:
            self._failure = exc
            self._committed_event.set()
            raise
        except StoreError as exc:  # reconnected, but another daemon holds the database
            self._failure = StoreFailed(f"{exc}; stopping")
            self._committed_event.set()
            raise self._failure from exc
        batches.popleft()
        self._batch_committed(batch, started)
        return True

    def _pg_failed(self, exc: psycopg.Error | _Expired, why: str) -> None:
        self.write_retries += 1
        if self._problem is not None:
            return
        self._problem = f"{self.path}: {why} ({str(exc).strip()})"
        self._problem_since = trio.current_time()
        log.error(
            "store %s: %s (%s, %s): %d writes wait in memory and are retried until they "
            "commit; meanwhile new commands get 503 STORE_IS_BEHIND and Registers are shed",
            self.path, why, str(exc).strip(),
            getattr(exc, "sqlstate", None) or type(exc).__name__, self.backlog(),
        )  # fmt: skip

    def _write(self, b: _Batch, held: dict[int, int] | None = None) -> None:
        """One transaction with everything in `b` (in a worker thread); in cluster mode
        (`held`: the leases this node holds), first the fencing check."""
        if self._pg.closed or self._pg.broken:
            self._pg.close()
            self._pg = self._connect()
        pg = self._pg
        try:
            with pg.cursor() as cur:
                slots = _slots(b, self.slot_count)
                if held is not None:
                    self._fence(cur, b, held, set(slots.values()))
                self._write_rows(cur, b, slots)
                total = self._event_total
                if b.event_wipes or b.event_deletes or b.events or self._refusing:
                    total = self._write_pg_events(cur, b)
            pg.commit()
            self._event_total = total
        except BaseException:
            if not pg.closed and not pg.broken:
                try:
                    pg.rollback()
                except psycopg.Error:
                    log.debug("rollback failed after a failed write", exc_info=True)
            raise

    def _fence(
        self, cur: psycopg.Cursor[Any], b: _Batch, held: dict[int, int], touched: set[int]
    ) -> None:
        """Refuse (`Fenced`) a batch touching a slot whose lease this node does not hold
        with the epoch it knows; the lease rows of the others stay locked FOR SHARE until
        the commit."""
        if not touched:
            return
        slots = sorted(touched)
        refused = {s for s in slots if s not in held}
        if not refused:
            cur.execute(
                _FENCE,
                {
                    "slots": slots,
                    "epochs": [held[s] for s in slots],
                    "node": cast("Fencing", self.fencing).node,
                },
            )
            rows = cur.fetchall()
            refused = touched - {int(s) for s, _ in rows}
            expired = sorted(int(s) for s, unexpired in rows if not unexpired)
            if expired and not refused:
                raise _Expired(
                    f"this node's leases of slots {', '.join(map(str, expired[:10]))} expired"
                )
        if refused:
            named = ", ".join(str(s) for s in sorted(refused)[:10])
            more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
            raise Fenced(
                f"{self.path}: batch {b.seq} writes to slots {named}{more}, which another node "
                f"owns now (this node's lease expired or was taken: fencing refused the "
                f"batch); writes after batch {self._committed} are not durable and were not "
                f"acknowledged; stopping (a restart loads what this node then owns)",
                refused,
            )

    def _write_rows(self, cur: psycopg.Cursor[Any], b: _Batch, slot: dict[str, int]) -> None:
        astuple = msgspec.structs.astuple
        if b.regs:
            _many(cur, "DELETE FROM registrations WHERE endpoint = %s",
                  [(ep,) for ep, r in b.regs.items() if r is None])  # fmt: skip
            _many(cur, _PUT_REGISTRATION, [(*astuple(r), slot[ep])
                  for ep, r in b.regs.items() if r is not None])  # fmt: skip
        if b.wiped:
            wiped = [(e,) for e in b.wiped]
            _many(cur, "DELETE FROM commands WHERE endpoint = %s", wiped)
            _many(cur, "DELETE FROM next_mids WHERE endpoint = %s", wiped)
        _many(cur, _PUT_NEXT_MID, [(e, m, slot[e]) for e, m in b.next_mids.items()])
        _many(cur, "DELETE FROM commands WHERE endpoint = %s AND async_id = %s",
              list(b.cmd_deletes))  # fmt: skip
        _many(cur, _PUT_COMMAND, [(*astuple(c), slot[ep])
              for (ep, _), c in b.cmds.items()])  # fmt: skip
        if b.subs:
            _many(cur, "DELETE FROM subscriptions WHERE endpoint = %s AND path = %s "
                  "AND owner = %s", [k for k, put in b.subs.items() if not put])  # fmt: skip
            _many(cur, _PUT_SUBSCRIPTION,
                  [(*k, slot[k[0]]) for k, put in b.subs.items() if put])  # fmt: skip
        for owner, entries in b.presubscriptions.items():
            cur.execute("DELETE FROM presubscriptions WHERE owner = %s", (owner,))
            _many(
                cur,
                "INSERT INTO presubscriptions VALUES (%s, %s, %s, %s, %s)",
                [(owner, i, e.endpoint_name, e.endpoint_type,
                  _json_encode(e.resource_paths).decode()) for i, e in enumerate(entries)],
            )  # fmt: skip
        for owner, channel in b.channels.items():
            if channel is None:
                cur.execute("DELETE FROM channels WHERE owner = %s", (owner,))
            else:
                cur.execute(_PUT_CHANNEL, (owner, channel.mechanism, channel.created_at,
                            channel.url, _json_encode(channel.headers).decode(),
                            channel.serialization))  # fmt: skip
        for key, api_key in b.api_keys.items():
            if api_key is None:
                cur.execute("DELETE FROM api_keys WHERE key = %s", (key,))
            else:
                cur.execute(_PUT_API_KEY, (key, api_key.owner, api_key.created_at))
        if b.credentials:  # every row of these endpoints goes first: an identity moved
            # from one endpoint to another within the batch is unique again at the inserts
            _many(cur, "DELETE FROM credentials WHERE endpoint = %s",
                  [(e,) for e in b.credentials])  # fmt: skip
            _many(cur, "INSERT INTO credentials VALUES (%s, %s, %s, %s)",
                  [astuple(c) for c in b.credentials.values() if c is not None])  # fmt: skip
        if b.answers:
            _many(cur, "DELETE FROM answers WHERE owner = %s AND async_id = %s",
                  [key for key, a in b.answers.items() if a is None])  # fmt: skip
            puts = [astuple(a) for a in b.answers.values() if a is not None]
            if puts:
                cur.executemany(_PUT_ANSWER, puts)
                cur.execute("DELETE FROM answers WHERE forget_at <= %s", (self.clock(),))

    def _write_pg_events(self, cur: psycopg.Cursor[Any], b: _Batch) -> int:
        """Write `b`'s events within the budget; returns the bytes of events stored after."""
        for owner in b.event_wipes:  # (AsyncIDResponses stay: see `delete_channel`)
            cur.execute("DELETE FROM events WHERE owner = %s AND kind <> %s",
                        (owner, KEPT_EVENT_KIND))  # fmt: skip
            cur.execute("DELETE FROM event_bytes WHERE owner = %s AND bytes <= 0", (owner,))
        deletes = [(owner, seq) for owner, seqs in b.event_deletes.items() for seq in seqs]
        _many(cur, "DELETE FROM events WHERE owner = %s AND seq = %s", deletes)
        astuple = msgspec.structs.astuple
        rows = self._within_budget(
            cast("Any", cur), [astuple(e) for per in b.events.values() for e in per.values()]
        )
        if rows:
            _many(cur, _PUT_EVENT, rows)
            cur.execute("DELETE FROM events WHERE created_at < %s",
                        (self.clock() - self.event_lifetime,))  # fmt: skip
            cap = self.event_bytes_cap
            for owner in b.events:
                size = _one(cur, "SELECT bytes FROM event_bytes WHERE owner = %s", (owner,),
                            default=(0,))[0]  # fmt: skip
                if size > cap:
                    cur.execute(_CAP_EVENTS, {"owner": owner, "cap": cap})
        return int(_one(cur, _EVENT_TOTAL)[0])

    def _disk_free(self) -> int | None:
        return None  # (the database server's disk: not visible from here)


def _slots(b: _Batch, count: int) -> dict[str, int]:
    """The slots of the endpoints whose per-device rows `b` writes."""
    endpoints: set[str] = set(b.regs)
    endpoints.update(b.wiped)
    endpoints.update(b.next_mids)
    endpoints.update(ep for ep, _ in b.cmds)
    endpoints.update(ep for ep, _ in b.cmd_deletes)
    endpoints.update(ep for ep, _, _ in b.subs)
    endpoints.update(a.endpoint for a in b.answers.values() if a is not None)
    return {ep: slot_of(ep, count) for ep in endpoints}


def _many(cur: psycopg.Cursor[Any], sql: str, rows: list[Any]) -> None:
    if rows:
        cur.executemany(sql, rows)


def _one(
    db: psycopg.Connection[Any] | psycopg.Cursor[Any],
    sql: str,
    params: tuple[Any, ...] = (),
    *,
    default: tuple[Any, ...] | None = None,
) -> tuple[Any, ...]:
    row = db.execute(sql, params or None).fetchone()
    if row is None:
        if default is None:
            raise StoreError(f"no row from {sql!r}")
        return default
    return tuple(row)
