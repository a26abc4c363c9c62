"""SenML JSON (110), SenML CBOR (112) and the older LwM2M JSON (11543, legacy 1543).

Owns the record model (RFC 8428 as profiled by LwM2M 1.1: names are absolute paths formed by
base name + name; base time + time; values v / vs / vb / vd / vlo) and its two encodings, plus
LwM2M 1.0 JSON, whose `{"bn", "e": [...]}` entries map onto the same records. A record without
a value decodes to `ResourceValue(path, None)` (read-composite style) and may name any path;
a record with a value must name a resource or resource instance. Never does I/O.
"""

from __future__ import annotations

import base64
import binascii

import msgspec

from dm_actor.lwm2m.content.cbor import dumps, loads
from dm_actor.lwm2m.content.values import (
    ContentDecodeError,
    ObjLink,
    ResourceValue,
    Value,
    check_finite,
    encode_ids,
    make_path,
    path_ids,
    resource_ids,
)


class _Record(msgspec.Struct, omit_defaults=True):
    base_name: str | None = msgspec.field(default=None, name="bn")
    base_time: float | None = msgspec.field(default=None, name="bt")
    name: str | None = msgspec.field(default=None, name="n")
    number: int | float | None = msgspec.field(default=None, name="v")
    string: str | None = msgspec.field(default=None, name="vs")
    boolean: bool | None = msgspec.field(default=None, name="vb")
    data: str | bytes | None = msgspec.field(default=None, name="vd")
    link: str | None = msgspec.field(default=None, name="vlo")
    time: float | None = msgspec.field(default=None, name="t")


class _JsonRecord(_Record):
    data: str | None = msgspec.field(default=None, name="vd")  # base64url text


class _CborRecord(_Record):
    data: bytes | None = msgspec.field(default=None, name="vd")


class _Entry(msgspec.Struct, omit_defaults=True):
    name: str | None = msgspec.field(default=None, name="n")
    number: int | float | None = msgspec.field(default=None, name="v")
    string: str | None = msgspec.field(default=None, name="sv")
    boolean: bool | None = msgspec.field(default=None, name="bv")
    link: str | None = msgspec.field(default=None, name="ov")
    time: float | None = msgspec.field(default=None, name="t")


class _Document(msgspec.Struct, omit_defaults=True):
    entries: list[_Entry] = msgspec.field(name="e")
    base_name: str | None = msgspec.field(default=None, name="bn")
    base_time: float | None = msgspec.field(default=None, name="bt")


_CBOR_LABELS: dict[object, str] = {-2: "bn", -3: "bt", 0: "n", 2: "v", 3: "vs", 4: "vb"}
_CBOR_LABELS.update({8: "vd", 6: "t", "vlo": "vlo"})
_CBOR_KEYS = {name: label for label, name in _CBOR_LABELS.items()}


def _unbase64(text: str, where: str) -> bytes:
    """base64url with or without padding (RFC 8428 `vd`)."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), b"-_", validate=True)
    except binascii.Error as exc:
        raise ContentDecodeError(f"bad base64 at {where}: {exc}") from None


def _resolve(records: list[_JsonRecord] | list[_CborRecord]) -> list[ResourceValue]:
    out: list[ResourceValue] = []
    base_name = ""
    base_time: float | None = None
    for record in records:
        if record.base_name is not None:
            base_name = record.base_name
        if record.base_time is not None:
            base_time = record.base_time
        path = base_name + (record.name or "")
        given = [
            v
            for v in (record.number, record.string, record.boolean, record.data, record.link)
            if v is not None
        ]
        if len(given) > 1:
            raise ContentDecodeError(f"SenML record {path!r} has {len(given)} values")
        value: Value = given[0] if given else None
        if isinstance(record.data, str):
            value = _unbase64(record.data, path)
        elif record.link is not None:
            value = ObjLink.parse(record.link)
        if value is None:
            path_ids(path)
        else:
            resource_ids(path)
        time = (
            None
            if base_time is None and record.time is None
            else (base_time or 0.0) + (record.time or 0.0)
        )
        out.append(ResourceValue(path, value, time))
    return out


def decode_senml_json(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode a SenML JSON pack; `base` is not needed (names resolve to absolute paths)."""
    try:
        records = msgspec.json.decode(payload, type=list[_JsonRecord])
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 out
        raise ContentDecodeError(f"bad SenML JSON: {exc}") from None
    return _resolve(records)


