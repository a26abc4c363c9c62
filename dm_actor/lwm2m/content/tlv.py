"""OMA TLV (11542, legacy 1542): the binary format of LwM2M 1.0 / 1.1.

Owns the TLV framing (type byte, 8/16-bit identifier, 0..24-bit length), the nesting of object
instances, multiple resources and resource instances, and the encoding of typed values into
TLV value bytes. TLV carries no types, so decoding yields raw bytes; `tlv_int`, `tlv_float`,
`tlv_bool`, `tlv_str` and `tlv_objlnk` read them once the caller knows the resource's type.
Never consults an object model.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from dm_actor.lwm2m.content.values import (
    ContentDecodeError,
    ContentEncodeError,
    ObjLink,
    ResourceValue,
    Value,
    encode_ids,
    make_path,
    path_ids,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

OBJECT_INSTANCE = 0
RESOURCE_INSTANCE = 1
MULTIPLE_RESOURCE = 2
RESOURCE = 3
_NAMES = ("object instance", "resource instance", "multiple resource", "resource")
_MAX_LENGTH = 0xFFFFFF
_Item = tuple[tuple[int, ...], bytes]


def _tlvs(data: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (type, identifier, value start, value end) for each TLV in data[pos:end]."""
    while pos < end:
        head = data[pos]
        id_size = 2 if head & 0x20 else 1
        len_size = (head >> 3) & 3
        start = pos + 1 + id_size + len_size
        if start > end:
            raise ContentDecodeError(f"TLV header at byte {pos} is truncated")
        ident = int.from_bytes(data[pos + 1 : pos + 1 + id_size])
        length = int.from_bytes(data[pos + 1 + id_size : start]) if len_size else head & 7
        pos = start + length
        if pos > end:
            raise ContentDecodeError(
                f"TLV {_NAMES[head >> 6]} {ident} needs {length} bytes, {end - start} remain"
            )
        yield head >> 6, ident, start, pos


def _expect(kind: int, expected: tuple[int, ...], ident: int, where: tuple[int, ...]) -> None:
    if kind not in expected:
        raise ContentDecodeError(
            f"TLV {_NAMES[kind]} {ident} is not allowed under {make_path(where)}"
        )


def _resource(
    data: bytes, kind: int, ident: int, start: int, end: int, parent: tuple[int, ...]
) -> Iterator[ResourceValue]:
    """Values of a resource-level TLV (single or multiple resource) under an instance path."""
    _expect(kind, (RESOURCE, MULTIPLE_RESOURCE), ident, parent)
    ids = (*parent, ident)
    if kind == RESOURCE:
        yield ResourceValue(make_path(ids), data[start:end])
        return
    for sub, sub_id, sub_start, sub_end in _tlvs(data, start, end):
        _expect(sub, (RESOURCE_INSTANCE,), sub_id, ids)
        yield ResourceValue(make_path((*ids, sub_id)), data[sub_start:sub_end])


def _instance(data: bytes, start: int, end: int, ids: tuple[int, ...]) -> Iterator[ResourceValue]:
    for kind, ident, sub_start, sub_end in _tlvs(data, start, end):
        yield from _resource(data, kind, ident, sub_start, sub_end, ids)


def _decode(data: bytes, ids: tuple[int, ...]) -> Iterator[ResourceValue]:
    end = len(data)
    for kind, ident, start, stop in _tlvs(data, 0, end):
        if len(ids) == 1:
            _expect(kind, (OBJECT_INSTANCE,), ident, ids)
            yield from _instance(data, start, stop, (*ids, ident))
        elif len(ids) == 2 and kind == OBJECT_INSTANCE and ident == ids[1]:
            yield from _instance(data, start, stop, ids)  # a wrapper some clients add
        elif len(ids) == 2:
            yield from _resource(data, kind, ident, start, stop, ids)
        elif len(ids) == 3 and kind in (RESOURCE, MULTIPLE_RESOURCE) and ident == ids[2]:
            yield from _resource(data, kind, ident, start, stop, ids[:2])
        elif len(ids) == 3 and kind == RESOURCE_INSTANCE:
            yield ResourceValue(make_path((*ids, ident)), data[start:stop])
        elif len(ids) == 4 and kind == RESOURCE_INSTANCE and ident == ids[3]:
            yield ResourceValue(make_path(ids), data[start:stop])
        else:
            raise ContentDecodeError(
                f"TLV {_NAMES[kind]} {ident} does not belong to {make_path(ids)}"
            )


