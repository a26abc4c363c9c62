"""Subscriptions: who observes what on which device, and the notifications they get.

It owns the applications' subscriptions (rule 9.1; kept on each device actor's
`subscriptions` and in the store, and outliving registrations, rule 9.3), the pre-subscriptions
that apply to devices as they register (rule 9.2), the Observe commands that (re-)establish
an observation, what their results mean (a subscription exists once the device accepted
its Observe; a refusal is reported as an `AsyncIDResponse`, docs/api.md "Subscriptions"), and
the publication of a device's notifications to its subscribers. It never sends to a device
(an Observe is a command in the device's queue like any other) and never handles
registrations.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dm_actor.actors.commands import MAX_EXPIRY, Accepted, Rejected
from dm_actor.actors.observing import (
    NOT_ANSWERED,
    NOT_OBSERVED,
    SUBSCRIPTION_PREFIX,
    Pending,
    PendingObserve,
    Subscribed,
    Waiter,
    canonical,
)
from dm_actor.delivery.outcomes import Outcome
from dm_actor.delivery.queue import Verdict
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import parse as parse_path
from dm_actor.store.base import PresubscriptionRecord

if TYPE_CHECKING:
    from dm_actor.actors.commands import Commands
    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.registry import Registry
    from dm_actor.delivery.queue import Command
    from dm_actor.lwm2m.send import SendRequest

__all__ = ["Pending", "Presubscription", "Subscribed", "Subscriptions", "canonical"]

_ASYNC = "async-responses"


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
        # the Observes queued or in flight, by command id and by (endpoint, path): at most
        # one per path, so bounded by the devices' queues ([delivery] queue_length each)
        self._observes: dict[str, PendingObserve] = {}
        self._by_path: dict[tuple[str, str], PendingObserve] = {}

    async def subscribe(self, device_id: str, path: str, owner: str = "") -> Accepted | Rejected:
        """The in-process form of `subscribe_waiting`, without the wait: `Accepted` for a
        subscription made or pending."""
        result = await self._subscribe(device_id, path, owner, 0.0, promise=False)
        return result if isinstance(result, Rejected) else Accepted()

    async def subscribe_waiting(
        self, device_id: str, path: str, owner: str, wait: float
    ) -> Subscribed | Pending | Rejected:
        """Rule 9.1: observe `path` for `owner`; the subscription outlives registrations (9.3).

        It exists once the device accepted the Observe: `Subscribed` if that happened within
        `wait` seconds (the API's is `[delivery] subscribe_wait`), or the path was observed
        already; else `Pending`, and the result (success or the device's error) follows as
        one AsyncIDResponse. A refused subscription is neither listed nor stored."""
        return await self._subscribe(device_id, path, owner, wait, promise=True)

    async def _subscribe(
        self, device_id: str, path: str, owner: str, wait: float, *, promise: bool
    ) -> Subscribed | Pending | Rejected:
        registry = self.registry
        actor = registry.by_endpoint.get(device_id)
        if actor is None:
            return Rejected(404, "DEVICE_NOT_FOUND")
        checked = self.commands.check_uri(actor, "GET", path, b"")
        if isinstance(checked, Rejected):
            return checked
        if registry.store_behind():
            return Rejected(503, "STORE_IS_BEHIND")
        now = registry.now()
        subscriptions = actor.subscriptions
        owners = None if subscriptions is None else subscriptions.get(checked)
        if owners is not None and owner in owners:
            return Subscribed()
        if owners is not None and checked in actor.observed_paths():
            owners.add(owner)  # (observed for another application: no new Observe)
            registry.store.put_subscription(actor.endpoint, checked, owner)
            return Subscribed()
        pending = self._by_path.get((actor.endpoint, checked))
        if pending is None:  # (queued now, or a stored one: it knows its first waiter)
            pending = self.queue_observe(actor, checked, now, Waiter(owner, str(uuid.uuid4())))
            if pending is None:
                return Rejected(429, "QUEUE_IS_FULL")
        waiter = pending.waiters.get(owner)  # (a repeat while it waits: the same id)
        if waiter is None:
            waiter = pending.waiters[owner] = Waiter(owner, str(uuid.uuid4()))
        waiter.withdrawn = False
        if promise:  # (a 202 unless it succeeds within the wait: the result is reported)
            waiter.promised = True
        waiter.answering += 1  # (from now on a success is this PUT's to answer: 200)
        try:
            await registry.store.durable()  # (the Observe, and so this waiter's id)
            if wait > 0:
                with trio.move_on_after(wait):
                    await waiter.event.wait()
        finally:
            waiter.answering -= 1
        # (`observe_finished` published the AsyncIDResponse unless a PUT was waiting for a
        # success: decided there, read here, in one step)
        if waiter.outcome is not None and waiter.observed:
            return Subscribed()
        waiter.owed = waiter.owed or promise  # (this 202's AsyncIDResponse comes, or came)
        return Pending(waiter.response_id)

    def observe_again(self, actor: DeviceActor, now: float) -> None:
        """The device's observations are gone (it registered again, or its TCP connection
        closed): queue an Observe for every subscribed path (rule 9.3)."""
        for path in sorted(actor.subscriptions or ()):
            self.queue_observe(actor, path, now)

    def _add_subscription(self, actor: DeviceActor, path: str, owner: str, now: float) -> None:
        """A pre-subscription's subscription: recorded at once, and removed (and reported)
        if the device refuses the Observe."""
        subscriptions = actor.subscriptions
        if subscriptions is None:
            subscriptions = actor.subscriptions = {}
        owners = subscriptions.get(path)
        if owners is not None and owner in owners:
            return
        if owners is None:
            if self.queue_observe(actor, path, now) is None and not actor.machine.observing(path):
                return  # (the queue is full: the device is not subscribed)
            owners = subscriptions[path] = set()
        owners.add(owner)
        self.registry.store.put_subscription(actor.endpoint, path, owner)

    def queue_observe(
        self, actor: DeviceActor, path: str, now: float, first: Waiter | None = None
    ) -> PendingObserve | None:
        """The Observe of `path` waiting or in flight (queued now if none is): None when
        the path is observed already, or the queue is full. `first` names the Observe after
        its waiter's AsyncIDResponse id, and its command carries that application (so that
        a restart still owes it the result)."""
        pending = self._stored(actor, path)
        if pending is not None or actor.machine.observing(path):
            return pending
        response_id = str(uuid.uuid4()) if first is None else first.response_id
        async_id = SUBSCRIPTION_PREFIX + response_id
        # an Observe waits for the device as long as the longest command may: a subscription
        # outlives registrations (rule 9.3) and a device away for days (after its connection
        # closed, say) is observed again when it is back
        cmd = self.commands.make_command(actor, async_id, "GET", path, b"", None, None, None,
                                         MAX_EXPIRY, now, observe=True,
                                         owner="" if first is None else first.owner)  # fmt: skip
        # (queued and stored; its task starts it, in order with its mail)
        if actor.submit(cmd, now, start=False) is Verdict.QUEUE_IS_FULL:
            return None
        pending = self._watch(async_id, actor.endpoint, path)
        if first is not None:
            pending.waiters[first.owner] = first
        return pending

    def _stored(self, actor: DeviceActor, path: str) -> PendingObserve | None:
        """The Observe of `path` waiting or in flight, also one restored from the store (with
        its first application's waiter: a repeat or a DELETE after a restart finds it)."""
        pending = self._by_path.get((actor.endpoint, path))
        if pending is not None or not actor.machine.observing(path):
            return pending
        queue = actor.machine.queue
        for cmd in (queue.in_flight, *queue.queue):  # (at most queue_length)
            if cmd is not None and cmd.observe and cmd.uri == path:
                pending = self._watch(cmd.async_id, actor.endpoint, path)
                pending.restore(cmd.owner)  # (its 202's application keeps its id)
                return pending
        return None

    def _watch(self, async_id: str, endpoint: str, path: str) -> PendingObserve:
        pending = self._observes.get(async_id)
        if pending is None:
            pending = self._observes[async_id] = PendingObserve(async_id, endpoint, path)
            self._by_path[endpoint, path] = pending
        return pending

    def observe_finished(self, actor: DeviceActor, cmd: Command, outcome: Outcome) -> None:
        """An Observe ended: the subscriptions waiting for it are made (the device accepted
        it) or not, each waiting application hears the result once (an AsyncIDResponse,
        unless its PUT is still waiting and answers 200), and subscriptions the device now
        refuses (after a Register, or made by a pre-subscription) are removed and reported
        (an AsyncIDResponse with a new id, and `ep` and `path`)."""
        endpoint, path = actor.endpoint, cmd.uri
        pending = self._observes.pop(cmd.async_id, None)
        if pending is None:
            pending = PendingObserve(cmd.async_id, endpoint, path)
        elif self._by_path.get((endpoint, path)) is pending:
            del self._by_path[endpoint, path]
        pending.restore(cmd.owner)  # (restored from the store: the first waiter's promise)
        waiters = pending.waiters
        observed = outcome.status == 200 and path in actor.observed_paths()
        if outcome.status == 200 and not observed:
            outcome = NOT_OBSERVED
        store = self.registry.store
        subscriptions = actor.subscriptions
        owners = None if subscriptions is None else subscriptions.get(path)
        if observed:
            for waiter in waiters.values():
                if not waiter.withdrawn:
                    if owners is None:
                        if subscriptions is None:
                            subscriptions = actor.subscriptions = {}
                        owners = subscriptions[path] = set()
                    owners.add(waiter.owner)
                    store.put_subscription(endpoint, path, waiter.owner)
            if not owners:  # (every waiter withdrew)
                actor.cancel_observation(path)
        elif owners is not None and outcome not in NOT_ANSWERED:
            assert subscriptions is not None
            del subscriptions[path]
            for owner in sorted(owners):
                store.delete_subscription(endpoint, path, owner)
                if owner not in waiters:
                    self._report(owner, str(uuid.uuid4()), endpoint, path, outcome)
        for waiter in waiters.values():
            waiter.outcome, waiter.observed = outcome, observed
            if waiter.owed or (waiter.promised and not (observed and waiter.answering)):
                self._report(waiter.owner, waiter.response_id, endpoint, path, outcome)
            waiter.event.set()

    def _report(
        self, owner: str, response_id: str, endpoint: str, path: str, outcome: Outcome
    ) -> None:
        """One AsyncIDResponse to `owner`, stored with the changes it reports and published
        once they are durable (as a command's, `Commands.command_finished`)."""
        item = outcome.as_async_response(response_id)
        item["ep"] = endpoint
        item["path"] = path
        registry = self.registry
        seq = self.commands.keep_event(owner, _ASYNC, item)
        owners = frozenset((owner,))
        registry.after_durable(lambda: registry.events.publish(_ASYNC, item, owners, seq))

    def command_finished(self, actor: DeviceActor, cmd: Command, outcome: Outcome) -> None:
        """A command ended (the device actor's `Finished`): an Observe's result is this
        part's, every other command's `Commands.command_finished`'s."""
        self.commands.command_finished(actor, cmd, outcome)
        if cmd.observe:
            self.observe_finished(actor, cmd, outcome)

    def unsubscribe(self, device_id: str, path: str, owner: str = "") -> bool:
        """Remove `owner`'s subscription; the observation ends with the last subscriber. A
        subscription still pending is withdrawn: its AsyncIDResponse still comes when the
        device answers, and it is never recorded."""
        actor = self.registry.by_endpoint.get(device_id)
        text = canonical(path)  # (as PUT names it)
        if actor is None:
            return False
        pending = self._stored(actor, text)
        waiter = None if pending is None else pending.waiters.get(owner)
        if waiter is not None:
            waiter.withdrawn = True
        owners = None if actor.subscriptions is None else actor.subscriptions.get(text)
        if owners is None or owner not in owners:
            return waiter is not None
        owners.discard(owner)
        if not owners:
            assert actor.subscriptions is not None
            del actor.subscriptions[text]
            actor.cancel_observation(text)
        self.registry.store.delete_subscription(device_id, text, owner)
        return True

    def unsubscribe_all(self, device_id: str, owner: str) -> None:
        """Remove `owner`'s subscriptions to the device, and withdraw its pending ones."""
        for path in self.subscriptions_of(device_id, owner) or ():
            self.unsubscribe(device_id, path, owner)
        actor = self.registry.by_endpoint.get(device_id)
        if actor is None:
            return
        queue = actor.queue
        for cmd in (queue.in_flight, *queue.queue):  # (its Observes: at most queue_length)
            pending = None if cmd is None or not cmd.observe else self._stored(actor, cmd.uri)
            waiter = None if pending is None else pending.waiters.get(owner)
            if waiter is not None:
                waiter.withdrawn = True

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
        objects = actor.reg.objects
        found = [str(p) for p in objects.paths() if f"{p}/".startswith(prefix)]
        marked = {path for path, params in objects.link_attributes().items() if "obs" in params}
        # a device that marks what it lets be observed (Pelion's client: `</3/0/0>;obs`) gets
        # Observes for those links only; one that marks nothing (instances), for every link
        return [p for p in found if p in marked] if marked else found

    # -- what the actors report -------------------------------------------------------------

    def notification(self, actor: DeviceActor, uri: str, outcome: Outcome) -> None:
        item: dict[str, object] = {"ep": actor.endpoint, "path": uri}
        response = outcome.as_async_response("")
        for key in ("ct", "payload", "max-age"):
            if key in response:
                item[key] = response[key]
        item.setdefault("payload", "")
        owners = (actor.subscriptions or {}).get(uri)
        pending = self._by_path.get((actor.endpoint, uri)) if self._by_path else None
        if pending is not None:  # (the Observe's first value: its waiters get it too)
            waiting = {w.owner for w in pending.waiters.values() if not w.withdrawn}
            owners = waiting if owners is None else owners | waiting
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
