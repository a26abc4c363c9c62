"""Command submission: the in-process API's `submit`, and the durable events commands end in.

It owns the checks of a submitted command (delivery.md section 1, rules 1.2, 1.4, 9.4), the
`Command` made from it with the defaults of its device's mode, the 202 that waits until the
store holds it, and the AsyncIDResponse a finished command becomes (stored with its sequence
number, published once durable, forgotten once its channel delivered it). It never decides
when or how a command is sent (the device actor and its `DeviceQueue` do) and never routes
a peer's message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from dm_actor.delivery.queue import Command, Verdict
from dm_actor.lwm2m.attributes import InvalidAttributes, parse_attributes
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import parse as parse_path
from dm_actor.store.base import EventRecord

if TYPE_CHECKING:
    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.events import Item
    from dm_actor.actors.registry import Registry
    from dm_actor.delivery.outcomes import Outcome

ASYNC_ID = re.compile(r"^[\w\-]{1,40}$", re.ASCII)
METHODS = frozenset(("GET", "PUT", "POST", "DELETE"))
MIN_EXPIRY, MAX_EXPIRY = 60, 2_592_000
MAX_RETRY = 10
_ASYNC = "async-responses"
_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Accepted:
    """202 Accepted; `duplicate` when the async-id was already accepted (rule 1.7)."""

    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request was refused: `status` is the HTTP status, `code` the plain-string body."""

    status: int
    code: str


class Commands:
    """Accepts commands for registered devices and keeps the events they end in."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.event_seq = 0  # numbers the durable events (AsyncIDResponses)

    # -- the in-process API -----------------------------------------------------------------

    async def submit(
        self,
        device_id: str,
        method: str,
        uri: str,
        *,
        async_id: str,
        payload: bytes = b"",
        content_format: int | None = None,
        accept: int | None = None,
        retry: int | None = None,
        expiry: int | None = None,
        owner: str = "",
    ) -> Accepted | Rejected:
        """Accept a device request (delivery.md section 1) or say why not.

        `owner` names the application whose notification channel gets the AsyncIDResponse.
        """
        registry = self.registry
        if not ASYNC_ID.match(async_id):
            return Rejected(400, "MALFORMED_ASYNC_ID")
        if method not in METHODS:
            return Rejected(400, "MALFORMED_JSON_CONTENT")
        if retry is not None and not 0 <= retry <= MAX_RETRY:
            return Rejected(400, "MALFORMED_RETRY")
        if expiry is not None and not MIN_EXPIRY <= expiry <= MAX_EXPIRY:
            return Rejected(400, "MALFORMED_EXPIRY_SECONDS")
        actor = registry.by_endpoint.get(device_id)
        if actor is None:
            return Rejected(404, "DEVICE_NOT_FOUND")
        checked = self.check_uri(actor, method, uri, payload)
        if isinstance(checked, Rejected):
            return checked
        if registry.store_behind():
            return Rejected(503, "STORE_IS_BEHIND")  # nothing is accepted that it cannot keep
        now = registry.now()
        cmd = self.make_command(actor, async_id, method, checked, payload, content_format,
                                accept, retry, expiry, now, owner=owner)  # fmt: skip
        # queued, answered from the cache, or started at once (`DeviceActor.submit`): its
        # write (with the attempt's Message ID and token, if started) is asked for now, and
        # the 202 waits until it is durable (a crash in between would lose it)
        verdict = actor.submit(cmd, now)
        if verdict is Verdict.ASYNC_ID_IN_USE:
            return Rejected(409, "ASYNC_ID_IN_USE")
        if verdict is Verdict.QUEUE_IS_FULL:
            return Rejected(429, "QUEUE_IS_FULL")
        # (a duplicate: the first acceptance may still be on its way)
        await registry.store.durable()
        return Accepted(duplicate=verdict is Verdict.DUPLICATE)

    @staticmethod
    def check_uri(actor: DeviceActor, method: str, uri: str, payload: bytes) -> str | Rejected:
        """Rules 1.2, 1.4 and 9.4: the normalised uri, or the rejection."""
        text, _, query = uri.partition("?")
        if not text.startswith("/"):
            text = "/" + text
        try:
            path = parse_path(text)
        except InvalidPath:
            return Rejected(400, "MALFORMED_JSON_CONTENT")
        if not actor.reg.objects.contains(path):
            return Rejected(404, "URI_PATH_DOES_NOT_EXISTS")
        if query and method == "PUT" and not payload:
            try:
                parse_attributes(query)
            except InvalidAttributes:
                return Rejected(400, "MALFORMED_NOTIFICATION_RULES")
        return f"{path}?{query}" if query else str(path)

    def make_command(
        self,
        actor: DeviceActor,
        async_id: str,
        method: str,
        uri: str,
        payload: bytes,
        content_format: int | None,
        accept: int | None,
        retry: int | None,
        expiry: int | None,
        now: float,
        *,
        observe: bool = False,
        owner: str = "",
    ) -> Command:
        d = self.registry.settings.delivery
        queue_mode = actor.reg.queue_mode
        if retry is None:
            retry = d.default_retry_queue_mode if queue_mode else d.default_retry
        if expiry is None:
            expiry = d.default_expiry_queue_mode if queue_mode else d.default_expiry
        return Command(
            async_id=async_id,
            method=method,
            uri=uri,
            payload=payload,
            content_format=content_format,
            accept=accept,
            accepted_at=now,
            expires_at=now + expiry,
            attempts_left=1 + retry,
            observe=observe,
            owner=owner,
        )

    # -- what the actors report -------------------------------------------------------------

    def command_finished(self, actor: DeviceActor, cmd: Command, outcome: Outcome) -> None:
        """The command ended: its AsyncIDResponse replaces it in the store, in the same
        commit, and goes to the channel once durable; the channel's delivery forgets it
        (`events_delivered`). A crash in between re-sends it after the restart, with the
        same `seq` (at least once; `include_uid` lets a client drop the repeat)."""
        registry = self.registry
        registry.store.delete_command(actor.endpoint, cmd.async_id)
        if cmd.observe:
            return
        item = outcome.as_async_response(cmd.async_id)
        self.event_seq += 1
        seq = self.event_seq
        owner = cmd.owner
        registry.store.put_event(
            EventRecord(owner, seq, _ASYNC, _json(item), registry.now() + registry.wall_offset)
        )
        owners = frozenset((owner,))
        registry.after_durable(lambda: registry.events.publish(_ASYNC, item, owners, seq))

    def events_delivered(self, owner: str, seqs: list[int]) -> None:
        """`owner`'s channel delivered (or dropped) its stored events `seqs`: forget them."""
        self.registry.store.delete_events(owner, seqs)

    def keep_event(self, owner: str, kind: str, item: Item) -> int:
        """Store an event that waits in `owner`'s channel (see `NotificationHub.spill`), so
        that it is still owed after a restart; returns its `seq`."""
        registry = self.registry
        self.event_seq += 1
        seq = self.event_seq
        registry.store.put_event(
            EventRecord(owner, seq, kind, _json(item), registry.now() + registry.wall_offset)
        )
        return seq
