"""How a command ends: the AsyncIDResponse values of delivery.md section 10.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from dm_actor.coap.numbers import code_reason, media_type

REQUEST_EXPIRED = "REQUEST_EXPIRED"
DEVICE_REMOVED_REGISTRATION = "DEVICE_REMOVED_REGISTRATION"
TIMEOUT = "TIMEOUT"
NOT_CONNECTED = "NOT_CONNECTED"
BLOCKWISE_TRANSFER_FAILED = "BLOCKWISE_TRANSFER_FAILED"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one command: the fields of its `AsyncIDResponse` except `id`."""

    status: int
    error: str | None = None
    payload: bytes | None = None
    content_format: int | None = None
    max_age: int | None = None

    def as_async_response(self, async_id: str) -> dict[str, object]:
        """The Pelion `AsyncIDResponse` object (payload in base64, ct as a media type)."""
        out: dict[str, object] = {"id": async_id, "status": self.status}
        if self.error is not None:
            out["error"] = self.error
        if self.payload:
            out["payload"] = base64.b64encode(self.payload).decode()
        if self.content_format is not None:
            out["ct"] = media_type(self.content_format)
        if self.max_age is not None:
            out["max-age"] = self.max_age
        return out


def http_status(coap_code: int) -> int:
    """Section 10's status for a device's CoAP response code."""
    cls, detail = coap_code >> 5, coap_code & 0x1F
    if cls == 2:
        return 200
    if cls == 4:
        return 400 + detail
    if cls == 5:
        return 500 + detail if detail <= 4 else 502
    return 502


def from_response(
    coap_code: int, payload: bytes, content_format: int | None, max_age: int
) -> Outcome:
    """The outcome of an attempt the device answered (rule 3.3)."""
    status = http_status(coap_code)
    error = None if status == 200 else code_reason(coap_code)
    if not payload:
        return Outcome(status, error)
    return Outcome(status, error, payload, content_format, max_age)


EXPIRED = Outcome(429, REQUEST_EXPIRED)
REMOVED = Outcome(429, DEVICE_REMOVED_REGISTRATION)
TIMED_OUT = Outcome(504, TIMEOUT)
UNREACHABLE = Outcome(503, NOT_CONNECTED)
#: the device answered in blocks (RFC 7959) and the body could not be put together
INCOMPLETE = Outcome(502, BLOCKWISE_TRANSFER_FAILED)
