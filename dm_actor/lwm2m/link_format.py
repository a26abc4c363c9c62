"""RFC 6690 CoRE link-format, and the LwM2M object list a client registers with.

Owns `parse_links` / `serialise_links` (the Register and Update payloads, Discover answers) and
`registered_objects`, which turns a Register payload into `RegisteredObjects`: the objects,
object instances, resources and resource instances the device announced with their attributes
(`</3/0/0>;obs`, `rt=`), the object versions (`ver=`), the content formats on the root entry
(`ct=`) and the alternate path (`</lwm2m>;rt="oma.lwm2m"`), and which paths are known.

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
from functools import lru_cache
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

# The registered links are kept as sorted arrays of unsigned 64-bit keys (8 bytes a link where
# a tuple of ints would take 40; still immutable and hashable), one array per depth:
# - `entries`, objects and object instances: `object_id << 17 | (instance_id + 1)`, with 0 in
#   the low bits for the object itself;
# - `resources`: `object_id << 32 | instance_id << 16 | resource_id`;
# - `resource_instances`: `object_id << 48 | instance_id << 32 | resource_id << 16 | ri`.
# Each array sorts its keys in path order, so the links under a path are one range of keys.
_INSTANCE_BITS = 17
_INSTANCE_MASK = (1 << _INSTANCE_BITS) - 1
_ID_MASK = 0xFFFF
_KEY_TYPE: Final = "Q"
# `/O`, `/O/I`, `/O/I/R` or `/O/I/R/RI` (the leading `/` optional, as `path.parse` allows)
_LWM2M_TARGET = re.compile(r"/?([0-9]{1,5})(?:/([0-9]{1,5}))?(?:/([0-9]{1,5}))?(?:/([0-9]{1,5}))?")


@dataclass(frozen=True, slots=True, repr=False)
class RegisteredObjects:
    """The LwM2M links a client registered: objects, object instances, resources and resource
    instances, each with the attributes it carried.

    Which paths exist (`contains`): a path is known when it is a registered link, a parent of
    one (`/3` and `/3/0` when `</3/0/0>` is registered), or under an instance, resource or
    resource-instance link (`/3/0/1` when `</3/0>` is). An object link covers the object
    only: `</2>` without instance links means the object exists with no instances, so `/2`
    (the path of a Create) is known and `/2/0` is not. The server answers a request for a
    path that is not known with 404 (delivery.md 1.4).

    Attributes:
        alt_path: the client's alternate path (`"/lwm2m"`), or `""` for the root.
        content_formats: the `ct=` values of the root entry, in the given order: the formats
            the client announces (`Registration.preferred_accept` chooses among them).
        versions: `(object_id, ver)` for each object registered with a `ver=` attribute.
        entries: the packed, sorted keys of objects and instances; build values with
            `registered_objects`.
        resources: the packed, sorted keys of resource links (`</3/0/0>`).
        resource_instances: the packed, sorted keys of resource-instance links.
        attributes: the links that carried parameters other than `ver`, as link-format text
            with paths below the alternate path (`</3/0/0>;obs,</3200/0/5501>;obs;rt="c"`),
            sorted by path; read it with `link_attributes`.
    """

    alt_path: str = ""
    content_formats: tuple[int, ...] = ()
    versions: tuple[tuple[int, str], ...] = ()
    entries: bytes = b""
    resources: bytes = b""
    resource_instances: bytes = b""
    attributes: str = ""

    def __repr__(self) -> str:
        paths = ",".join(map(str, self.paths()))
        attributes = f", attributes={self.attributes!r}" if self.attributes else ""
        return (
            f"RegisteredObjects(alt_path={self.alt_path!r}, "
            f"content_formats={self.content_formats!r}, versions={self.versions!r}, "
            f"paths={paths!r}{attributes})"
        )

    def contains(self, path: Path) -> bool:
        """Is `path` known: a registered link, a parent of one, or under an instance,
        resource or resource-instance link? (See the class docstring.)"""
        o = path.object_id
        i = path.instance_id
        entries = _keys(self.entries)
        if i is None:
            low = o << _INSTANCE_BITS
            return (
                _any_in(entries, low, low + (1 << _INSTANCE_BITS))
                or _any_in(_keys(self.resources), o << 32, (o + 1) << 32)
                or _any_in(_keys(self.resource_instances), o << 48, (o + 1) << 48)
            )
        if _has(entries, (o << _INSTANCE_BITS) | (i + 1)):
            return True  # the instance, or anything under it
        r = path.resource_id
        if r is None:
            low = (o << 32) | (i << 16)
            return _any_in(_keys(self.resources), low, low + (1 << 16)) or _any_in(
                _keys(self.resource_instances), low << 16, (low + (1 << 16)) << 16
            )
        key = (o << 32) | (i << 16) | r
        if _has(_keys(self.resources), key):
            return True  # the resource, or one of its instances
        ri = path.resource_instance_id
        instances = _keys(self.resource_instances)
        if ri is None:
            return _any_in(instances, key << 16, (key + 1) << 16)
        return _has(instances, (key << 16) | ri)

    def paths(self) -> list[Path]:
        """Every registered link, sorted by path: `Path(o)` for an object listed on its own
        (or with a `ver=`), `Path(o, i)` for each instance, `Path(o, i, r)` for each resource
        link and `Path(o, i, r, ri)` for each resource-instance link."""
        return list(_entries(self)[0])

    def version(self, object_id: int) -> str | None:
        """The object's `ver=` attribute; None when the client gave none (meaning 1.0)."""
        for obj, ver in self.versions:
            if obj == object_id:
                return ver
        return None

    def link_attributes(self) -> dict[str, dict[str, str | None]]:
        """The parameters of each link that had some besides `ver`, by path text (`"/3/0/0"`,
        below the alternate path): `{"/3/0/0": {"obs": None}}`. A fresh dict each call."""
        return {target: dict(params) for target, params in _attributes(self.attributes).items()}

    def links(self) -> list[Link]:
        """The registration as links; `registered_objects(objects.links()) == objects`."""
        links: list[Link] = []
        if self.alt_path or self.content_formats:
            root: dict[str, str | None] = {"rt": ROOT_RT}
            if self.content_formats:
                root["ct"] = " ".join(map(str, self.content_formats))
            links.append(Link(self.alt_path or "/", root))
        versions = dict(self.versions)
        attributes = _attributes(self.attributes)
        paths, targets = _entries(self)
        for path, target in zip(paths, targets, strict=True):
            ver = versions.get(path.object_id) if path.is_object else None
            params: dict[str, str | None] = {} if ver is None else {"ver": ver}
            params.update(attributes.get(target, ()))
            links.append(Link(self.alt_path + target, params))
        return links


