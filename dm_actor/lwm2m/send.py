"""LwM2M Send (1.1, information reporting): `POST /dp` with SenML JSON (110) or SenML CBOR (112).

Owns what a Send's request means: which requests are a Send the server takes (`parse_send`),
its body as absolute-path values (`parse_body`, also what a Block1 reassembly calls with the
whole body), and what each subscribed path is told (`SendRequest.payloads`). Names resolve as
RFC 8428 says, `bn` + `n` (`{"bn":"/3/0/","n":"9"}` from Wakaama, `{bn:"/3/0",n:"/0"}` from
Anjay, `{"bn":"/","n":"1/0/1"}`); `bt` + `t` give a record's time, and a time below 2**28 is
relative to when the server read the Send (RFC 8428 4.5.3), so it is made absolute here.

Pure: no I/O, no clock (the wall-clock time comes in as `wall_now`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dm_actor.coap.numbers import Code, ContentFormat
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import ContentDecodeError, ContentEncodeError, ResourceValue
from dm_actor.lwm2m.content.values import make_path, path_ids

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dm_actor.coap.message import Message

#: the content formats a Send may use (LwM2M 1.1: SenML JSON and SenML CBOR; LwM2M CBOR
#: is 1.2's, which this server does not speak)
SEND_FORMATS = frozenset((ContentFormat.SENML_JSON.value, ContentFormat.SENML_CBOR.value))
#: records in one Send; more get 4.13 (a UDP datagram of 4096 bytes holds ~1,300 CBOR records)
MAX_RECORDS = 4096
#: bytes of one Send's body (a Block1-reassembled one included); more get 4.13
MAX_BODY = 65536
#: RFC 8428 4.5.3: a time below this is relative to now
_RELATIVE = 2**28
_POST = Code.POST.value


@dataclass(frozen=True, slots=True)
class SendError:
    """A refused Send: `code` is the CoAP response code to answer with."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SendRequest:
    """A valid Send: its values (absolute resource paths, absolute times) in the order sent,
    and the content format it came in (the notifications keep it)."""

    content_format: int
    values: tuple[ResourceValue, ...]

    def covered(self, path: str) -> list[ResourceValue]:
        """The values at `path` or below it (`/3/0` covers `/3/0/9` and `/3/0/6/1`, not
        `/3/10`), in the order sent."""
        below = path.rstrip("/") + "/"
        return [v for v in self.values if v.path == path or v.path.startswith(below)]

    def payloads(self, paths: Iterable[str]) -> list[tuple[str, bytes]]:
        """`(path, payload)` for every path in `paths` the Send covers, in the order of
        `paths`: the covered values re-encoded as a SenML pack in the Send's own format,
        with their times (what a read of that path in that format gives, limited to the
        resources the device sent)."""
        out: list[tuple[str, bytes]] = []
        for path in paths:
            values = self.covered(path)
            if values:
                out.append((path, content.encode(self.content_format, values)))
        return out


def parse_send(
    msg: Message, wall_now: float, *, max_records: int = MAX_RECORDS, max_body: int = MAX_BODY
) -> SendRequest | SendError:
    """Read a request `lwm2m.registration.classify` called a `"send"` (its Uri-Path starts
    with `dp`): only `POST /dp` is a Send (4.05 for another method, 4.04 for a longer path).
    """
    if msg.code != _POST:
        return SendError(Code.METHOD_NOT_ALLOWED, "a Send is a POST")
    if msg.uri_path != ("dp",):
        return SendError(Code.NOT_FOUND, f"no resource /{'/'.join(msg.uri_path)}")
    return parse_body(
        msg.content_format, msg.payload, wall_now, max_records=max_records, max_body=max_body
    )


def parse_body(
    content_format: int | None,
    body: bytes,
    wall_now: float,
    *,
    max_records: int = MAX_RECORDS,
    max_body: int = MAX_BODY,
) -> SendRequest | SendError:
    """A Send's body (whole: a Block1 transfer reassembled first) as values.

    Refused: a format other than SenML JSON or CBOR, or none (4.15); a body over `max_body`
    bytes or with more than `max_records` records (4.13); a body that is not a SenML pack, is
    empty, has a record without a value or naming anything but a resource or resource
    instance (4.00). A time below 2**28 is relative (RFC 8428) and becomes `wall_now + t`.
    """
    if content_format not in SEND_FORMATS:
        return SendError(Code.UNSUPPORTED_CONTENT_FORMAT, f"content format {content_format}")
    if len(body) > max_body:
        return SendError(Code.REQUEST_ENTITY_TOO_LARGE, f"{len(body)} bytes")
    try:
        values = content.decode(content_format, body)
    except ContentDecodeError as exc:
        return SendError(Code.BAD_REQUEST, str(exc))
    if not values:
        return SendError(Code.BAD_REQUEST, "no records")
    if len(values) > max_records:
        return SendError(Code.REQUEST_ENTITY_TOO_LARGE, f"{len(values)} records")
    out: list[ResourceValue] = []
    for value in values:
        if value.value is None:
            return SendError(Code.BAD_REQUEST, f"record {value.path!r} has no value")
        time = value.time
        if time is not None and time < _RELATIVE:
            time = wall_now + time
        # one spelling per path ("3/0/9" and "/3/0/9/" too): subscriptions match on it
        out.append(ResourceValue(make_path(path_ids(value.path)), value.value, time))
    try:
        # the notifications re-encode subsets of these values in this format: what does not
        # encode as a whole is refused here, not found out while publishing
        content.encode(content_format, out)
    except ContentEncodeError as exc:
        return SendError(Code.BAD_REQUEST, str(exc))
    return SendRequest(content_format, tuple(out))