def decode_senml_cbor(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode a SenML CBOR pack (integer labels, `"vlo"` for object links)."""
    items = loads(payload)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ContentDecodeError("SenML CBOR body is not an array of maps")
    mapped = [
        {_CBOR_LABELS[key]: value for key, value in item.items() if key in _CBOR_LABELS}
        for item in items
    ]
    try:
        records = msgspec.convert(mapped, list[_CborRecord], builtin_types=(bytes,))
    except msgspec.MsgspecError as exc:
        raise ContentDecodeError(f"bad SenML CBOR record: {exc}") from None
    return _resolve(records)


def _names(values: list[ResourceValue]) -> list[tuple[str | None, str | None]]:
    """(base name, name) per record: the common parent as base name on the first record."""
    all_ids = [encode_ids(value, 1 if value.value is None else 3) for value in values]
    if len(values) <= 1:
        return [(make_path(ids), None) for ids in all_ids]
    prefix = all_ids[0]
    for ids in all_ids:
        while ids[: len(prefix)] != prefix or ids == prefix:
            prefix = prefix[:-1]
    base_name = make_path(prefix).rstrip("/") + "/"
    names = ["/".join(map(str, ids[len(prefix) :])) for ids in all_ids]
    return [(base_name, names[0])] + [(None, name) for name in names[1:]]


def _records(values: list[ResourceValue], json: bool) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for (base_name, name), item in zip(_names(values), values, strict=True):
        record: dict[str, object] = {}
        if base_name is not None:
            record["bn"] = base_name
        if name is not None:
            record["n"] = name
        match item.value:
            case bool():
                record["vb"] = item.value
            case int():
                record["v"] = item.value
            case float():
                record["v"] = check_finite(item.value) if json else item.value
            case str():
                record["vs"] = item.value
            case bytes():
                data = item.value
                record["vd"] = (
                    base64.urlsafe_b64encode(data).rstrip(b"=").decode() if json else data
                )
            case ObjLink():
                record["vlo"] = str(item.value)
        if item.time is not None:
            record["t"] = item.time
        records.append(record)
    return records


def encode_senml_json(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as a SenML JSON pack, base name on the first record; `base` is not used."""
    return msgspec.json.encode(_records(values, json=True))


def encode_senml_cbor(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as a SenML CBOR pack with integer labels; `base` is not used."""
    return dumps(
        [{_CBOR_KEYS[k]: v for k, v in record.items()} for record in _records(values, False)]
    )


def decode_lwm2m_json(payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode an LwM2M JSON document; without `bn`, names are relative to `base`.

    Opaque values arrive as base64 text in `sv` and stay str: the format carries no types.
    """
    try:
        doc = msgspec.json.decode(payload, type=_Document)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:  # msgspec lets bad UTF-8 out
        raise ContentDecodeError(f"bad LwM2M JSON: {exc}") from None
    records: list[_JsonRecord] = []
    for entry in doc.entries:
        name = entry.name or ""
        if doc.base_name is not None:
            name = doc.base_name + name
        elif base is not None:
            name = base.rstrip("/") + "/" + name if name else base
        records.append(
            _JsonRecord(
                name=name,
                number=entry.number,
                string=entry.string,
                boolean=entry.boolean,
                link=entry.link,
                time=entry.time,
            )
        )
    if records and doc.base_time is not None:
        records[0].base_time = doc.base_time
    return _resolve(records)


_LWM2M_JSON_KEYS = {"v": "v", "vs": "sv", "vb": "bv", "vlo": "ov", "t": "t", "n": "n"}


def encode_lwm2m_json(values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as LwM2M JSON (opaque as standard base64 in `sv`); `base` is not used."""
    records = _records(values, json=True)
    entries = []
    for record, item in zip(records, values, strict=True):
        if isinstance(item.value, bytes):
            record["vs"] = base64.b64encode(item.value).decode()
            del record["vd"]
        entries.append({_LWM2M_JSON_KEYS[k]: v for k, v in record.items() if k != "bn"})
    base_name = records[0]["bn"] if records else "/"
    return msgspec.json.encode({"bn": base_name, "e": entries})