def _keys(packed: bytes) -> memoryview[int]:
    return memoryview(packed).cast(_KEY_TYPE)


def _has(keys: memoryview[int], key: int) -> bool:
    i = bisect.bisect_left(keys, key)
    return i < len(keys) and keys[i] == key


def _any_in(keys: memoryview[int], low: int, high: int) -> bool:
    """Is any key in `low <= key < high`?"""
    i = bisect.bisect_left(keys, low)
    return i < len(keys) and keys[i] < high


#: registered links -> their paths and path texts, sorted; a fleet registers a few distinct
#: link lists, so this spares each registration, Update and store record the rebuilding of
#: the same paths. Only lists of at most `SHARED_ENTRIES` links are kept: a few hundred
#: hostile lists of thousands of entries each would otherwise hold gigabytes here (found by an
#: attacker).
_ENTRIES: dict[tuple[bytes, bytes, bytes], tuple[tuple[Path, ...], tuple[str, ...]]] = {}
_ENTRIES_LIMIT = 1024
SHARED_ENTRIES = 64


def _entries(objects: RegisteredObjects) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    key = (objects.entries, objects.resources, objects.resource_instances)
    found = _ENTRIES.get(key)
    if found is None:
        ids: list[tuple[int, ...]] = []
        for k in _keys(objects.entries):
            instance = k & _INSTANCE_MASK
            obj = k >> _INSTANCE_BITS
            ids.append((obj,) if instance == 0 else (obj, instance - 1))
        ids.extend((k >> 32, (k >> 16) & _ID_MASK, k & _ID_MASK) for k in _keys(objects.resources))
        ids.extend(
            (k >> 48, (k >> 32) & _ID_MASK, (k >> 16) & _ID_MASK, k & _ID_MASK)
            for k in _keys(objects.resource_instances)
        )
        ids.sort()
        paths = tuple(Path(*i) for i in ids)
        found = (paths, tuple(map(str, paths)))
        if len(paths) > SHARED_ENTRIES:
            return found
        if len(_ENTRIES) >= _ENTRIES_LIMIT:
            _ENTRIES.pop(next(iter(_ENTRIES)))
        _ENTRIES[key] = found
    return found


#: attribute texts up to this length are parsed once (a fleet has a few): longer ones, which
#: a fleet of one kind shares anyway, are parsed on each (rare) use
_SHARED_ATTRIBUTES = 8192


def _attributes(text: str) -> dict[str, dict[str, str | None]]:
    """`RegisteredObjects.attributes` read back; read-only (may be shared)."""
    if not text:
        return {}
    if len(text) > _SHARED_ATTRIBUTES:
        return _parse_attributes(text)
    return _shared_attributes(text)


def _parse_attributes(text: str) -> dict[str, dict[str, str | None]]:
    return {link.target: link.params for link in parse_links(text)}


_shared_attributes = lru_cache(maxsize=256)(_parse_attributes)


