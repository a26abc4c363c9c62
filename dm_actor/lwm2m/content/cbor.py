"""CBOR (60) single values and LwM2M CBOR (11544), plus the guarded CBOR reader both SenML CBOR
and these formats use.

Owns the mapping between CBOR items and LwM2M values (Objlnk travels as the text `"3:0"` and
therefore decodes as str; decimal fractions decode as float; tag-1/tag-0 times as epoch seconds)
and the nested-map LwM2M CBOR structure whose keys are ids or arrays of ids. Never does I/O.
"""

from __future__ import annotations

import io
from datetime import datetime
from decimal import Decimal

import cbor2

from dm_actor.lwm2m.content.text import single_path, single_value
from dm_actor.lwm2m.content.values import (
    ContentDecodeError,
    ContentEncodeError,
    ObjLink,
    ResourceValue,
    Value,
    encode_ids,
    make_path,
    resource_ids,
)


def loads(payload: bytes) -> object:
    """Decode exactly one CBOR item; any failure of the decoder is a ContentDecodeError."""
    stream = io.BytesIO(payload)
    try:
        item: object = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises assorted errors on hostile input
        raise ContentDecodeError(f"bad CBOR: {exc}") from None
    if stream.tell() != len(payload):
        raise ContentDecodeError(f"{len(payload) - stream.tell()} bytes after the CBOR item")
    return item


def leaf(item: object, where: str) -> Value:
    """An LwM2M value from a decoded CBOR item that is not a container."""
    match item:
        case bool() | int() | float() | str() | bytes() | None:
            return item
        case Decimal():
            return float(item)
        case datetime():
            stamp = item.timestamp()
            return int(stamp) if stamp.is_integer() else stamp
    raise ContentDecodeError(f"CBOR {type(item).__name__} is not an LwM2M value at {where}")


def cbor_item(value: Value) -> object:
    """The CBOR item for an LwM2M value (Objlnk as its `"3:0"` text)."""
    return str(value) if isinstance(value, ObjLink) else value


def dumps(item: object) -> bytes:
    """Canonical CBOR (shortest exact floats, sorted keys)."""
    try:
        return cbor2.dumps(item, canonical=True)
    except (cbor2.CBOREncodeError, OverflowError, ValueError) as exc:
        raise ContentEncodeError(f"cannot encode as CBOR: {exc}") from None


def decode_cbor(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode an application/cbor body: one scalar value for the resource at `base`."""
    path = single_path(base)
    return [ResourceValue(path, leaf(loads(payload), path))]


def encode_cbor(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode one value as an application/cbor scalar."""
    return dumps(cbor_item(single_value(values).value))


def _walk(node: object, ids: tuple[int, ...], out: list[ResourceValue]) -> None:
    if not isinstance(node, dict):
        resource_ids(make_path(ids))
        out.append(ResourceValue(make_path(ids), leaf(node, make_path(ids))))
        return
    for key, child in node.items():
        keys = key if isinstance(key, tuple) else (key,)
        if not keys or not all(type(k) is int and 0 <= k <= 0xFFFF for k in keys):
            raise ContentDecodeError(f"LwM2M CBOR key {key!r} under {make_path(ids)} is no id")
        if len(ids) + len(keys) > 4:
            raise ContentDecodeError(f"LwM2M CBOR path {make_path((*ids, *keys))} is too deep")
        _walk(child, (*ids, *keys), out)


def decode_lwm2m_cbor(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode an LwM2M CBOR body: nested maps keyed by ids (or arrays of ids) from the root.

    `base` is not needed: the keys spell absolute paths.
    """
    root = loads(payload)
    if not isinstance(root, dict):
        raise ContentDecodeError("LwM2M CBOR body is not a map")
    out: list[ResourceValue] = []
    _walk(root, (), out)
    return out


def _collapse(key: tuple[int, ...], node: object) -> tuple[object, object]:
    """Fold single-entry maps into array keys: {3: {0: {1: v}}} -> {[3, 0, 1]: v}."""
    while isinstance(node, dict) and len(node) == 1:
        ((sub, node),) = node.items()
        key = (*key, sub)
    if isinstance(node, dict):
        node = dict(_collapse((k,), v) for k, v in node.items())
    return (key[0] if len(key) == 1 else key), node


def encode_lwm2m_cbor(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as LwM2M CBOR with absolute nested keys; `base` is not used."""
    root: dict[int, object] = {}
    for value in values:
        *parents, last = encode_ids(value)
        node = root
        for ident in parents:
            child = node.setdefault(ident, {})
            if not isinstance(child, dict):
                raise ContentEncodeError(f"{value.path} is under a value")
            node = child
        if last in node:
            raise ContentEncodeError(f"{value.path} appears twice or holds instances")
        node[last] = cbor_item(value.value)
    return dumps(dict(_collapse((k,), v) for k, v in root.items()))
