"""Subscriptions: who observes what on which device, and the notifications they get.

It owns the applications' subscriptions (rule 9.1; kept on each device actor's
`subscriptions` and in the store, and outliving registrations, rule 9.3), the pre-subscriptions
that apply to devices as they register (rule 9.2), the Observe commands that (re-)establish
an observation, and the publication of a device's notifications to its subscribers. It never
sends to a device (an Observe is a command in the device's queue like any other) and never
handles registrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dm_actor.actors.commands import MAX_EXPIRY, Accepted, Rejected
from dm_actor.delivery.outcomes import Outcome
from dm_actor.delivery.queue import Verdict
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import parse as parse_path
from dm_actor.store.base import PresubscriptionRecord

if TYPE_CHECKING:
    from dm_actor.actors.commands import Commands
    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.registry import Registry
    from dm_actor.lwm2m.send import SendRequest

_SUBSCRIPTION_PREFIX = "sub:"  # cannot collide with an async-id (rule 1.1's pattern has no ':')


@dataclass(frozen=True, slots=True)
class Presubscription:
    """A pre-subscription (rule 9.2): patterns may end with `*`."""

    endpoint_name: str | None = None
    endpoint_type: str | None = None
    resource_paths: tuple[str, ...] = ()

    def matches_device(self, endpoint: str, endpoint_type: str | None = None) -> bool:
        """Both given patterns match (a pattern may end with `*`)."""
        if self.endpoint_name is not None and not _match(self.endpoint_name, endpoint):
            return False
        return self.endpoint_type is None or (
            endpoint_type is not None and _match(self.endpoint_type, endpoint_type)
        )


def _match(pattern: str, value: str) -> bool:
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


class Subscriptions:
    """The subscriptions of every application to every device, and the pre-subscriptions."""

    def __init__(self, registry: Registry, commands: Commands) -> None:
        self.registry = registry
        self.commands = commands
        self.presubscriptions: dict[str, list[Presubscription]] = {}  # owner -> list
        self._observe_counter = 0  # internal async-ids of Observe commands

    async def subscribe(self, device_id: str, path: str, owner: str = "") -> Accepted | Rejected:
        """Rule 9.1: observe `path` for `owner`; the subscription outlives registrations (9.3)."""
        registry = self.registry
        actor = registry.by_endpoint.get(device_id)
        if actor is None:
            return Rejected(404, "DEVICE_NOT_FOUND")
        checked = self.commands.check_uri(actor, "GET", path, b"")
        if isinstance(checked, Rejected):
            return checked
        if registry.store_behind():
            return Rejected(503, "STORE_IS_BEHIND")
        if self._add_subscription(actor, checked, owner, registry.now()) is Verdict.QUEUE_IS_FULL:
            return Rejected(429, "QUEUE_IS_FULL")
        await registry.store.durable()
        return Accepted()

    def observe_again(self, actor: DeviceActor, now: float) -> None:
        """The device's observations are gone (it registered again, or its TCP connection
        closed): queue an Observe for every subscribed path (rule 9.3)."""
        for path in sorted(actor.subscriptions or ()):
            self.queue_observe(actor, path, now)

    def _add_subscription(self, actor: DeviceActor, path: str, owner: str, now: float) -> Verdict:
        subscriptions = actor.subscriptions
        if subscriptions is None:
            subscriptions = actor.subscriptions = {}
        owners = subscriptions.get(path)
        if owners is not None and owner in owners:
            return Verdict.DUPLICATE
        if owners is None:
            verdict = self.queue_observe(actor, path, now)
            if verdict is Verdict.QUEUE_IS_FULL:
                return verdict
            owners = subscriptions[path] = set()
        owners.add(owner)
        self.registry.store.put_subscription(actor.endpoint, path, owner)
        return Verdict.ACCEPTED

    def queue_observe(self, actor: DeviceActor, path: str, now: float) -> Verdict:
        if actor.machine.observing(path):
            return Verdict.DUPLICATE
        self._observe_counter += 1
        async_id = f"{_SUBSCRIPTION_PREFIX}{self._observe_counter}"
        # an Observe waits for the device as long as the longest command may: a subscription
        # outlives registrations (rule 9.3) and a device away for days (after its connection
        # closed, say) is observed again when it is back
        cmd = self.commands.make_command(actor, async_id, "GET", path, b"", None, None,
                                         None, MAX_EXPIRY, now, observe=True)  # fmt: skip
        # (queued and stored; its task starts it, in order with its mail)
        return actor.submit(cmd, now, start=False)

    def unsubscribe(self, device_id: str, path: str, owner: str = "") -> bool:
        """Remove `owner`'s subscription; the observation ends with the last subscriber."""
        actor = self.registry.by_endpoint.get(device_id)
        text = path if path.startswith("/") else "/" + path
        owners = (
            None if actor is None or actor.subscriptions is None else actor.subscriptions.get(text)
        )
        if actor is None or owners is None or owner not in owners:
            return False
        owners.discard(owner)
        if not owners:
            assert actor.subscriptions is not None
            del actor.subscriptions[text]
            actor.cancel_observation(text)
        self.registry.store.delete_subscription(device_id, text, owner)
        return True

    def subscriptions_of(self, device_id: str, owner: str | None = None) -> list[str] | None:
        """The paths `owner` (or anyone, for None) subscribed to; None for an unknown device."""
        actor = self.registry.by_endpoint.get(device_id)
        if actor is None:
            return None
        subscriptions = actor.subscriptions or {}
        return sorted(p for p, owners in subscriptions.items() if owner is None or owner in owners)

    # -- pre-subscriptions ------------------------------------------------------------------

    def set_presubscriptions(self, owner: str, presubscriptions: list[Presubscription]) -> None:
        """Replace `owner`'s pre-subscriptions; they apply to devices registering from now on."""
        if presubscriptions:
            self.presubscriptions[owner] = list(presubscriptions)
        else:
            self.presubscriptions.pop(owner, None)
        self.registry.store.set_presubscriptions(
            owner,
            [
                PresubscriptionRecord(p.endpoint_name, p.endpoint_type, p.resource_paths)
                for p in presubscriptions
            ],
        )

    def apply_presubscriptions(self, actor: DeviceActor, now: float) -> None:
        if not self.presubscriptions:
            return
        for owner, presubscriptions in self.presubscriptions.items():
            for pre in presubscriptions:
                if not pre.matches_device(actor.endpoint, actor.reg.endpoint_type):
                    continue
                for pattern in pre.resource_paths:
                    for path in self._expand(actor, pattern):
                        self._add_subscription(actor, path, owner, now)

    @staticmethod
    def _expand(actor: DeviceActor, pattern: str) -> list[str]:
        text = pattern if pattern.startswith("/") else "/" + pattern
        if not text.endswith("*"):
            try:
                path = parse_path(text)
            except InvalidPath:
                return []
            return [str(path)] if actor.reg.objects.contains(path) else []
        prefix = text[:-1]  # "/3/0/*" covers /3/0 itself: registrations name instances only
        return [str(p) for p in actor.reg.objects.paths() if f"{p}/".startswith(prefix)]

    # -- what the actors report -------------------------------------------------------------

    def notification(self, actor: DeviceActor, uri: str, outcome: Outcome) -> None:
        item: dict[str, object] = {"ep": actor.endpoint, "path": uri}
        response = outcome.as_async_response("")
        for key in ("ct", "payload", "max-age"):
            if key in response:
                item[key] = response[key]
        item.setdefault("payload", "")
        owners = (actor.subscriptions or {}).get(uri)
        if owners:
            self.registry.events.publish("notifications", item, frozenset(owners))

    def sent(self, actor: DeviceActor, send: SendRequest) -> None:
        """An LwM2M Send's values: one notification per subscribed path the Send covers,
        shaped as the device's notifications are (the values under that path, as a SenML
        pack in the Send's format; see docs/api.md, "LwM2M Send")."""
        subscriptions = actor.subscriptions
        if not subscriptions:
            return
        for path, payload in send.payloads(sorted(subscriptions)):
            self.notification(actor, path, Outcome(200, None, payload, send.content_format))
