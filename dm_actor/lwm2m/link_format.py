"""RFC 6690 CoRE link-format, and the LwM2M object list a client registers with.

Owns `parse_links` / `serialise_links` (the Register and Update payloads, Discover answers) and
`registered_objects`, which turns a Register payload into `RegisteredObjects`: the objects and
object instances the device announced, the object versions (`ver=`), the content formats on the
root entry (`ct=`) and the alternate path (`</lwm2m>;rt="oma.lwm2m"`).

The parser is lenient where real clients are sloppy (whitespace, empty entries and trailing
commas) and strict where the meaning would be a guess (unbalanced `<`, unterminated quotes,
junk between parameters): those raise `LinkFormatError`, never anything else.
Pure: no I/O.
"""

from __future__ import annotations

import bisect
import re
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple

from dm_actor.lwm2m.errors import LinkFormatError
from dm_actor.lwm2m.path import MAX_ID, Path

if TYPE_CHECKING:
    from collections.abc import Iterable

ROOT_RT = "oma.lwm2m"

# One link-value: `<target>`, its parameters, then `,` or the end. Possessive quantifiers keep
# a failed match from backtracking through the parameters.
_LINK = re.compile(
    r"[\s,]*+<([^<>]*+)>"
    r'((?:\s*+;\s*+[^\s;,="<>]++(?:\s*+=\s*+(?:"(?:[^"\\]|\\.)*+"|[^;,"<>]*+))?+)*+)'
    r"\s*+(?:,|\Z)",
    re.DOTALL,
)
_EMPTY = re.compile(r"[\s,]*+\Z")
# `;name`, `;name=token` or `;name="quoted \" string"`, with optional whitespace around.
_PARAM = re.compile(
    r'\s*;\s*([^\s;,="<>]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^;,"<>]*)))?',
    re.DOTALL,
)
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)
_NAME = re.compile(r'[^\s;,="<>]+')
# RFC 6690 ptokenchar without `<`, `=` and `>`, which would confuse other parsers.
_PTOKEN = re.compile(r"[!#$%&'()*+\-./0-9:?@A-Za-z\[\]^_`{|}~]+")
# Values that clients conventionally quote even when they are plain tokens.
_ALWAYS_QUOTED = frozenset(("rt", "if", "anchor", "rel", "rev", "title", "type"))


class Link(NamedTuple):
    """One link-value: `</3/0>;ver=1.1;obs` -> `Link("/3/0", {"ver": "1.1", "obs": None})`.

    A parameter without a value (a flag) maps to None; a quoted value is stored unquoted.
    """

    target: str
    params: dict[str, str | None]


def parse_links(payload: bytes | str) -> list[Link]:
    """Parse a link-format document.

    Empty entries (`,,`, a trailing `,`) are skipped. A repeated parameter keeps its first value.

    Raises:
        LinkFormatError: the payload is not UTF-8 or not link-format.
    """
    if isinstance(payload, bytes):
        try:
            text = payload.decode()
        except UnicodeDecodeError as exc:
            raise LinkFormatError(f"link-format payload is not UTF-8: {exc}") from None
    else:
        text = payload
    links: list[Link] = []
    pos = 0
    while (link := _LINK.match(text, pos)) is not None:
        target, raw_params = link.groups()
        params: dict[str, str | None] = {}
        if raw_params:
            for param in _PARAM.finditer(raw_params):
                name, quoted, token = param.groups()
                if quoted is not None:
                    value: str | None = _UNESCAPE.sub(r"\1", quoted)
                else:
                    value = None if token is None else token.rstrip()
                params.setdefault(name, value)
        links.append(Link(target, params))
        pos = link.end()
    if _EMPTY.match(text, pos) is None:
        raise LinkFormatError(f"not link-format at offset {pos}: {text[pos : pos + 20]!r}")
    return links


def serialise_links(links: Iterable[Link]) -> str:
    """The link-format text for `links`; `parse_links` gives them back.

    `rt`, `if`, `anchor`, `rel`, `rev`, `title`, `type` and values that are not plain tokens are
    quoted; other values (`ver=1.1`, `ct=110`, `dim=2`) are not.

    Raises:
        ValueError: a target containing `<` or `>`, or a parameter name that is not a token.
    """
    return ",".join(_serialise_link(link) for link in links)


