"""The decoded content model shared by every LwM2M content-format codec.

Owns `ResourceValue` (one absolute path with one value), `ObjLink`, the codec errors and the
small path helpers the codecs use. Never does I/O and never knows any object's data types: a
format that does not carry types (TLV, text, opaque) decodes to bytes or str.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from dm_actor.lwm2m.errors import InvalidPath, Lwm2mError
from dm_actor.lwm2m.path import MAX_ID, parse


class ContentDecodeError(Lwm2mError, ValueError):
    """A payload is malformed for its content format (the request deserves 4.00 / 4.06)."""


class ContentEncodeError(Lwm2mError, ValueError):
    """Values cannot be represented in the requested content format."""


class UnsupportedContentFormat(Lwm2mError, ValueError):
    """The content format number has no codec here."""

    def __init__(self, content_format: int) -> None:
        super().__init__(f"unsupported content format {content_format}")
        self.content_format = content_format


class ObjLink(NamedTuple):
    """An LwM2M Objlnk value `object_id:instance_id`."""

    object_id: int
    instance_id: int

    def __str__(self) -> str:
        return f"{self.object_id}:{self.instance_id}"

    @classmethod
    def parse(cls, text: str) -> ObjLink:
        """`"3:0"` -> `ObjLink(3, 0)`; raises ContentDecodeError on anything else."""
        left, sep, right = text.partition(":")
        if not sep:
            raise ContentDecodeError(f"object link {text!r} is not 'object:instance'")
        return cls(_id(left, text), _id(right, text))


Value = int | float | bool | str | bytes | ObjLink | None


class ResourceValue(NamedTuple):
    """One value at an absolute resource or resource-instance path, e.g. `"/3/0/6/1"`.

    `value` is None for a record that names a path without a value (SenML read-composite,
    where the path may also be an object or instance; LwM2M CBOR null). `time` is the SenML or
    LwM2M JSON time (base time + time) as sent, when present; a time below 2**28 is relative to
    now (RFC 8428 4.5.3), for the caller to resolve.
    """

    path: str
    value: Value
    time: float | None = None


def _id(text: str, context: str) -> int:
    if not (text.isdecimal() and text.isascii() and len(text) <= 5) or int(text) > MAX_ID:
        raise ContentDecodeError(f"bad LwM2M id {text!r} in {context!r}")
    return int(text)


@functools.lru_cache(maxsize=1024)  # devices send the same paths again and again
def path_ids(path: str) -> tuple[int, ...]:
    """`"/3/0/1"` -> `(3, 0, 1)`; raises ContentDecodeError for anything but a path."""
    try:
        return parse(path).ids
    except InvalidPath as exc:
        raise ContentDecodeError(str(exc)) from None


def make_path(ids: tuple[int, ...] | list[int]) -> str:
    """`(3, 0, 1)` -> `"/3/0/1"`."""
    return "/" + "/".join(map(str, ids))


def resource_ids(path: str) -> tuple[int, ...]:
    """The ids of a resource or resource-instance path; ContentDecodeError for any other."""
    ids = path_ids(path)
    if len(ids) < 3:
        raise ContentDecodeError(f"path {path!r} does not name a resource")
    return ids


def encode_ids(value: ResourceValue | str, depth: int = 3) -> tuple[int, ...]:
    """The ids of a value's path (or of a base path) for an encoder, at least `depth` deep.

    Raises:
        ContentEncodeError: not a path, or shallower than `depth`.
    """
    path = value if isinstance(value, str) else value.path
    try:
        ids = path_ids(path)
    except ContentDecodeError as exc:
        raise ContentEncodeError(str(exc)) from None
    if len(ids) < depth:
        raise ContentEncodeError(f"path {path!r} is shallower than {depth} ids")
    return ids


def check_finite(value: float) -> float:
    """Encoders for JSON formats reject NaN and infinities, which JSON cannot carry."""
    if not math.isfinite(value):
        raise ContentEncodeError(f"{value!r} has no JSON representation")
    return value