def decode(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode a TLV body; `base` (the request path) says what the top-level TLVs are.

    /O: object instances; /O/I: resources (an object-instance wrapper with id I is accepted);
    /O/I/R: that resource, single or multiple, or bare resource instances; /O/I/R/RI: that
    resource instance. Values are the raw TLV value bytes.

    Raises:
        ContentDecodeError: no base, or the TLVs are truncated or do not fit the base.
    """
    if base is None:
        raise ContentDecodeError("a TLV payload needs the request path as base")
    return list(_decode(payload, path_ids(base)))


def _header(kind: int, ident: int, length: int) -> bytes:
    if length > _MAX_LENGTH:
        raise ContentEncodeError(f"TLV value of {length} bytes exceeds 24-bit length")
    head = kind << 6
    id_bytes = ident.to_bytes(1 if ident < 0x100 else 2)
    if ident >= 0x100:
        head |= 0x20
    if length < 8:
        return bytes((head | length,)) + id_bytes
    len_size = 1 if length < 0x100 else 2 if length < 0x10000 else 3
    return bytes((head | len_size << 3,)) + id_bytes + length.to_bytes(len_size)


def _tlv(kind: int, ident: int, body: bytes) -> bytes:
    return _header(kind, ident, len(body)) + body


def value_bytes(value: Value) -> bytes:
    """The TLV value bytes of one typed value.

    int: shortest of 1, 2, 4, 8 bytes signed; float: 4 bytes if exact, else 8; bool: 1 byte;
    str: UTF-8; bytes: as is; ObjLink: 2+2 bytes; None: empty.
    """
    match value:
        case bool():
            return b"\x01" if value else b"\x00"
        case int():
            for size in (1, 2, 4, 8):
                if -(1 << (8 * size - 1)) <= value < 1 << (8 * size - 1):
                    return value.to_bytes(size, signed=True)
            raise ContentEncodeError(f"integer {value} does not fit 64 bits")
        case float():
            try:
                single = struct.pack(">f", value)
            except OverflowError:
                return struct.pack(">d", value)
            return single if struct.unpack(">f", single)[0] == value else struct.pack(">d", value)
        case str():
            return value.encode()
        case bytes():
            return value
        case ObjLink():
            return struct.pack(">HH", *value)
        case None:
            return b""
    raise ContentEncodeError(f"{type(value).__name__} has no TLV representation")


def _resource_tlv(resource_id: int, group: list[_Item]) -> bytes:
    if len(group) == 1 and len(group[0][0]) == 3:
        return _tlv(RESOURCE, resource_id, group[0][1])
    if any(len(ids) == 3 for ids, _ in group):
        raise ContentEncodeError(f"resource {resource_id} is both single and multiple")
    body = b"".join(_tlv(RESOURCE_INSTANCE, ids[3], raw) for ids, raw in group)
    return _tlv(MULTIPLE_RESOURCE, resource_id, body)


def _grouped(items: list[_Item], depth: int) -> dict[int, list[_Item]]:
    """Items by their id at `depth`, in order of first appearance."""
    groups: dict[int, list[_Item]] = {}
    for item in items:
        groups.setdefault(item[0][depth], []).append(item)
    return groups


def _resources(items: list[_Item]) -> bytes:
    return b"".join(
        _resource_tlv(resource_id, group) for resource_id, group in _grouped(items, 2).items()
    )


def _common_base(all_ids: list[tuple[int, ...]]) -> tuple[int, ...]:
    base = all_ids[0]
    for ids in all_ids[1:]:
        depth = 0
        while depth < min(len(base), len(ids)) and base[depth] == ids[depth]:
            depth += 1
        base = base[:depth]
    return base


def encode(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as TLV relative to `base` (default: the values' deepest common path).

    Values are grouped by object instance and resource in order of first appearance. The top
    level mirrors `decode`: object instances under /O, resources under /O/I, the resource
    (single, or multiple with its instances) under /O/I/R, the resource instance under
    /O/I/R/RI.

    Raises:
        ContentEncodeError: a path outside `base`, a value TLV cannot carry, a resource that is
            both single and multiple.
    """
    if not values:
        return b""
    items = [(encode_ids(value), value_bytes(value.value)) for value in values]
    ids = _common_base([item[0] for item in items]) if base is None else encode_ids(base, 1)
    if not ids or any(item[0][: len(ids)] != ids for item in items):
        raise ContentEncodeError(f"values are not all under the TLV base {base!r}")
    if len(ids) == 1:
        return b"".join(
            _tlv(OBJECT_INSTANCE, instance_id, _resources(group))
            for instance_id, group in _grouped(items, 1).items()
        )
    if len(ids) == 2:
        return _resources(items)
    if len(ids) == 4:
        if len(items) > 1:
            raise ContentEncodeError(f"{len(items)} values for one resource instance")
        return _tlv(RESOURCE_INSTANCE, ids[3], items[0][1])
    return _resource_tlv(ids[2], items)


def _sized(raw: bytes, sizes: tuple[int, ...], what: str) -> None:
    if len(raw) not in sizes:
        raise ContentDecodeError(f"TLV {what} has {len(raw)} bytes, expected one of {sizes}")


def tlv_int(raw: bytes, signed: bool = True) -> int:
    """Read a TLV Integer (1, 2, 4 or 8 bytes, big-endian; `signed=False` for Unsigned)."""
    _sized(raw, (1, 2, 4, 8), "integer")
    return int.from_bytes(raw, signed=signed)


def tlv_float(raw: bytes) -> float:
    """Read a TLV Float (4 or 8 bytes IEEE 754)."""
    _sized(raw, (4, 8), "float")
    return float(struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0])


def tlv_bool(raw: bytes) -> bool:
    """Read a TLV Boolean (one byte 0 or 1)."""
    if raw not in (b"\x00", b"\x01"):
        raise ContentDecodeError(f"TLV boolean must be 0x00 or 0x01, not {raw.hex()}")
    return raw == b"\x01"


def tlv_str(raw: bytes) -> str:
    """Read a TLV String (UTF-8)."""
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise ContentDecodeError(f"TLV string is not UTF-8: {exc}") from None


def tlv_objlnk(raw: bytes) -> ObjLink:
    """Read a TLV Objlnk (two 16-bit ids)."""
    _sized(raw, (4,), "object link")
    return ObjLink(*struct.unpack(">HH", raw))
