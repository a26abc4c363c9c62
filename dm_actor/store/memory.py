"""An in-memory `Store`: dicts, durable at once. For tests and benchmarks that say so."""

from __future__ import annotations

from dm_actor.store.base import CommandRecord, RegistrationRecord, Snapshot


class MemoryStore:
    """Keeps the latest record of everything; nothing survives the process."""

    def __init__(self) -> None:
        self.registrations: dict[str, RegistrationRecord] = {}
        self.commands: dict[str, dict[str, CommandRecord]] = {}  # endpoint -> async-id ->
        self.subscriptions: dict[str, set[tuple[str, str]]] = {}  # endpoint -> (path, owner)
        self.writes = 0

    def load(self) -> Snapshot:
        subs = {ep: sorted(paths) for ep, paths in self.subscriptions.items()}
        commands = [c for per_device in self.commands.values() for c in per_device.values()]
        commands.sort(key=lambda c: c.accepted_at)
        return Snapshot(list(self.registrations.values()), commands, subs)

    def put_registration(self, record: RegistrationRecord) -> None:
        self.writes += 1
        self.registrations[record.endpoint] = record

    def delete_registration(self, endpoint: str) -> None:
        self.writes += 1
        self.registrations.pop(endpoint, None)
        self.commands.pop(endpoint, None)

    def put_command(self, record: CommandRecord) -> None:
        self.writes += 1
        self.commands.setdefault(record.endpoint, {})[record.async_id] = record

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

    async def durable(self) -> None:
        return None
