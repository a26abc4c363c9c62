"""The cluster's coordinator: slot leases with fencing epochs and the node registry, kept in the
PostgreSQL database the nodes store their data in (`Coordinator`).

Tables (created when missing, next to the store's):

- `cluster_config (key, value)`: `slots` = P, fixed when the cluster is created (the ids the
  server issues carry slots): a node configured with another count is refused.
- `cluster_nodes (node, number, http, link, heartbeat)`: one row per node that joined; `number`
  (0..1023) is unique among them; `heartbeat` is stamped by every renewal.
- `slot_leases (slot, node, epoch, expires)`: all P rows. `node` holds the slot until `expires`;
  `epoch` grows by one whenever the slot changes hands (take, handover), never on a renewal.

Rules (all times on the database's clock, `clock_timestamp()`; each call is one transaction with
`synchronous_commit = on`; rows are locked in slot order, so calls never deadlock each other):

- renew: heartbeat, then every lease naming this node is extended to now + ttl, expired or not
  (nobody took it: the same epoch, the data unchanged).
- take: a slot nobody holds, or whose lease expired AND whose node's heartbeat is older than
  the TTL (or the node left): it becomes this node's with epoch + 1. A node that was cut off
  from the database gets its own slots back by its renewal, unless one was taken meanwhile.
- handover: this node's slot goes to a live node, epoch + 1.
- leave: this node's leases expire now, its row goes.

Fencing: a store batch (`dm_actor.store.postgres`) first locks, `FOR SHARE`, the lease rows of
the slots it writes, with this node's epochs and an unexpired lease; a take or handover waits
for such a batch, and after it the old owner's batches are refused (`Fenced`). A batch under
a lease that expired but was not taken waits for the renewal (retried, not committed).

Synchronous (psycopg 3, its own connection): call it from a worker thread. psycopg errors
propagate (the caller retries; its local deadline stops it meanwhile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
import psycopg.conninfo

from dm_actor.cluster.leases import Lease, NodeInfo, Table
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from collections.abc import Sequence

#: The transaction-level advisory lock serialising table creation and node numbering
#: (not the store's daemon lock).
SETUP_LOCK = 0x646D4143_0001
#: Node numbers are below this.
MAX_NODES = 1024

_DDL = """
CREATE TABLE IF NOT EXISTS cluster_config (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_nodes (
    node TEXT COLLATE "C" PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    http TEXT NOT NULL,
    link TEXT NOT NULL,
    heartbeat TIMESTAMPTZ NOT NULL,
    coap TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS slot_leases (
    slot INTEGER PRIMARY KEY,
    node TEXT COLLATE "C",
    epoch BIGINT NOT NULL DEFAULT 0,
    expires TIMESTAMPTZ NOT NULL DEFAULT 'epoch'
);
"""

_RENEW = """
UPDATE slot_leases SET expires = clock_timestamp() + %(ttl)s * interval '1 second'
 WHERE slot IN (SELECT slot FROM slot_leases WHERE node = %(me)s ORDER BY slot FOR UPDATE)
   AND node = %(me)s
RETURNING slot, epoch
"""
_TABLE = """
SELECT slot, node, epoch, extract(epoch FROM expires - clock_timestamp())::float8
  FROM slot_leases ORDER BY slot
"""
_NODES = """
SELECT node, number, http, link, extract(epoch FROM clock_timestamp() - heartbeat)::float8,
       coap
  FROM cluster_nodes ORDER BY node
"""
_TAKE = """
UPDATE slot_leases l
   SET node = %(me)s, epoch = l.epoch + 1,
       expires = clock_timestamp() + %(ttl)s * interval '1 second'
 WHERE l.slot IN (SELECT slot FROM slot_leases WHERE slot = ANY(%(slots)s)
                   ORDER BY slot FOR UPDATE)
   AND (l.node IS NULL
        OR (l.expires < clock_timestamp()
            AND (l.node = %(me)s OR NOT EXISTS (
                SELECT 1 FROM cluster_nodes n WHERE n.node = l.node
                   AND n.heartbeat > clock_timestamp() - %(ttl)s * interval '1 second'))))
RETURNING l.slot, l.epoch
"""
_HANDOVER = """
UPDATE slot_leases
   SET node = %(to)s, epoch = epoch + 1,
       expires = clock_timestamp() + %(ttl)s * interval '1 second'
 WHERE slot IN (SELECT slot FROM slot_leases WHERE slot = ANY(%(slots)s) AND node = %(me)s
                 ORDER BY slot FOR UPDATE)
   AND node = %(me)s AND expires > clock_timestamp()
   AND EXISTS (SELECT 1 FROM cluster_nodes WHERE node = %(to)s
                  AND heartbeat > clock_timestamp() - %(ttl)s * interval '1 second')
RETURNING slot
"""


class Coordinator:
    """This node's side of the lease table (see the module's rules).

    Args:
        dsn: the store's database (a libpq connection string or URI).
        node: this node's name (unique in the cluster).
        slots: P, the slot count (must match the cluster's).
        ttl: the lease TTL in seconds.
        http, link: where this node's HTTP API and internal link are reached (`host:port`).
        coap: the address its devices talk to (`[server] host:coap_port`): nodes sharing one
            (SO_REUSEPORT, a VIP) may answer each other's devices directly.
        connect_timeout: seconds to wait for a connection, unless the DSN says.

    Raises:
        StoreError: the database cannot be reached.
    """

    def __init__(
        self,
        dsn: str,
        node: str,
        *,
        slots: int,
        ttl: float,
        http: str,
        link: str,
        coap: str = "",
        connect_timeout: float = 10.0,
    ) -> None:
        if slots < 1 or ttl <= 0:
            raise ValueError("slots and ttl must be positive")
        self.node = node
        self.slots = slots
        self.ttl = ttl
        self.http = http
        self.link = link
        self.coap = coap
        try:
            params: dict[str, Any] = dict(psycopg.conninfo.conninfo_to_dict(dsn))
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"coordinator: an invalid dsn: {exc}") from exc
        params.setdefault("connect_timeout", max(2, round(connect_timeout)))
        params.setdefault("application_name", "dm-actor-coordinator")
        self._conninfo = psycopg.conninfo.make_conninfo("", **params)
        self._closed = False
        try:
            self._db = self._connect()
        except psycopg.Error as exc:
            raise StoreError(f"coordinator: cannot connect: {exc}".rstrip()) from exc
        self.number = -1

    def _connect(self) -> psycopg.Connection[Any]:
        pg = psycopg.connect(self._conninfo, autocommit=True)
        try:
            pg.execute("SET synchronous_commit = on")
        except BaseException:
            pg.close()
            raise
        return pg

    @property
    def _pg(self) -> psycopg.Connection[Any]:
        """The connection, opened again after it was lost (psycopg errors propagate)."""
        if self._closed:
            raise StoreError("coordinator: closed")
        if self._db.closed or self._db.broken:
            self._db.close()
            self._db = self._connect()
        return self._db

    def join(self) -> int:
        """Create the cluster's tables if missing, check the slot count, and (re)enter this
        node's row; returns its number (kept across restarts, unique among nodes).

        Raises:
            StoreError: the cluster has another slot count, or every number is in use.
        """
        pg = self._pg
        with pg.transaction():
            pg.execute("SELECT pg_advisory_xact_lock(%s)", (SETUP_LOCK,))
            pg.execute(_DDL.encode())
            pg.execute(
                "INSERT INTO cluster_config VALUES ('slots', %s) ON CONFLICT DO NOTHING",
                (self.slots,),
            )
            row = pg.execute("SELECT value FROM cluster_config WHERE key = 'slots'").fetchone()
            if row is None or int(row[0]) != self.slots:
                found = None if row is None else row[0]
                raise StoreError(
                    f"coordinator: the cluster has {found} slots, this node is configured "
                    f"with {self.slots} (the slot count is fixed when a cluster is created)"
                )
            pg.execute(
                "INSERT INTO slot_leases (slot) SELECT generate_series(0, %s - 1) "
                "ON CONFLICT DO NOTHING",
                (self.slots,),
            )
            row = pg.execute(
                "SELECT number FROM cluster_nodes WHERE node = %s", (self.node,)
            ).fetchone()
            if row is not None:
                number = int(row[0])
            else:
                used = {r[0] for r in pg.execute("SELECT number FROM cluster_nodes")}
                free = next((n for n in range(MAX_NODES) if n not in used), None)
                if free is None:
                    raise StoreError(
                        f"coordinator: {MAX_NODES} nodes have joined; remove the rows of "
                        "nodes that are gone from cluster_nodes"
                    )
                number = free
            pg.execute(
                "INSERT INTO cluster_nodes VALUES (%s, %s, %s, %s, clock_timestamp(), %s) "
                "ON CONFLICT (node) DO UPDATE SET http = excluded.http, "
                "link = excluded.link, heartbeat = excluded.heartbeat, coap = excluded.coap",
                (self.node, number, self.http, self.link, self.coap),
            )
        self.number = number
        return number

    def renew(self) -> tuple[dict[int, int], Table]:
        """Heartbeat and extend every lease naming this node; returns what it holds
        (slot -> epoch) and the whole table, read in the same transaction.

        Raises:
            StoreError: this node's row is gone (it left, or an operator removed it).
        """
        pg = self._pg
        with pg.transaction():
            cur = pg.execute(
                "UPDATE cluster_nodes SET heartbeat = clock_timestamp() WHERE node = %s",
                (self.node,),
            )
            if cur.rowcount != 1:
                raise StoreError(f"coordinator: node {self.node} is not in cluster_nodes")
            held = {
                int(s): int(e) for s, e in pg.execute(_RENEW, {"ttl": self.ttl, "me": self.node})
            }
            leases = tuple(Lease(int(s), n, int(e), float(x)) for s, n, e, x in pg.execute(_TABLE))
            nodes = tuple(
                NodeInfo(n, int(num), h, ln, float(a), c)
                for n, num, h, ln, a, c in pg.execute(_NODES)
            )
        return held, Table(leases, nodes)

    def take(self, slots: Sequence[int]) -> dict[int, int]:
        """Take those of `slots` nobody holds, or whose lease expired and whose node is not
        live; returns them with their new epochs."""
        if not slots:
            return {}
        pg = self._pg
        with pg.transaction():
            rows = pg.execute(_TAKE, {"me": self.node, "ttl": self.ttl, "slots": list(slots)})
            return {int(s): int(e) for s, e in rows}

    def handover(self, slots: Sequence[int], to: str) -> list[int]:
        """Give those of `slots` this node holds (unexpired) to the live node `to`; returns
        the slots handed over. Flush their writes first: this node's later batches for them
        are refused."""
        if not slots or to == self.node:
            return []
        pg = self._pg
        with pg.transaction():
            rows = pg.execute(
                _HANDOVER, {"me": self.node, "to": to, "ttl": self.ttl, "slots": list(slots)}
            )
            return sorted(int(s) for (s,) in rows)

    def leave(self) -> None:
        """A graceful stop: this node's leases expire now (any node may take them) and its
        row goes."""
        pg = self._pg
        with pg.transaction():
            pg.execute(
                "UPDATE slot_leases SET expires = clock_timestamp() - interval '1 second' "
                "WHERE slot IN (SELECT slot FROM slot_leases WHERE node = %(me)s "
                "ORDER BY slot FOR UPDATE) AND node = %(me)s",
                {"me": self.node},
            )
            pg.execute("DELETE FROM cluster_nodes WHERE node = %s", (self.node,))

    def close(self) -> None:
        self._closed = True
        self._db.close()
