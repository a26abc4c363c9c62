"""An in-memory `Store`: dicts, durable at once. For tests and benchmarks that say so."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

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
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class MemoryStore:
    """Keeps the latest record of everything; nothing survives the process.

    Args:
        clock: the wall clock that ages events.
        event_lifetime: seconds an undelivered event is kept.
        event_bytes_cap: the bytes of undelivered events kept per owner; older ones are dropped.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        event_lifetime: float = EVENT_LIFETIME,
        event_bytes_cap: int = EVENT_BYTES_CAP,
    ) -> None:
        self.registrations: dict[str, RegistrationRecord] = {}
        self.commands: dict[str, dict[str, CommandRecord]] = {}  # endpoint -> async-id ->
        self.subscriptions: dict[str, set[tuple[str, str]]] = {}  # endpoint -> (path, owner)
        self.presubscriptions: dict[str, list[PresubscriptionRecord]] = {}  # owner ->
        self.channels: dict[str, ChannelRecord] = {}  # owner ->
        self.api_keys: dict[str, ApiKeyRecord] = {}  # key ->
        self.credentials: dict[str, CredentialRecord] = {}  # endpoint ->
        self.events: dict[str, dict[int, EventRecord]] = {}  # owner -> seq -> (put order)
        self.event_bytes: dict[str, int] = {}  # owner -> bytes of its events' items
        self.next_mids: dict[str, int] = {}  # endpoint -> the first Message ID not reserved
        self.answers: dict[tuple[str, str], AnswerRecord] = {}  # (owner, async-id) ->
        self.writes = 0
        self.clock = clock
        self.event_lifetime = event_lifetime
        self.event_bytes_cap = event_bytes_cap

    def load(self) -> Snapshot:
        subs = {ep: sorted(paths) for ep, paths in self.subscriptions.items()}
        commands = [c for per_device in self.commands.values() for c in per_device.values()]
        commands.sort(key=lambda c: c.accepted_at)
        oldest = self.clock() - self.event_lifetime
        events = [
            e
            for owner in sorted(self.events)
            for e in sorted(self.events[owner].values(), key=lambda e: e.seq)
            if e.created_at >= oldest
        ]
        return Snapshot(
            list(self.registrations.values()),
            commands,
            subs,
            {owner: list(entries) for owner, entries in self.presubscriptions.items()},
            list(self.channels.values()),
            list(self.api_keys.values()),
            events,
            dict(self.next_mids),
            answers=sorted(
                (a for a in self.answers.values() if a.forget_at > self.clock()),
                key=lambda a: (a.finished_at, a.seq),
            ),
            credentials=[self.credentials[e] for e in sorted(self.credentials)],
        )

    def put_registration(self, record: RegistrationRecord) -> None:
        self.writes += 1
        self.registrations[record.endpoint] = record

    def delete_registration(self, endpoint: str) -> None:
        self.writes += 1
        self.registrations.pop(endpoint, None)
        self.commands.pop(endpoint, None)
        self.next_mids.pop(endpoint, None)

    def put_command(self, record: CommandRecord) -> None:
        self.writes += 1
        self.commands.setdefault(record.endpoint, {})[record.async_id] = record

    def put_next_mid(self, endpoint: str, mid: int) -> None:
        self.writes += 1
        self.next_mids[endpoint] = mid

    def delete_command(self, endpoint: str, async_id: str) -> None:
        self.writes += 1
        per_device = self.commands.get(endpoint)
        if per_device is not None:
            per_device.pop(async_id, None)
            if not per_device:
                del self.commands[endpoint]

    def put_subscription(self, endpoint: str, path: str, owner: str) -> None:
        self.writes += 1
        self.subscriptions.setdefault(endpoint, set()).add((path, owner))

    def delete_subscription(self, endpoint: str, path: str, owner: str) -> None:
        self.writes += 1
        paths = self.subscriptions.get(endpoint)
        if paths is not None:
            paths.discard((path, owner))
            if not paths:
                del self.subscriptions[endpoint]

    def set_presubscriptions(self, owner: str, entries: Sequence[PresubscriptionRecord]) -> None:
        self.writes += 1
        if entries:
            self.presubscriptions[owner] = list(entries)
        else:
            self.presubscriptions.pop(owner, None)

    def put_channel(self, record: ChannelRecord) -> None:
        self.writes += 1
        self.channels[record.owner] = record

    def delete_channel(self, owner: str) -> None:
        self.writes += 1
        self.channels.pop(owner, None)
        events = self.events.pop(owner, None) or {}
        self.event_bytes.pop(owner, None)
        kept = {seq: e for seq, e in events.items() if e.kind == KEPT_EVENT_KIND}
        if kept:  # AsyncIDResponses stay owed to the owner's next channel
            self.events[owner] = kept
            self.event_bytes[owner] = sum(len(e.item) for e in kept.values())

    def put_api_key(self, record: ApiKeyRecord) -> None:
        self.writes += 1
        self.api_keys[record.key] = record

    def delete_api_key(self, key: str) -> None:
        self.writes += 1
        self.api_keys.pop(key, None)

    def put_credential(self, record: CredentialRecord) -> None:
        self.writes += 1
        self.credentials[record.endpoint] = record

    def delete_credential(self, endpoint: str) -> None:
        self.writes += 1
        self.credentials.pop(endpoint, None)

    def put_event(self, record: EventRecord) -> None:
        self.writes += 1
        owner = record.owner
        events = self.events.setdefault(owner, {})
        old = events.pop(record.seq, None)
        size = self.event_bytes.get(owner, 0) + len(record.item)
        if old is not None:
            size -= len(old.item)
        events[record.seq] = record
        while size > self.event_bytes_cap:
            size -= len(events.pop(next(iter(events))).item)
        self.event_bytes[owner] = size

    def delete_events(self, owner: str, seqs: Sequence[int]) -> None:
        self.writes += 1
        events = self.events.get(owner)
        if events is None:
            return
        for seq in seqs:
            gone = events.pop(seq, None)
            if gone is not None:
                self.event_bytes[owner] -= len(gone.item)
        if not events:
            del self.events[owner]
            del self.event_bytes[owner]

    def put_answer(self, record: AnswerRecord) -> None:
        self.writes += 1
        self.answers[record.owner, record.async_id] = record

    def delete_answers(self, owner: str, async_ids: Sequence[str]) -> None:
        self.writes += 1
        for async_id in async_ids:
            self.answers.pop((owner, async_id), None)

    def mark(self) -> int:
        return 0

    def backlog(self) -> int:
        return 0

    def is_durable(self, mark: int) -> bool:
        return True

    def healthy(self) -> bool:
        return True

    def problem(self) -> str | None:
        return None

    async def durable(self, mark: int | None = None) -> None:
        return None