def _serialise_link(link: Link) -> str:
    if "<" in link.target or ">" in link.target:
        raise ValueError(f"link target {link.target!r} contains '<' or '>'")
    parts = [f"<{link.target}>"]
    for name, value in link.params.items():
        if _NAME.fullmatch(name) is None:
            raise ValueError(f"link parameter name {name!r} is not a token")
        if value is None:
            parts.append(f";{name}")
        elif name in _ALWAYS_QUOTED or _PTOKEN.fullmatch(value) is None:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f';{name}="{escaped}"')
        else:
            parts.append(f";{name}={value}")
    return "".join(parts)


# -- the LwM2M object list --------------------------------------------------------------------

# An entry is one unsigned 64-bit key, `object_id << 17 | (instance_id + 1)`, with 0 in the low
# bits for an object listed on its own. Keys are kept sorted in native byte order in a `bytes`
# value: 8 bytes an entry where a tuple of ints would take 40, and still immutable and hashable.
_INSTANCE_BITS = 17
_INSTANCE_MASK = (1 << _INSTANCE_BITS) - 1
_KEY_TYPE: Final = "Q"
# `/O` or `/O/I` (the leading `/` optional, as `path.parse` allows)
_OBJECT_TARGET = re.compile(r"/?([0-9]{1,5})(?:/([0-9]{1,5}))?")


@dataclass(frozen=True, slots=True, repr=False)
class RegisteredObjects:
    """The objects and object instances a client registered.

    An object listed without instances (`</2>`) exists but has no instances, so `contains`
    answers True for `/2` (the path of a Create) and False for `/2/0`. The server answers a
    request for an instance the client did not register with 4.04 (delivery.md 1.4).

    Attributes:
        alt_path: the client's alternate path (`"/lwm2m"`), or `""` for the root.
        content_formats: the `ct=` values of the root entry, in the given order: the formats
            the client announces (`Registration.preferred_accept` chooses among them).
        versions: `(object_id, ver)` for each object registered with a `ver=` attribute.
        entries: the packed, sorted keys; build values with `registered_objects`.
    """

    alt_path: str = ""
    content_formats: tuple[int, ...] = ()
    versions: tuple[tuple[int, str], ...] = ()
    entries: bytes = b""

    def __repr__(self) -> str:
        paths = ",".join(map(str, self.paths()))
        return (
            f"RegisteredObjects(alt_path={self.alt_path!r}, "
            f"content_formats={self.content_formats!r}, versions={self.versions!r}, "
            f"paths={paths!r})"
        )

    def _keys(self) -> memoryview[int]:
        return memoryview(self.entries).cast(_KEY_TYPE)

    def contains(self, path: Path) -> bool:
        """Did the client register the object (and the instance, when `path` names one)?"""
        keys = self._keys()
        if path.instance_id is None:
            low = path.object_id << _INSTANCE_BITS
            i = bisect.bisect_left(keys, low)
            return i < len(keys) and keys[i] >> _INSTANCE_BITS == path.object_id
        key = (path.object_id << _INSTANCE_BITS) | (path.instance_id + 1)
        i = bisect.bisect_left(keys, key)
        return i < len(keys) and keys[i] == key

    def paths(self) -> list[Path]:
        """Every registered entry, sorted: `Path(o)` for an object listed on its own,
        `Path(o, i)` for each instance."""
        return list(_entries(self.entries)[0])

    def version(self, object_id: int) -> str | None:
        """The object's `ver=` attribute; None when the client gave none (meaning 1.0)."""
        for obj, ver in self.versions:
            if obj == object_id:
                return ver
        return None

    def links(self) -> list[Link]:
        """The registration as links; `registered_objects(objects.links()) == objects`."""
        links: list[Link] = []
        if self.alt_path or self.content_formats:
            root: dict[str, str | None] = {"rt": ROOT_RT}
            if self.content_formats:
                root["ct"] = " ".join(map(str, self.content_formats))
            links.append(Link(self.alt_path or "/", root))
        versions = dict(self.versions)
        paths, targets = _entries(self.entries)
        for path, target in zip(paths, targets, strict=True):
            ver = versions.get(path.object_id) if path.is_object else None
            params: dict[str, str | None] = {} if ver is None else {"ver": ver}
            links.append(Link(self.alt_path + target, params))
        return links


