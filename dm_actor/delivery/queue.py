"""One device's command queue: the rules of delivery.md sections 1.5-1.7 and 2-8.

`DeviceQueue` decides; it never sends. Its caller (the device actor) feeds it contacts,
attempt results and sweeps, asks `next_attempt(now)` what to send, and drains
`take_finished()` into AsyncIDResponses. Pure: no I/O, no clock; every time is `now`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from dm_actor.coap.events import FailureReason
from dm_actor.delivery.outcomes import (
    EXPIRED,
    REMOVED,
    TIMED_OUT,
    UNREACHABLE,
    Outcome,
)


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """The server-wide settings the queue needs (delivery.md section 11)."""

    queue_length: int = 20
    awake_time: float = 93.0
    resend_grace: float = 120.0
    recent_limit: int = 32  # finished commands kept per device for `find` (inspection)


@dataclass(kw_only=True, slots=True, eq=False)
class Command:
    """One accepted device request and its delivery bookkeeping.

    Keyword-only: its fields are declared here once; the store's `CommandRecord` keeps
    those of them that outlive a restart (`dm_actor.actors.persist` converts by name).
    """

    async_id: str
    method: str
    uri: str
    payload: bytes
    content_format: int | None
    accept: int | None
    accepted_at: float
    expires_at: float
    attempts_left: int  # 1 + retry at acceptance
    observe: bool = False  # a subscription's Observe: no AsyncIDResponse is owed
    owner: str = ""  # the application (API key) the AsyncIDResponse goes to
    attempts: int = 0
    last_attempt_at: float | None = None
    finished_at: float | None = None
    # the CoAP exchange of the last attempt: resending it unchanged within the device's
    # EXCHANGE_LIFETIME lets the device's deduplication answer instead of executing twice
    mid: int | None = None
    token: bytes | None = None
    exchange_at: float | None = None

    def same_request(self, other: Command) -> bool:
        """The same request from the same application (rule 1.7): another application's
        command with this async-id is not a repeat of it (its AsyncIDResponse goes to that
        application alone)."""
        return (
            self.owner == other.owner
            and self.method == other.method
            and self.uri == other.uri
            and self.payload == other.payload
            and self.content_format == other.content_format
            and self.accept == other.accept
        )

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


Waiting = Literal["response", "earlier-commands", "delivery", "device-contact", "device-wake-up"]
"""What an unfinished command waits for (`GET /v2/device-requests/{device-id}`):
`response` (in flight), `earlier-commands` (behind another command), `delivery` (about to be
sent), `device-contact` (a non-queue device must be heard from again, rule 7.1),
`device-wake-up` (a queue-mode device must wake up, rules 6.2 and 7.1)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandStatus:
    """One unfinished command as `DeviceQueue.describe` sees it: a snapshot, times in the
    queue's clock (the caller turns them into wall-clock times)."""

    async_id: str
    method: str
    uri: str
    subscription: bool  # a subscription's Observe
    in_flight: bool
    attempts: int
    attempts_left: int
    accepted_at: float
    expires_at: float
    last_attempt_at: float | None
    #: the end of the resend grace after an attempt (rule 7.1), for the head of the queue
    next_attempt_not_before: float | None
    waiting_for: Waiting


