"""Typed CoAP errors. A `DecodeError` carries the answer the protocol requires.

Pure: no I/O.
"""

from __future__ import annotations

import enum


class Reply(enum.Enum):
    """What a receiver must do with a message it cannot accept (RFC 7252 4.2, 4.3, 5.4.1)."""

    IGNORE = "ignore"  # silently drop (too short, wrong version, a bad ACK/RST/NON)
    RESET = "reset"  # reject a confirmable message with a matching Reset
    BAD_REQUEST = "4.00"  # answer a confirmable request with 4.00 Bad Request
    BAD_OPTION = "4.02"  # answer a confirmable request with 4.02 Bad Option
    ABORT = "abort"  # RFC 8323: send Abort and close the connection


class CoapError(Exception):
    """Base of every error raised by `dm_actor.coap`."""


class DecodeError(CoapError):
    """Bytes that are not an acceptable CoAP message.

    Attributes:
        reply: the protocol's answer.
        mtype, mid, token: the header fields when they could be read (needed to build a Reset
            or an error response), else None.
    """

    def __init__(
        self,
        message: str,
        reply: Reply,
        *,
        mtype: int | None = None,
        mid: int | None = None,
        token: bytes | None = None,
    ) -> None:
        super().__init__(message)
        self.reply = reply
        self.mtype = mtype
        self.mid = mid
        self.token = token


class LocalProtocolError(CoapError):
    """We were asked to do something the protocol forbids (a bug in the caller)."""
