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

from dm_actor.delivery.answers import Answer, AnswerMemory, Repeat, request_key
from dm_actor.delivery.queue import Command, Verdict
from dm_actor.lwm2m.attributes import InvalidAttributes, parse_attributes
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import parse as parse_path
from dm_actor.store.base import AnswerRecord, EventRecord

if TYPE_CHECKING:
    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.events import Item
    from dm_actor.actors.registry import Registry
    from dm_actor.delivery.outcomes import Outcome
    from dm_actor.store.base import Snapshot

ASYNC_ID = re.compile(r"^[\w\-]{1,40}$", re.ASCII)
METHODS = frozenset(("GET", "PUT", "POST", "DELETE"))
MIN_EXPIRY, MAX_EXPIRY = 60, 2_592_000
MAX_RETRY = 10
#: the bytes of remembered AsyncIDResponses kept per application (rule 1.7), besides the
#: count of `[delivery] remembered_async_ids`; the oldest finished are forgotten first
REMEMBERED_BYTES = 16 * 2**20
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
        # in cluster mode every node numbers in its own residue class (`dm_actor.node`), so
        # that two nodes never give one application's events the same number (uid)
        self.seq_stride = 1
        self.seq_residue = 0
        # rule 1.7: finished commands' AsyncIDResponses by application and async-id ...
        self.answers = AnswerMemory(
            limit=registry.settings.delivery.remembered_async_ids, byte_limit=REMEMBERED_BYTES
        )
        # ... and the device of each unfinished command, by application and async-id (an
        # async-id is unique per application across its devices)
        self.unfinished: dict[str, dict[str, str]] = {}

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
        answer = self.answers.get(owner, async_id, registry.now() + registry.wall_offset)
        if answer is not None:  # its command finished: a repeat, or 409 (rule 1.7)
            repeated = await self._repeat(device_id, method, uri, payload, content_format,
                                          accept, async_id=async_id, owner=owner)  # fmt: skip
            if repeated is not None:
                return repeated
        if self._unfinished_elsewhere(owner, async_id, device_id):
            return Rejected(409, "ASYNC_ID_IN_USE")
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
        per = self.unfinished.setdefault(owner, {})
        new = async_id not in per
        if new:  # (before: the machine may finish it at once, `command_finished`)
            per[async_id] = device_id
        verdict = actor.submit(cmd, now, caller_waits=True)
        try:
            if new and verdict is not Verdict.ACCEPTED:
                self.unindex(owner, async_id, device_id)
            if verdict is Verdict.ASYNC_ID_IN_USE:
                return Rejected(409, "ASYNC_ID_IN_USE")
            if verdict is Verdict.QUEUE_IS_FULL:
                return Rejected(429, "QUEUE_IS_FULL")
            if verdict is not Verdict.DUPLICATE:
                registry.statistics["commands_accepted"] += 1
            # (a duplicate: the first acceptance may still be on its way)
            await registry.store.durable()
        finally:
            actor.released(registry.now())  # (the attempt this write held goes out now)
        return Accepted(duplicate=verdict is Verdict.DUPLICATE)

    async def _repeat(
        self,
        device_id: str,
        method: str,
        uri: str,
        payload: bytes,
        content_format: int | None,
        accept: int | None,
        *,
        async_id: str,
        owner: str,
    ) -> Accepted | Rejected | None:
        """A submission whose async-id's command finished within its window (rule 1.7): the
        same request to the same device gets 202 and is never executed again; the stored
        AsyncIDResponse (same body, same `uid`) goes to the application again through its
        channel, unless it still waits there. Another request or device: 409. None: the
        window ended just now (the clock moves): a new command."""
        registry = self.registry
        normal = _normal_uri(uri)
        if normal is None:
            return Rejected(400, "MALFORMED_JSON_CONTENT")
        wall = registry.now() + registry.wall_offset
        key = request_key(method, normal, payload, content_format, accept)
        repeat = self.answers.check(owner, async_id, device_id, key, wall)
        if repeat is Repeat.NEW:
            return None
        if repeat is Repeat.IN_USE:
            return Rejected(409, "ASYNC_ID_IN_USE")
        if repeat is Repeat.REPLAY:
            if registry.store_behind():
                return Rejected(503, "STORE_IS_BEHIND")
            answer = self.answers.replayed(owner, async_id)
            store_event = EventRecord(owner, answer.seq, _ASYNC, answer.item, wall)
            registry.store.put_event(store_event)  # owed again, across a restart too
            item = msgspec.json.decode(answer.item)
            owners = frozenset((owner,))
            seq = answer.seq
            registry.after_durable(lambda: registry.events.publish(_ASYNC, item, owners, seq))
        await registry.store.durable()  # (REPLAY or WAITING)
        return Accepted(duplicate=True)

    def _unfinished_elsewhere(self, owner: str, async_id: str, device_id: str) -> bool:
        """Whether `owner`'s `async_id` names an unfinished command of another device."""
        per = self.unfinished.get(owner)
        endpoint = None if per is None else per.get(async_id)
        if endpoint is None or endpoint == device_id:
            return False
        actor = self.registry.by_endpoint.get(endpoint)
        cmd = None if actor is None else actor.queue.find(async_id)
        if cmd is None or cmd.owner != owner:  # (gone unnoticed: never keep an id in use)
            self.unindex(owner, async_id, endpoint)
            return False
        return True

    def _next_seq(self) -> int:
        """The next number of a durable event: above every one used, in this node's class."""
        seq = self.event_seq + 1
        stride = self.seq_stride
        if stride > 1:
            seq += (self.seq_residue - seq) % stride
        self.event_seq = seq
        return seq

    def unindex(self, owner: str, async_id: str, endpoint: str) -> None:
        """`owner`'s `async_id` no longer names an unfinished command of `endpoint` here
        (it finished, or its device was handed to another node: `Supervisor.release`)."""
        per = self.unfinished.get(owner)
        if per is not None and per.get(async_id) == endpoint:
            del per[async_id]
            if not per:
                del self.unfinished[owner]

    def restore(self, snapshot: Snapshot) -> None:
        """Bring back the async-ids the store kept (rule 1.7): the unfinished commands' and
        the remembered answers (waiting when their event is still owed to a channel)."""
        for c in snapshot.commands:
            if not c.observe:
                self.unfinished.setdefault(c.owner, {})[c.async_id] = c.endpoint
        owed = {(e.owner, e.seq) for e in snapshot.events if e.kind == _ASYNC}
        answers = self.answers
        wall = self.registry.now() + self.registry.wall_offset
        forgotten: dict[str, list[str]] = {}
        for a in snapshot.answers:
            answer = Answer(endpoint=a.endpoint, request=a.request, seq=a.seq, item=a.item,
                            finished_at=a.finished_at, forget_at=a.forget_at,
                            waiting=(a.owner, a.seq) in owed)  # fmt: skip
            forgotten.setdefault(a.owner, []).extend(
                answers.remember(a.owner, a.async_id, answer, wall)
            )
            self.event_seq = max(self.event_seq, a.seq)  # (a uid is never made twice)
        for owner, ids in forgotten.items():
            if ids:
                self.registry.store.delete_answers(owner, ids)

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
        key = (outcome.status, outcome.error)
        registry.outcomes[key] = registry.outcomes.get(key, 0) + 1
        registry.delivery_latency.observe(registry.now() - cmd.accepted_at)
        self.unindex(cmd.owner, cmd.async_id, actor.endpoint)
        item = outcome.as_async_response(cmd.async_id)
        seq = self._next_seq()
        owner = cmd.owner
        body = _json(item)
        wall = registry.now() + registry.wall_offset
        registry.store.put_event(EventRecord(owner, seq, _ASYNC, body, wall))
        self._remember(actor.endpoint, cmd, seq, body, wall)
        owners = frozenset((owner,))
        registry.after_durable(lambda: registry.events.publish(_ASYNC, item, owners, seq))

    def _remember(self, endpoint: str, cmd: Command, seq: int, body: bytes, wall: float) -> None:
        """Keep the AsyncIDResponse for repeats of `cmd`'s async-id (rule 1.7), in memory and
        in the store (in the same commit as the event), for `expiry-seconds` from now."""
        key = request_key(cmd.method, cmd.uri, cmd.payload, cmd.content_format, cmd.accept)
        forget_at = wall + (cmd.expires_at - cmd.accepted_at)
        owner, async_id = cmd.owner, cmd.async_id
        answer = Answer(endpoint=endpoint, request=key, seq=seq, item=body, finished_at=wall,
                        forget_at=forget_at)  # fmt: skip
        store = self.registry.store
        forgotten = self.answers.remember(owner, async_id, answer, wall)
        if self.answers.get(owner, async_id, wall) is None:
            return  # (no memory at all: `remembered_async_ids` is 0)
        store.put_answer(AnswerRecord(owner, async_id, endpoint, key, seq, body, wall, forget_at))
        if forgotten:
            store.delete_answers(owner, forgotten)

    def forget_expired_answers(self) -> None:
        """Forget remembered answers whose window ended (each expiry sweep; the store drops
        their rows with the next answer it writes, and never loads them)."""
        self.answers.forget_expired(self.registry.now() + self.registry.wall_offset)

    def events_delivered(self, owner: str, seqs: list[int]) -> None:
        """`owner`'s channel delivered (or dropped) its stored events `seqs`: forget them
        (a repeat of an AsyncIDResponse among them now gets it again, rule 1.7)."""
        self.registry.store.delete_events(owner, seqs)
        self.answers.handed_over(owner, seqs)

    def events_handed(self, owner: str, seqs: list[int]) -> None:
        """A long poll's response carrying `owner`'s events `seqs` was written (acknowledged
        by the next poll, `events_delivered`): a repeat of one of its AsyncIDResponses now
        gets it again (rule 1.7), as after any hand-over."""
        self.answers.handed_over(owner, seqs)

    def events_acknowledged(self, owner: str, seqs: list[int]) -> None:
        """The next poll acknowledged that response: its events are delivered, but an
        AsyncIDResponse sent again since it was written (a repeat) still waits, stored."""
        again = self.answers.waiting_again(owner, seqs)
        self.events_delivered(owner, [s for s in seqs if s not in again] if again else seqs)

    def keep_event(self, owner: str, kind: str, item: Item) -> int:
        """Store an event that waits in `owner`'s channel (see `NotificationHub.spill`), so
        that it is still owed after a restart; returns its `seq`."""
        registry = self.registry
        seq = self._next_seq()
        registry.store.put_event(
            EventRecord(owner, seq, kind, _json(item), registry.now() + registry.wall_offset)
        )
        return seq


def _normal_uri(uri: str) -> str | None:
    """`uri` as `Commands.check_uri` normalises it (leading `/`, the path's canonical
    form, the query as given), or None when its path is malformed."""
    text, _, query = uri.partition("?")
    if not text.startswith("/"):
        text = "/" + text
    try:
        path = parse_path(text)
    except InvalidPath:
        return None
    return f"{path}?{query}" if query else str(path)
