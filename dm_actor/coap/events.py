"""Events that a `CoapEndpoint` hands to its owner.

Each event is a frozen, slotted value naming something that happened on the wire (or failed to).
This module owns the event types only; it never builds messages, reads a clock or does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm_actor.coap.message import Message


class FailureReason(enum.StrEnum):
    """Why an exchange ended without an answer; `delivery` reads it as the failure of an
    attempt (rule 3.4). A `StrEnum`, so that a log line reads "timeout", not the member."""

    TIMEOUT = "timeout"  # no answer in time (every retransmission used up)
    RESET = "reset"  # the peer answered with a Reset
    UNREACHABLE = "unreachable"  # the caller reported an ICMP port-unreachable


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The peer sent a new request (duplicates are never delivered twice)."""

    request: Message


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The response to our request `token`: piggybacked, separate (CON or NON), or over TCP.

    The first response to an observe request is a `ResponseReceived` too.
    """

    token: bytes
    response: Message


@dataclass(frozen=True, slots=True)
class NotificationReceived:
    """A later response on a live observation `token` (RFC 7641).

    The observation ends with a non-2.xx notification or one without an Observe option.
    """

    token: bytes
    notification: Message


@dataclass(frozen=True, slots=True)
class RequestAcknowledged:
    """An empty ACK for our confirmable request: retransmission stops, the response comes later."""

    token: bytes


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Our request `token` ended without a response.

    `reason` is TIMEOUT (no answer in time), RESET (the peer answered with a Reset) or
    UNREACHABLE (the caller reported an ICMP port-unreachable).
    """

    token: bytes
    reason: FailureReason


@dataclass(frozen=True, slots=True)
class NotificationFailed:
    """Our confirmable notification on observation `token` got a Reset or was never ACKed.

    RFC 7641 4.5.2 and 3.6: either way the peer is no longer interested; `reason` is RESET,
    TIMEOUT or UNREACHABLE.
    """

    token: bytes
    reason: FailureReason


@dataclass(frozen=True, slots=True)
class MessageRefused:
    """A message from the peer was dropped unread: every entry of the deduplication window
    is a request still in process (its answer waits), so there is no room to remember it.
    The peer retransmits it (CoAP's own back-off); the caller counts it."""

    mid: int


Event = (
    RequestReceived
    | ResponseReceived
    | NotificationReceived
    | RequestAcknowledged
    | RequestFailed
    | NotificationFailed
    | MessageRefused
)
