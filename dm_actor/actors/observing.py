"""A subscription being made: the Observe it waits for and the applications waiting.

`Subscriptions` (rule 9.1) decides with these: a subscription exists once the device
accepted its Observe; until then each application waiting for it is a `Waiter` on the path's
one `PendingObserve` (docs/api.md, "Subscriptions"). Plain state, no I/O but a `trio.Event`.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from dm_actor.delivery.outcomes import (
    EXPIRED,
    INCOMPLETE,
    REMOVED,
    TIMED_OUT,
    UNREACHABLE,
    Outcome,
)
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import parse as parse_path

#: an Observe's command id is this and its AsyncIDResponse's id: it cannot collide with an
#: application's async-id (rule 1.1's pattern has no ':')
SUBSCRIPTION_PREFIX = "sub:"
#: the device answered 2.05 without Observe: it did not add us as an observer (RFC 7641 3.1)
NOT_OBSERVED = Outcome(412, "OBSERVE_NOT_ACCEPTED")
#: outcomes that are no answer of the device's: a subscription it had is kept (and observed
#: again at its next Register), one being made is not made
NOT_ANSWERED = (EXPIRED, REMOVED, TIMED_OUT, UNREACHABLE, INCOMPLETE)


def canonical(path: str) -> str:
    """The path as a subscription is kept (`/3303/00/5700` is `/3303/0/5700`, as a PUT's
    `check_uri` makes it): GET and DELETE find what PUT subscribed. Not a path: unchanged."""
    text = path if path.startswith("/") else "/" + path
    try:
        return str(parse_path(text))
    except InvalidPath:
        return text


@dataclass(frozen=True, slots=True)
class Subscribed:
    """200: the device accepted the Observe within the wait, or the path was observed."""


@dataclass(frozen=True, slots=True)
class Pending:
    """202: the result follows on the channel as an AsyncIDResponse with this id."""

    async_response_id: str


class Waiter:
    """One application waiting for an Observe's result (its subscription being made)."""

    __slots__ = (
        "answering", "event", "observed", "outcome", "owed", "owner", "promised",
        "response_id", "withdrawn",
    )  # fmt: skip

    def __init__(self, owner: str, response_id: str) -> None:
        self.owner = owner
        self.response_id = response_id
        self.event = trio.Event()
        self.answering = 0  # PUTs in their short wait: they answer a success (200)
        self.outcome: Outcome | None = None
        self.observed = False
        self.withdrawn = False  # DELETEd while pending: reported, never recorded
        # a 202 promised its result (or will: a PUT in its wait, `answering`, that fails);
        # an in-process subscriber (`Subscriptions.subscribe`) has no id to hear of
        self.promised = False
        # a 202 with this id was answered: its AsyncIDResponse is owed whatever a later PUT
        # (a repeat, answering 200 in its own wait) answers
        self.owed = False


class PendingObserve:
    """An Observe queued or in flight, and who waits for its result."""

    __slots__ = ("async_id", "endpoint", "path", "waiters")

    def __init__(self, async_id: str, endpoint: str, path: str) -> None:
        self.async_id = async_id
        self.endpoint = endpoint
        self.path = path
        self.waiters: dict[str, Waiter] = {}  # owner -> waiter

    def restore(self, owner: str) -> None:
        """A stored Observe (restored at a restart) names the application whose 202 gave out
        its id: that application waits for it, with that id (owed), unless it is known."""
        if owner and owner not in self.waiters:
            restored = Waiter(owner, self.async_id[len(SUBSCRIPTION_PREFIX) :])
            restored.promised = restored.owed = True
            self.waiters[owner] = restored