#: `entries` -> their paths and path texts; a fleet registers a few distinct object lists, so
#: this spares each registration, Update and store record the rebuilding of the same paths.
#: Only lists of at most `SHARED_ENTRIES` entries are kept: a few hundred hostile lists of
#: thousands of entries each would otherwise hold gigabytes here (found by an attacker).
_ENTRIES: dict[bytes, tuple[tuple[Path, ...], tuple[str, ...]]] = {}
_ENTRIES_LIMIT = 1024
SHARED_ENTRIES = 64


def _entries(entries: bytes) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    found = _ENTRIES.get(entries)
    if found is None:
        paths: list[Path] = []
        for key in memoryview(entries).cast(_KEY_TYPE):
            instance = key & _INSTANCE_MASK
            obj = key >> _INSTANCE_BITS
            paths.append(Path(obj) if instance == 0 else Path(obj, instance - 1))
        found = (tuple(paths), tuple(map(str, paths)))
        if len(paths) > SHARED_ENTRIES:
            return found
        if len(_ENTRIES) >= _ENTRIES_LIMIT:
            _ENTRIES.pop(next(iter(_ENTRIES)))
        _ENTRIES[entries] = found
    return found


def registered_objects(links: Iterable[Link]) -> RegisteredObjects:
    """The LwM2M object list of a Register or Update payload.

    A link whose `rt` includes `oma.lwm2m` is the root entry: its target becomes `alt_path` and
    every other link is read relative to it. Its `ct=` (one number, or a quoted space-separated
    list: RFC 7252 7.2.1) are the content formats the client announces; without such an entry
    a plain `</>` link's `ct=` is read instead (LwM2M 1.0's `</>;ct=11543`). Links that are
    not an object or object instance below the root are ignored: LwM2M gives them no meaning.
    An object with a `ver=` attribute counts as listed even when the attribute was put on an
    instance link.

    Raises:
        LinkFormatError: two root entries, a root target not starting with `/`, or a `ct=` that
            is not a list of Content-Format numbers.
    """
    links = list(links)
    alt_path = ""
    content_formats: tuple[int, ...] = ()
    root_seen = False
    for link in links:
        rt = link.params.get("rt")
        if rt is not None and ROOT_RT in rt.split():
            if root_seen:
                raise LinkFormatError('two root entries with rt="oma.lwm2m"')
            root_seen = True
            if not link.target.startswith("/"):
                raise LinkFormatError(f"root entry <{link.target}> does not start with '/'")
            alt_path = link.target.rstrip("/")
            content_formats = _content_formats(link.params.get("ct"))
    if not root_seen:
        # LwM2M 1.0 announces formats on a plain root link, without rt: `</>;ct=11543`
        for link in links:
            if link.target == "/":
                content_formats = _content_formats(link.params.get("ct"))
                break
    keys: set[int] = set()
    versions: dict[int, str] = {}
    prefix = alt_path + "/" if alt_path else ""
    for link in links:
        target = link.target
        if prefix:
            if not target.startswith(prefix):
                continue
            target = target[len(alt_path) :]
        ids = _OBJECT_TARGET.fullmatch(target)
        if ids is None:
            continue
        obj = int(ids[1])
        instance = ids[2]
        if obj > MAX_ID or (instance is not None and int(instance) > MAX_ID):
            continue
        key = obj << _INSTANCE_BITS
        ver = link.params.get("ver")
        if ver is not None:
            versions.setdefault(obj, ver)
            keys.add(key)
        keys.add(key if instance is None else key | (int(instance) + 1))
    return RegisteredObjects(
        alt_path=alt_path,
        content_formats=content_formats,
        versions=tuple(sorted(versions.items())),
        entries=array(_KEY_TYPE, sorted(keys)).tobytes(),
    )


def _content_formats(ct: str | None) -> tuple[int, ...]:
    if ct is None:
        return ()
    formats: list[int] = []
    for item in ct.split():
        if not (len(item) <= 5 and item.isascii() and item.isdigit() and int(item) <= MAX_ID):
            raise LinkFormatError(f"ct={ct!r} is not a list of Content-Format numbers")
        formats.append(int(item))
    return tuple(formats)
