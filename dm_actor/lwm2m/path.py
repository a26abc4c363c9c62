"""LwM2M paths: `/object/instance/resource/resource-instance`.

Owns the `Path` value, its text form (`"/3/0/1"`) and its CoAP form (Uri-Path options). Each
id is a decimal 0..65535 of at most five ASCII digits; one to four ids. The leading `/` may
be left out (a published SDK sends `"3/0/1"`); nothing else is forgiven: empty segments, a
trailing `/`, signs, spaces and non-ASCII digits raise `InvalidPath`. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dm_actor.coap.numbers import OptionNumber
from dm_actor.lwm2m.errors import InvalidPath

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dm_actor.coap.message import Option

MAX_ID = 65535
_URI_PATH = OptionNumber.URI_PATH.value


@dataclass(frozen=True, slots=True)
class Path:
    """An object, object instance, resource or resource instance path.

    An id may be set only when every id before it is set; the constructor checks this and the
    0..65535 range, raising `InvalidPath`.
    """

    object_id: int
    instance_id: int | None = None
    resource_id: int | None = None
    resource_instance_id: int | None = None

    def __post_init__(self) -> None:
        ids = (self.object_id, self.instance_id, self.resource_id, self.resource_instance_id)
        seen_none = False
        for value in ids:
            if value is None:
                seen_none = True
            elif seen_none or not 0 <= value <= MAX_ID:
                raise InvalidPath(f"invalid path ids {ids!r}")

    @property
    def ids(self) -> tuple[int, ...]:
        """The ids that are set, outermost first: `Path(3, 0)` -> `(3, 0)`."""
        ids = (self.object_id, self.instance_id, self.resource_id, self.resource_instance_id)
        return tuple(i for i in ids if i is not None)

    @property
    def is_object(self) -> bool:
        return self.instance_id is None

    @property
    def is_instance(self) -> bool:
        return self.instance_id is not None and self.resource_id is None

    @property
    def is_resource(self) -> bool:
        return self.resource_id is not None and self.resource_instance_id is None

    @property
    def is_resource_instance(self) -> bool:
        return self.resource_instance_id is not None

    def startswith(self, other: Path) -> bool:
        """True when `other` is this path or one of its ancestors (`/3/0/1` starts with `/3`)."""
        mine = self.ids
        theirs = other.ids
        return mine[: len(theirs)] == theirs

    def uri_path_options(self, alt_path: str = "") -> tuple[Option, ...]:
        """Uri-Path options for this path, below the client's alternate path (e.g. `/lwm2m`)."""
        prefix = tuple((_URI_PATH, s.encode()) for s in alt_path.split("/") if s)
        return prefix + tuple((_URI_PATH, str(i).encode()) for i in self.ids)

    def __str__(self) -> str:
        return "/" + "/".join(map(str, self.ids))


def _parse_id(segment: str) -> int:
    if not (0 < len(segment) <= 5 and segment.isascii() and segment.isdigit()):
        raise InvalidPath(f"path segment {segment[:16]!r} is not an id 0..65535")
    value = int(segment)
    if value > MAX_ID:
        raise InvalidPath(f"path id {value} is larger than {MAX_ID}")
    return value


def from_segments(segments: Sequence[str]) -> Path:
    """A path from its segments, as CoAP Uri-Path options carry them (`("3", "0", "1")`).

    Raises:
        InvalidPath: no segment, more than four, or a segment that is not an id.
    """
    if not 1 <= len(segments) <= 4:
        raise InvalidPath(f"an LwM2M path has 1 to 4 segments, not {len(segments)}")
    return Path(*map(_parse_id, segments))


def parse(text: str) -> Path:
    """Parse `"/3/0/1"` (or `"3/0/1"`) into a `Path`.

    Raises:
        InvalidPath: for anything but one to four ids separated by single slashes.
    """
    body = text.removeprefix("/")
    if not body:
        raise InvalidPath("empty path")
    if len(body) > 23:  # four ids of five digits and three slashes
        raise InvalidPath(f"path {text[:32]!r}... is too long")
    return from_segments(body.split("/"))


def split_query(uri: str) -> tuple[Path, str]:
    """Split `"/3/0/1?pmin=10"` into `(Path(3, 0, 1), "pmin=10")`; no `?` gives `""`.

    Raises:
        InvalidPath: when the part before `?` is not a path.
    """
    path, _, query = uri.partition("?")
    return parse(path), query
