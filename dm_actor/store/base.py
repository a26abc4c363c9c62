"""The `Store` protocol and the records it keeps.

Writes are buffered and cheap to call from the hot path; `durable()` waits until every write
made before the call is committed, so many writers share one commit (group commit). A 202
Accepted or a Register's 2.01 is sent only after `durable()` returns. Records are msgspec
Structs so that a store can serialise them without knowing the actors' classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

if TYPE_CHECKING:
    from collections.abc import Sequence


#: Pelion's notification-channel limits: an undelivered event lives 24 h, and a channel's
#: queue holds 50 MB, beyond which the oldest events are dropped.
EVENT_LIFETIME = 24 * 3600.0
EVENT_BYTES_CAP = 50 * 2**20
#: Events of this kind are always stored (an AsyncIDResponse stands for an accepted command,
#: and replaces it in the store); others only within the store's event budget.
KEPT_EVENT_KIND = "async-responses"


class StoreError(Exception):
    """The store cannot be opened or written: corrupt, unreadable, foreign or too new.

    The message names the file and what is wrong with it. Nothing is recreated or dropped.
    """


class StoreFailed(StoreError):
    """A write failed in a way that cannot be retried (an I/O error, a failed fsync, a
    damaged file) while the server ran: it must stop, and a restart recovers what was
    committed (after a failed fsync the kernel may have dropped the unwritten pages and the
    next fsync may report success: nothing written since can be trusted).

    A full disk or a read-only file system is not this: the writer keeps the writes and
    retries (see `Store.healthy`).
    """


class RegistrationRecord(msgspec.Struct, frozen=True):
    endpoint: str
    reg_id: str
    lifetime: int
    lwm2m_version: str
    binding: str
    queue_mode: bool
    links: str  # the registration payload, link-format
    registered_at: float
    updated_at: float
    endpoint_type: str | None = None
    # a UDP device's last address, JSON `[host, port]` (IPv6: `[host, port, flowinfo,
    # scope_id]`); None over TCP (a connection cannot be restored) or when unknown
    address: str | None = None
    # cluster mode: the node the device's datagrams come in by, when not its owner (a new
    # owner sends through it, so the device sees the address it talks to); else None
    ingress: str | None = None


class CommandRecord(msgspec.Struct, frozen=True):
    endpoint: str
    async_id: str
    method: str
    uri: str
    payload: bytes
    content_format: int | None
    accept: int | None
    accepted_at: float
    expires_at: float
    attempts_left: int
    attempts: int
    last_attempt_at: float | None
    observe: bool
    owner: str
    mid: int | None = None  # the attempt in flight: its CoAP Message ID and token, so that
    token: bytes | None = None  # a restart inside EXCHANGE_LIFETIME resends the same request


class PresubscriptionRecord(msgspec.Struct, frozen=True):
    """One pre-subscription entry of an application; patterns may end with `*`."""

    endpoint_name: str | None = None
    endpoint_type: str | None = None
    resource_paths: tuple[str, ...] = ()


class ChannelRecord(msgspec.Struct, frozen=True):
    """An application's notification channel: `WEB_SOCKET` or `CALLBACK` (with url, headers)."""

    owner: str
    mechanism: str
    created_at: float
    url: str | None = None
    headers: dict[str, str] = {}
    serialization: str | None = None  # the channel's `serialization` object, JSON text


class ApiKeyRecord(msgspec.Struct, frozen=True):
    """An access key and the application (`owner`) it belongs to.

    `key` is kept as the API layer gives it; a digest of the secret is the advised form.
    """

    key: str
    owner: str
    created_at: float


class CredentialRecord(msgspec.Struct, frozen=True):
    """An endpoint's DTLS PSK credentials (`dm_actor.credentials`): its identity, unique
    across endpoints, and its key, kept in plain text (the data directory is the daemon
    user's only: docs/operations.md, "Device credentials"). `created_at` is wall-clock time.
    """

    endpoint: str
    psk_identity: str
    psk_key: bytes
    created_at: float

    def __repr__(self) -> str:  # never the key
        return f"CredentialRecord({self.endpoint!r}, psk_identity={self.psk_identity!r})"


class EventRecord(msgspec.Struct, frozen=True):
    """A notification event not yet delivered to `owner`'s channel.

    `seq` orders an owner's events (the API layer numbers them); `item` is the event's JSON;
    `created_at` is wall-clock time, for the 24 h lifetime.
    """

    owner: str
    seq: int
    kind: str
    item: bytes
    created_at: float


