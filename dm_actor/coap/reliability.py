"""Retransmission state of one message we sent (RFC 7252 4.2, 4.8).

An `Exchange` is a request waiting for its answer, or a confirmable notification waiting for its
ACK. It knows its next deadline: a retransmission while retransmissions remain, else the moment
it fails. This module never sends, never reads a clock and draws randomness only from the
injected `random.Random`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

    from dm_actor.coap.numbers import TransmissionParameters


def first_timeout(params: TransmissionParameters, rng: random.Random | None) -> float:
    """The initial ACK timeout: uniform in [ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR].

    The rng is consulted only when the random factor is above 1.

    Raises:
        ValueError: the factor is above 1 and no rng was given.
    """
    factor = params.ack_random_factor
    if factor == 1.0:
        return params.ack_timeout
    if rng is None:
        raise ValueError("ack_random_factor > 1 needs an injected random.Random")
    return rng.uniform(params.ack_timeout, params.ack_timeout * factor)


class Exchange:
    """One outstanding message of ours.

    Attributes:
        token: the request's token (for a notification: the observation's token).
        mid: the Message ID (0 over TCP).
        datagram: the bytes to retransmit (empty when never retransmitted).
        observe: a request that registers an observation.
        notification: a confirmable notification rather than a request.
        first_send: when it was first sent.
        deadline: when `expire` must be called next.
        timeout: the current retransmission timeout (doubles on each retransmission).
        retransmits_left: retransmissions still allowed (0 once ACKed, or for NON and TCP).
    """

    __slots__ = (
        "datagram",
        "deadline",
        "first_send",
        "mid",
        "notification",
        "observe",
        "retransmits_left",
        "timeout",
        "token",
    )

    def __init__(
        self,
        token: bytes,
        mid: int,
        datagram: bytes,
        now: float,
        timeout: float,
        retransmits: int,
        *,
        observe: bool = False,
        notification: bool = False,
    ) -> None:
        self.token = token
        self.mid = mid
        self.datagram = datagram
        self.observe = observe
        self.notification = notification
        self.first_send = now
        self.deadline = now + timeout
        self.timeout = timeout
        self.retransmits_left = retransmits

    def expire(self, now: float) -> bool:
        """The deadline has passed: retransmit (True) or give up (False).

        After a True return the caller sends `datagram` again; the next deadline is one doubled
        timeout after `now`.
        """
        if not self.retransmits_left:
            return False
        self.retransmits_left -= 1
        self.timeout *= 2
        self.deadline = now + self.timeout
        return True

    def acknowledge(self, params: TransmissionParameters) -> None:
        """An empty ACK arrived: stop retransmitting; wait for the separate response until
        MAX_TRANSMIT_WAIT after the first send."""
        self.retransmits_left = 0
        self.deadline = self.first_send + params.max_transmit_wait