def registered_objects(links: Iterable[Link]) -> RegisteredObjects:
    """The LwM2M links of a Register or Update payload.

    A link whose `rt` includes `oma.lwm2m` is the root entry: its target becomes `alt_path` and
    every other link is read relative to it. Its `ct=` (one number, or a quoted space-separated
    list: RFC 7252 7.2.1) are the content formats the client announces; without such an entry
    a plain `</>` link's `ct=` is read instead (LwM2M 1.0's `</>;ct=11543`). Every link below
    the root that names an object, object instance, resource or resource instance (one to four
    ids, each 0..65535) is kept with its parameters; other links are ignored: LwM2M gives them
    no meaning. A path listed twice keeps its first parameters. An object with a `ver=`
    attribute counts as listed even when the attribute was put on a link below it.

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
    resources: set[int] = set()
    resource_instances: set[int] = set()
    versions: dict[int, str] = {}
    attributes: dict[tuple[int, ...], dict[str, str | None]] = {}
    prefix = alt_path + "/" if alt_path else ""
    for link in links:
        target = link.target
        if prefix:
            if not target.startswith(prefix):
                continue
            target = target[len(alt_path) :]
        found = _LWM2M_TARGET.fullmatch(target)
        if found is None:
            continue
        ids = tuple(int(i) for i in found.groups() if i is not None)
        if max(ids) > MAX_ID:
            continue
        obj = ids[0]
        key = obj << _INSTANCE_BITS
        ver = link.params.get("ver")
        if ver is not None:
            versions.setdefault(obj, ver)
            keys.add(key)
        if len(ids) == 1:
            keys.add(key)
        elif len(ids) == 2:
            keys.add(key | (ids[1] + 1))
        elif len(ids) == 3:
            resources.add((obj << 32) | (ids[1] << 16) | ids[2])
        else:
            resource_instances.add((obj << 48) | (ids[1] << 32) | (ids[2] << 16) | ids[3])
        if ids not in attributes:  # (the first time the path is listed)
            attributes[ids] = {name: value for name, value in link.params.items() if name != "ver"}
    return RegisteredObjects(
        alt_path=alt_path,
        content_formats=content_formats,
        versions=tuple(sorted(versions.items())),
        entries=_pack(keys),
        resources=_pack(resources),
        resource_instances=_pack(resource_instances),
        attributes=_bounded_attributes(attributes),
    )


#: the attribute text kept per registration (`RegisteredObjects.attributes`), in bytes of
#: link-format: links in path order keep their attributes while they fit; a link whose
#: attributes do not fit keeps its path only (it is still known and listed, without `rt`
#: or `obs`). A Pelion device client's attributes take 0.5-2 KB; a peer sending more
#: cannot make its registration (and its registration events) cost more than this.
MAX_ATTRIBUTE_BYTES = 4096
#: the attribute text of one link, at most (more: that link keeps its path only)
MAX_LINK_ATTRIBUTE_BYTES = 256


def _bounded_attributes(attributes: dict[tuple[int, ...], dict[str, str | None]]) -> str:
    """The links' attributes as link-format text, within `MAX_ATTRIBUTE_BYTES`."""
    kept: list[str] = []
    left = MAX_ATTRIBUTE_BYTES
    for ids, params in sorted(attributes.items()):
        if not params:
            continue
        path = "/" + "/".join(map(str, ids))
        text = _serialise_link(Link(path, params))
        size = len(text.encode()) + 1  # (its `,`)
        if params.keys() != {"obs"} and size <= MAX_LINK_ATTRIBUTE_BYTES and size <= left:
            kept.append(text)
            left -= size
        elif "obs" in params:
            # `obs` alone is a flag, kept outside the budget (bounded by `max_links`): what a
            # device lets be observed is never lost to the length of its other attributes
            flag = _serialise_link(Link(path, {"obs": params["obs"]}))
            if len(flag) > MAX_LINK_ATTRIBUTE_BYTES:  # (`obs` has no value in LwM2M)
                flag = _serialise_link(Link(path, {"obs": None}))
            kept.append(flag)
    return ",".join(kept)


#: link lists up to this many bytes are parsed once and shared by the devices that send them
#: (a Pelion device client lists every resource: 1-3 KB); the cache keeps at most 256 lists,
#: so at most about 256 * 3 * 8 KiB
SHARED_PAYLOAD = 8192


def shared_registered_objects(payload: bytes | str) -> RegisteredObjects:
    """`registered_objects(parse_links(payload))`, one value for every device that registers
    the same list of at most `SHARED_PAYLOAD` bytes (the devices of a fleet send a few
    distinct lists: their registrations share one immutable value, about 120 B per device for
    instance links, nothing more for resource links and attributes however many, and most
    Registers skip the parse). A longer list is parsed each time and not kept.

    Raises:
        LinkFormatError: as `parse_links` and `registered_objects`.
    """
    if len(payload) > SHARED_PAYLOAD:
        return registered_objects(parse_links(payload))
    return _shared_objects(payload)


@lru_cache(maxsize=256)
def _shared_objects(payload: bytes | str) -> RegisteredObjects:
    return registered_objects(parse_links(payload))


def _pack(keys: set[int]) -> bytes:
    return array(_KEY_TYPE, sorted(keys)).tobytes() if keys else b""


def _content_formats(ct: str | None) -> tuple[int, ...]:
    if ct is None:
        return ()
    formats: list[int] = []
    for item in ct.split():
        if not (len(item) <= 5 and item.isascii() and item.isdigit() and int(item) <= MAX_ID):
            raise LinkFormatError(f"ct={ct!r} is not a list of Content-Format numbers")
        formats.append(int(item))
    return tuple(formats)
