"""RFC 7641 Observe: option values and the notification freshness rule.

Owns the Observe option's register/deregister values, the 24-bit sequence number encoding, and
the reordering rule of RFC 7641 section 3.4 (with the RFC 8323 section 7.1 variant for reliable,
ordered transports). It never keeps observer lists, matches tokens or reads a clock: the time
of arrival comes in as `now`. Pure: no I/O.
"""

from __future__ import annotations

from dm_actor.coap.message import uint_bytes

#: Observe option value in a GET that registers an observation (RFC 7641 section 2).
OBSERVE_REGISTER = 0
#: Observe option value in a GET that cancels an observation.
OBSERVE_DEREGISTER = 1

SEQ_MODULUS = 1 << 24
_HALF = 1 << 23
#: Seconds after which any notification counts as fresher, whatever its number (section 3.4).
FRESHNESS_SECONDS = 128.0


def is_fresher(v1: int, t1: float, v2: int, t2: float) -> bool:
    """Whether notification (v2, t2) is fresher than the stored (v1, t1) (RFC 7641 3.4).

    Args:
        v1: sequence number of the newest notification seen so far (0 .. 2**24 - 1).
        t1: local time, in seconds, when it arrived.
        v2: sequence number of the incoming notification.
        t2: local time, in seconds, when it arrived.

    Returns:
        True if (v1 < v2 and v2 - v1 < 2**23) or (v1 > v2 and v1 - v2 > 2**23) or
        t2 > t1 + 128 s.
    """
    return (
        (v1 < v2 and v2 - v1 < _HALF)
        or (v1 > v2 and v1 - v2 > _HALF)
        or t2 > t1 + FRESHNESS_SECONDS
    )


def observe_bytes(seq: int) -> bytes:
    """The Observe option value for sequence number `seq`, reduced modulo 2**24 (0-3 bytes)."""
    return uint_bytes(seq % SEQ_MODULUS)


def observe_value(raw: bytes) -> int | None:
    """Decode an Observe option value.

    Returns:
        The number, or None when the value is longer than 3 bytes: Observe is elective, so a
        value of the wrong length is treated like an unrecognised option and ignored
        (RFC 7252 5.4.3).
    """
    return int.from_bytes(raw, "big") if len(raw) <= 3 else None


class NotificationOrder:
    """The newest (sequence number, arrival time) of one observation; filters stale ones.

    The response that established the observation counts as the first notification. Over a
    reliable, ordered transport (`reliable=True`, RFC 8323 7.1) the sequence number is
    ignored and the latest notification is always the freshest.
    """

    __slots__ = ("_seq", "_time", "reliable")

    def __init__(self, *, reliable: bool = False) -> None:
        self.reliable = reliable
        self._seq: int | None = None
        self._time = 0.0

    def accept(self, seq: int, now: float) -> bool:
        """Whether the notification numbered `seq` arriving at `now` is fresh; if so record it.

        Args:
            seq: the notification's Observe value, 0 .. 2**24 - 1 (ignored when `reliable`).
            now: arrival time in seconds, from the caller's clock.

        Returns:
            True to use the notification, False to discard it as reordered or duplicated.
        """
        if self.reliable or self._seq is None or is_fresher(self._seq, self._time, seq, now):
            self._seq = seq
            self._time = now
            return True
        return False
