"""The SQLite store's schema: every version's DDL, kept forever, and how to reach the latest.

Version n is reached by running `MIGRATIONS[n - 1]` on a file at version n - 1, in one
transaction that also sets `PRAGMA user_version = n`. A new file runs them all, so the
migration path is the creation path. Never edit a released version's script: add the next.
This module only holds text; `dm_actor.store.sqlite` runs it.
"""

from __future__ import annotations

#: `PRAGMA application_id` of a dm-actor store ("dmAc"): tells our files from other databases.
APPLICATION_ID = 0x646D4163

#: Version 1: registrations, queued commands and subscriptions.
V1 = """
CREATE TABLE registrations (
    endpoint TEXT PRIMARY KEY,
    reg_id TEXT NOT NULL,
    lifetime INTEGER NOT NULL,
    lwm2m_version TEXT NOT NULL,
    binding TEXT NOT NULL,
    queue_mode INTEGER NOT NULL,
    links TEXT NOT NULL,
    registered_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE commands (
    endpoint TEXT NOT NULL,
    async_id TEXT NOT NULL,
    method TEXT NOT NULL,
    uri TEXT NOT NULL,
    payload BLOB NOT NULL,
    content_format INTEGER,
    accept INTEGER,
    accepted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    attempts_left INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_attempt_at REAL,
    observe INTEGER NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (endpoint, async_id)
);
CREATE TABLE subscriptions (
    endpoint TEXT NOT NULL,
    path TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (endpoint, path, owner)
) WITHOUT ROWID;
"""

#: Version 2: the in-flight attempt's Message ID and token; pre-subscriptions, notification
#: channels, access keys, and the events owed to a channel, with a per-owner byte total that
#: triggers keep exact (for the size cap).
V2 = """
ALTER TABLE commands ADD COLUMN mid INTEGER;
ALTER TABLE commands ADD COLUMN token BLOB;
CREATE TABLE presubscriptions (
    owner TEXT NOT NULL,
    position INTEGER NOT NULL,
    endpoint_name TEXT,
    endpoint_type TEXT,
    resource_paths TEXT NOT NULL,
    PRIMARY KEY (owner, position)
) WITHOUT ROWID;
CREATE TABLE channels (
    owner TEXT PRIMARY KEY,
    mechanism TEXT NOT NULL,
    created_at REAL NOT NULL,
    url TEXT,
    headers TEXT NOT NULL,
    serialization TEXT
) WITHOUT ROWID;
CREATE TABLE api_keys (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE events (
    owner TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    item BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_age ON events (created_at);
CREATE TABLE event_bytes (
    owner TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER event_added AFTER INSERT ON events BEGIN
    INSERT INTO event_bytes VALUES (NEW.owner, length(NEW.item))
        ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER event_removed AFTER DELETE ON events BEGIN
    UPDATE event_bytes SET bytes = bytes - length(OLD.item) WHERE owner = OLD.owner;
END;
CREATE TRIGGER event_replaced AFTER UPDATE ON events BEGIN
    UPDATE event_bytes SET bytes = bytes - length(OLD.item) WHERE owner = OLD.owner;
    INSERT INTO event_bytes VALUES (NEW.owner, length(NEW.item))
        ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes;
END;
"""

#: Version 3: per device, the first Message ID not reserved by the running server: after a
#: restart its requests start there, clear of every MID sent in the last EXCHANGE_LIFETIME.
V3 = """
CREATE TABLE next_mids (
    endpoint TEXT PRIMARY KEY,
    mid INTEGER NOT NULL
) WITHOUT ROWID;
"""

#: Version 4: the endpoint type (`et`) a device registered with, for pre-subscriptions.
V4 = """
ALTER TABLE registrations ADD COLUMN endpoint_type TEXT;
"""

#: Version 5: a UDP device's last address (JSON `[host, port]`, or with IPv6 `[host, port,
#: flowinfo, scope_id]`), so that a restarted server can deliver to it before its next Update.
V5 = """
ALTER TABLE registrations ADD COLUMN address TEXT;
"""

#: Version 6: finished commands' AsyncIDResponses, remembered per application and async-id
#: for repeats (delivery.md rule 1.7) until `forget_at` (wall clock), with the digest of the
#: request they answered and the number (`seq`, the uid) of their event.
V6 = """
CREATE TABLE answers (
    owner TEXT NOT NULL,
    async_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    request BLOB NOT NULL,
    seq INTEGER NOT NULL,
    item BLOB NOT NULL,
    finished_at REAL NOT NULL,
    forget_at REAL NOT NULL,
    PRIMARY KEY (owner, async_id)
) WITHOUT ROWID;
CREATE INDEX answers_by_end ON answers (forget_at);
"""

#: Version 7: devices' DTLS PSK credentials (issue 15); an identity belongs to one endpoint.
#: The key is kept in plain text: the file is the daemon user's only (mode 0600, in a 0700
#: data directory).
V7 = """
CREATE TABLE credentials (
    endpoint TEXT PRIMARY KEY,
    psk_identity TEXT NOT NULL UNIQUE,
    psk_key BLOB NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""

#: Version 8: the node a device's datagrams come in by, in cluster mode (issue 17; kept in
#: both stores' schemas, as they keep the same records).
V8 = """
ALTER TABLE registrations ADD COLUMN ingress TEXT;
"""

#: `MIGRATIONS[n - 1]` takes a store from version n - 1 to n (0 is an empty file).
MIGRATIONS = (V1, V2, V3, V4, V5, V6, V7, V8)

#: The schema version this code writes.
VERSION = len(MIGRATIONS)