class Verdict(enum.Enum):
    """What `DeviceQueue.submit` decided (rules 1.5-1.7)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # same async-id and request: 202 again, nothing new queued
    ASYNC_ID_IN_USE = "async_id_in_use"  # same async-id, another request: 409
    QUEUE_IS_FULL = "queue_is_full"  # 429


class DeviceQueue:
    """The delivery state of one device.

    Args:
        policy: shared settings.
        queue_mode: the device's binding has Q (section 6).
        now: the time of the registration, which counts as a contact.
    """

    __slots__ = (
        "_done",
        "_previous_attempt_at",
        "_recent",
        "awake_until",
        "in_flight",
        "policy",
        "queue",
        "queue_mode",
        "reachable",
    )

    def __init__(self, policy: DeliveryPolicy, *, queue_mode: bool, now: float) -> None:
        self.policy = policy
        self.queue_mode = queue_mode
        # a list, not a deque: an empty list holds no item array (56 B) where a deque
        # allocates its first 64-slot block at once (760 B), and the queue is short
        self.queue: list[Command] = []
        self.in_flight: Command | None = None
        self._previous_attempt_at: float | None = None  # of the command in flight
        self.reachable = True  # non-queue belief (rule 4.3); for TCP also "connected"
        self.awake_until = now + policy.awake_time  # queue-mode belief (rule 6.4)
        self._recent: dict[str, Command] | None = None
        self._done: list[tuple[Command, Outcome]] | None = None

    # -- inputs ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Unfinished commands: the queued ones and the one in flight."""
        return len(self.queue) + (self.in_flight is not None)

    def find(self, async_id: str) -> Command | None:
        """An unfinished or recently finished command with this async-id (for inspection: a
        finished command's async-id is the application's `AnswerMemory`'s, rule 1.7)."""
        if self.in_flight is not None and self.in_flight.async_id == async_id:
            return self.in_flight
        for cmd in self.queue:
            if cmd.async_id == async_id:
                return cmd
        return None if self._recent is None else self._recent.get(async_id)

    def submit(self, cmd: Command, now: float) -> Verdict:
        """Accept a command at the tail of the queue, or say why not (rules 1.5-1.7: the
        same async-id as an unfinished command is its repeat, or 409; a finished command's
        repeat is answered before it reaches the queue, `dm_actor.delivery.answers`)."""
        previous = self.find(cmd.async_id)
        if previous is not None and previous.finished_at is None:
            return Verdict.DUPLICATE if previous.same_request(cmd) else Verdict.ASYNC_ID_IN_USE
        if len(self) >= self.policy.queue_length:
            return Verdict.QUEUE_IS_FULL
        self.queue.append(cmd)
        return Verdict.ACCEPTED

    def contact(self, now: float) -> None:
        """The device sent us something (Register, Update, any message): rules 4.3, 6.2, 6.4."""
        self.reachable = True
        self.awake_until = now + self.policy.awake_time

    def disconnected(self) -> None:
        """A TCP device's connection closed: nothing can be sent until it reconnects (3.4)."""
        self.reachable = False
        self.awake_until = 0.0

    def awake(self, now: float) -> bool:
        """Whether delivery may start now (sections 4 and 6)."""
        if self.queue_mode:
            return self.reachable and now < self.awake_until
        return self.reachable

    def next_attempt(self, now: float, *, on_contact: bool = False) -> Command | None:
        """The command to send now, marked in flight; None when nothing may be sent.

        Finishes expired commands found at the head on the way (rule 3.1). A command that was
        attempted before is resent only on a contact, and only once `resend_grace` has passed
        since that attempt started (rule 7.1).
        """
        if self.in_flight is not None or not self.awake(now):
            return None
        queue = self.queue
        while queue:
            head = queue[0]
            if head.expired(now):
                queue.pop(0)
                self._finish(head, EXPIRED, now)
                continue
            if head.last_attempt_at is not None and (
                not on_contact or now - head.last_attempt_at < self.policy.resend_grace
            ):
                return None
            queue.pop(0)
            head.attempts += 1
            self._previous_attempt_at = head.last_attempt_at
            head.last_attempt_at = now
            self.in_flight = head
            return head
        return None

    def attempt_succeeded(self, outcome: Outcome, now: float) -> Command:
        """The device answered the command in flight (rule 3.3); it is a contact too."""
        cmd = self._take_in_flight()
        self.reachable = True
        self.awake_until = now + self.policy.awake_time
        self._finish(cmd, outcome, now)
        return cmd

    def attempt_failed(self, failure: FailureReason, now: float) -> Command:
        """The attempt in flight failed (rules 3.4-3.6, 4.3, 6.3)."""
        cmd = self._take_in_flight()
        cmd.attempts_left -= 1
        self.reachable = False
        self.awake_until = 0.0
        if cmd.expired(now):
            self._finish(cmd, EXPIRED, now)
        elif cmd.attempts_left <= 0:
            self._finish(cmd, TIMED_OUT if failure is FailureReason.TIMEOUT else UNREACHABLE, now)
        else:
            self.queue.insert(0, cmd)
        return cmd

    def attempt_not_sent(self) -> Command:
        """The attempt in flight never left: the device became unreachable before it could
        be sent. It goes back to the head without using up a retry (rule 3.4); the device
        is believed unreachable until its next contact."""
        cmd = self._take_in_flight()
        cmd.attempts -= 1
        cmd.last_attempt_at = self._previous_attempt_at  # its resend grace is as it was
        self.reachable = False
        self.awake_until = 0.0
        self.queue.insert(0, cmd)
        return cmd

    def expire_unsent(self, now: float) -> None:
        """The attempt in flight expired before it could leave (its write waited for a slow
        store): it is never sent, and finishes as expired (rule 5.2)."""
        self._finish(self._take_in_flight(), EXPIRED, now)

    def sweep(self, now: float) -> None:
        """Finish every expired command that is not in flight (rule 5.2)."""
        if not any(cmd.expired(now) for cmd in self.queue):
            return
        keep: list[Command] = []
        for cmd in self.queue:
            if cmd.expired(now):
                self._finish(cmd, EXPIRED, now)
            else:
                keep.append(cmd)
        self.queue = keep

    def remove_all(self, now: float) -> None:
        """The registration ended (rules 8.2, 8.3): every command finishes with 429."""
        if self.in_flight is not None:
            self._finish(self._take_in_flight(), REMOVED, now)
        while self.queue:
            self._finish(self.queue.pop(0), REMOVED, now)

    def finish_now(self, cmd: Command, outcome: Outcome, now: float) -> None:
        """Finish an accepted command without sending it (a GET answered from the cache)."""
        self.queue.remove(cmd)
        self._finish(cmd, outcome, now)

    # -- outputs --------------------------------------------------------------------------

    def describe(self, now: float, owner: str | None = None) -> list[CommandStatus]:
        """The unfinished commands, the one in flight first, each with what it waits for
        (sections 2, 4, 6 and rule 7.1, as `next_attempt` decides them); with `owner`, only
        that application's (another's async-ids and requests are not its business)."""
        out = []
        in_flight = self.in_flight
        if in_flight is not None and owner in (None, in_flight.owner):
            out.append(_status(in_flight, in_flight=True, not_before=None, waiting="response"))
        wake: Waiting = "device-wake-up" if self.queue_mode else "device-contact"
        for i, cmd in enumerate(self.queue):
            not_before = None
            waiting: Waiting
            if i or in_flight is not None:
                waiting = "earlier-commands"
            elif cmd.last_attempt_at is not None:  # resent on a contact after the grace
                not_before = cmd.last_attempt_at + self.policy.resend_grace
                waiting = wake
            else:
                waiting = "delivery" if self.awake(now) else wake
            if owner in (None, cmd.owner):
                out.append(_status(cmd, in_flight=False, not_before=not_before, waiting=waiting))
        return out

    def take_finished(self) -> list[tuple[Command, Outcome]]:
        """Commands that finished since the last call, in order, with their outcomes."""
        done = self._done
        if done is None:
            return []
        self._done = None
        return done

    # -- internals ------------------------------------------------------------------------

    def _take_in_flight(self) -> Command:
        cmd = self.in_flight
        if cmd is None:
            raise RuntimeError("no attempt in flight")
        self.in_flight = None
        return cmd

    def _finish(self, cmd: Command, outcome: Outcome, now: float) -> None:
        cmd.finished_at = now
        if self._done is None:
            self._done = []
        self._done.append((cmd, outcome))
        recent = self._recent
        if recent is None:
            recent = self._recent = {}
        recent.pop(cmd.async_id, None)
        recent[cmd.async_id] = cmd
        if len(recent) > self.policy.recent_limit:
            del recent[next(iter(recent))]


def _status(
    cmd: Command, *, in_flight: bool, not_before: float | None, waiting: Waiting
) -> CommandStatus:
    return CommandStatus(
        async_id=cmd.async_id,
        method=cmd.method,
        uri=cmd.uri,
        subscription=cmd.observe,
        in_flight=in_flight,
        attempts=cmd.attempts,
        attempts_left=cmd.attempts_left,
        accepted_at=cmd.accepted_at,
        expires_at=cmd.expires_at,
        last_attempt_at=cmd.last_attempt_at,
        next_attempt_not_before=not_before,
        waiting_for=waiting,
    )