class AnswerRecord(msgspec.Struct, frozen=True):
    """A finished command's AsyncIDResponse, remembered for repeats of its async-id
    (delivery.md rule 1.7) until `forget_at` (wall clock).

    `request` is the digest of what was asked (`dm_actor.delivery.answers.request_key`);
    `seq` the number of its event (the same `uid` when it is sent again); `item` its JSON.
    """

    owner: str
    async_id: str
    endpoint: str
    request: bytes
    seq: int
    item: bytes
    finished_at: float
    forget_at: float


class Snapshot(msgspec.Struct):
    registrations: list[RegistrationRecord]
    commands: list[CommandRecord]  # in acceptance order (the order of their first put)
    subscriptions: dict[str, list[tuple[str, str]]]  # endpoint -> sorted (path, owner)
    presubscriptions: dict[str, list[PresubscriptionRecord]] = {}  # owner -> entries
    channels: list[ChannelRecord] = []
    api_keys: list[ApiKeyRecord] = []
    events: list[EventRecord] = []  # by owner, then seq; none older than the event lifetime
    next_mids: dict[str, int] = {}  # endpoint -> the first Message ID not reserved
    answers: list[AnswerRecord] = []  # by finished_at; none whose window ended
    credentials: list[CredentialRecord] = []  # by endpoint


class Store(Protocol):
    """What the server persists. Every method but `durable` and `load` only buffers."""

    def load(self) -> Snapshot: ...

    def put_registration(self, record: RegistrationRecord) -> None: ...

    def delete_registration(self, endpoint: str) -> None:
        """Forget the registration and its queued commands."""
        ...

    def put_command(self, record: CommandRecord) -> None:
        """Insert or replace (by endpoint and async-id) a queued command."""
        ...

    def put_next_mid(self, endpoint: str, mid: int) -> None:
        """The server may send `endpoint` Message IDs up to `mid` (excluded): after a restart
        its requests start at `mid`. Forgotten with the registration."""
        ...

    def delete_command(self, endpoint: str, async_id: str) -> None: ...

    def put_subscription(self, endpoint: str, path: str, owner: str) -> None: ...

    def delete_subscription(self, endpoint: str, path: str, owner: str) -> None: ...

    def set_presubscriptions(self, owner: str, entries: Sequence[PresubscriptionRecord]) -> None:
        """Replace `owner`'s pre-subscriptions; none removes them."""
        ...

    def put_channel(self, record: ChannelRecord) -> None:
        """Insert or replace (by owner) an application's notification channel."""
        ...

    def delete_channel(self, owner: str) -> None:
        """Forget the channel and the events still owed to it, but its AsyncIDResponses
        (`KEPT_EVENT_KIND`): each stands for a 202, owed to the owner's next channel."""
        ...

    def put_api_key(self, record: ApiKeyRecord) -> None: ...

    def delete_api_key(self, key: str) -> None: ...

    def put_credential(self, record: CredentialRecord) -> None:
        """Insert or replace (by endpoint) a device's PSK credentials. The caller keeps
        identities unique (`dm_actor.credentials.Credentials`)."""
        ...

    def delete_credential(self, endpoint: str) -> None: ...

    def put_event(self, record: EventRecord) -> None:
        """Keep an event until it is delivered, it expires, or the owner's cap pushes it out.

        Beyond the owner's byte cap the oldest events are dropped (Pelion drops the oldest).
        """
        ...

    def delete_events(self, owner: str, seqs: Sequence[int]) -> None:
        """The channel delivered (or dropped) `owner`'s events `seqs`: forget them."""
        ...

    def put_answer(self, record: AnswerRecord) -> None:
        """Remember (insert or replace, by owner and async-id) a finished command's answer
        until its `forget_at`; past it the store may drop it on its own."""
        ...

    def delete_answers(self, owner: str, async_ids: Sequence[str]) -> None:
        """Forget `owner`'s remembered answers `async_ids` (a bound pushed them out)."""
        ...

    def mark(self) -> int:
        """A number for the writes buffered so far, for `is_durable` and `durable`."""
        ...

    def backlog(self) -> int:
        """Writes buffered and not yet committed (it grows while the disk stalls)."""
        ...

    def healthy(self) -> bool:
        """False while writes cannot be committed (disk full, read-only file system, file
        locked by another program): they are kept and retried, and the caller should accept
        nothing new that it would have to store (503 `STORE_IS_BEHIND`, shed Registers).
        `problem()` says why."""
        ...

    def problem(self) -> str | None:
        """Why the store is not healthy, for a log line or an error body; None when it is."""
        ...

    def is_durable(self, mark: int) -> bool:
        """True once every write buffered before `mark()` returned `mark` is committed."""
        ...

    async def durable(self, mark: int | None = None) -> None:
        """Return once every write buffered before this call (or before `mark`) is committed."""
        ...
