"""Single-value formats without structure: text/plain (0) and application/octet-stream (42).

Owns the conversion between one resource value and its plain or opaque body. The path is never
in the payload: decoding needs the request's path as `base`. Never guesses a resource's type:
text decodes to str, opaque to bytes.
"""

from __future__ import annotations

import base64

from dm_actor.lwm2m.content.values import (
    ContentDecodeError,
    ContentEncodeError,
    ResourceValue,
    encode_ids,
    resource_ids,
)


def single_path(base: str | None) -> str:
    """The request path a single-value body belongs to; it must name a resource (instance)."""
    if base is None:
        raise ContentDecodeError("a single-value payload needs the request path as base")
    resource_ids(base)
    return base


def single_value(values: list[ResourceValue]) -> ResourceValue:
    """The one value a single-value format can carry."""
    if len(values) != 1:
        raise ContentEncodeError(f"a single-value format carries 1 value, not {len(values)}")
    encode_ids(values[0])
    return values[0]


def decode_text(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode a text/plain body (UTF-8) as the str value of the resource at `base`."""
    path = single_path(base)
    try:
        return [ResourceValue(path, payload.decode())]
    except UnicodeDecodeError as exc:
        raise ContentDecodeError(f"text/plain body is not UTF-8: {exc}") from None


def encode_text(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode one value as text/plain: bool as 1/0, opaque as base64, Objlnk as `3:0`."""
    value = single_value(values).value
    match value:
        case bool():
            return b"1" if value else b"0"
        case bytes():
            return base64.b64encode(value)
        case None:
            raise ContentEncodeError("text/plain cannot carry a missing value")
        case _:
            return str(value).encode()


def decode_opaque(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode an application/octet-stream body as the bytes value of the resource at `base`."""
    return [ResourceValue(single_path(base), payload)]


def encode_opaque(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode one bytes value as application/octet-stream."""
    value = single_value(values).value
    if not isinstance(value, bytes):
        raise ContentEncodeError(f"octet-stream carries bytes, not {type(value).__name__}")
    return value
