"""The `Store` protocol and the records it keeps.

Writes are buffered and cheap to call from the hot path; `durable()` waits until every write
made before the call is committed, so many writers share one commit (group commit). A 202
Accepted or a Register's 2.01 is sent only after `durable()` returns. Records are msgspec
Structs so that a store can serialise them without knowing the actors' classes.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


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


class Snapshot(msgspec.Struct):
    registrations: list[RegistrationRecord]
    commands: list[CommandRecord]  # in acceptance order
    subscriptions: dict[str, list[tuple[str, str]]]  # endpoint -> (path, owner)


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

    def delete_command(self, endpoint: str, async_id: str) -> None: ...

    def put_subscription(self, endpoint: str, path: str, owner: str) -> None: ...

    def delete_subscription(self, endpoint: str, path: str, owner: str) -> None: ...

    async def durable(self) -> None:
        """Return once every write buffered before this call is committed."""
        ...
