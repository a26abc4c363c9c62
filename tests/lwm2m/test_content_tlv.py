"""OMA TLV: hand-written vectors for every header shape, typed value encodings, errors, and a
round trip of generated value lists under each kind of base path."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.lwm2m.content import ContentDecodeError, ContentEncodeError, ObjLink
from dm_actor.lwm2m.content.tlv import (
    decode,
    encode,
    tlv_bool,
    tlv_float,
    tlv_int,
    tlv_objlnk,
    tlv_str,
    value_bytes,
)
from dm_actor.lwm2m.content.values import ResourceValue as RV, Value

MULTI = bytes.fromhex("86 06 41 00 01 41 01 05")  # /3/0/6 with instances 0 -> 1 and 1 -> 5


def test_multiple_instance_resource_under_resource_and_instance_bases() -> None:
    expected = [RV("/3/0/6/0", b"\x01"), RV("/3/0/6/1", b"\x05")]
    assert decode(MULTI, "/3/0/6") == expected
    assert decode(MULTI, "/3/0") == expected
    assert encode([RV("/3/0/6/0", 1), RV("/3/0/6/1", 5)], "/3/0/6") == MULTI
    assert encode([RV("/3/0/6/0", 1), RV("/3/0/6/1", 5)]) == MULTI  # common base /3/0/6
    assert encode([RV("/3/0/6/0", 1), RV("/3/0/6/1", 5)], "/3/0") == MULTI


def test_bare_resource_instances_and_single_instance() -> None:
    bare = bytes.fromhex("41 00 01 41 01 05")
    assert decode(bare, "/3/0/6") == [RV("/3/0/6/0", b"\x01"), RV("/3/0/6/1", b"\x05")]
    assert decode(bytes.fromhex("41 01 05"), "/3/0/6/1") == [RV("/3/0/6/1", b"\x05")]
    assert encode([RV("/3/0/6/1", 5)]) == bytes.fromhex("41 01 05")


def test_object_instances() -> None:
    payload = bytes.fromhex("03 00 c1 00 2a  05 01 c3 05 61 62 63")
    assert decode(payload, "/1") == [RV("/1/0/0", b"\x2a"), RV("/1/1/5", b"abc")]
    assert encode([RV("/1/0/0", 42), RV("/1/1/5", "abc")]) == payload  # common base /1
    assert encode([RV("/1/0/0", 42), RV("/1/1/5", "abc")], "/1") == payload


def test_object_instance_wrapper_under_instance_base() -> None:
    wrapped = bytes.fromhex("03 07 c1 00 2a")
    assert decode(wrapped, "/1/7") == [RV("/1/7/0", b"\x2a")]
    with pytest.raises(ContentDecodeError, match="object instance 7 is not allowed under /1/8"):
        decode(wrapped, "/1/8")


def test_sixteen_bit_identifiers() -> None:
    payload = bytes.fromhex("e1 01 2c 07")  # resource 300, 1 byte
    assert decode(payload, "/3/0") == [RV("/3/0/300", b"\x07")]
    assert encode([RV("/3/0/300", 7)], "/3/0") == payload
    instance = bytes.fromhex("24 ff fe e1 01 2c 07")  # object instance 65534
    assert decode(instance, "/3") == [RV("/3/65534/300", b"\x07")]
    assert encode([RV("/3/65534/300", 7)], "/3") == instance
    multi = bytes.fromhex("a4 01 00  61 12 34 01")  # multiple resource 256, instance 0x1234
    assert decode(multi, "/3/0") == [RV("/3/0/256/4660", b"\x01")]
    assert encode([RV("/3/0/256/4660", 1)], "/3/0") == multi


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (7, "c7 05"),
        (8, "c8 05 08"),
        (255, "c8 05 ff"),
        (256, "d0 05 01 00"),
        (65535, "d0 05 ff ff"),
        (65536, "d8 05 01 00 00"),
        (70000, "d8 05 01 11 70"),
    ],
)
def test_length_fields(length: int, header: str) -> None:
    value = bytes(range(256)) * (length // 256) + bytes(length % 256)
    payload = bytes.fromhex(header) + value
    assert encode([RV("/3/0/5", value)], "/3/0") == payload
    assert decode(payload, "/3/0") == [RV("/3/0/5", value)]
    assert decode(payload, "/3/0/5") == [RV("/3/0/5", value)]


def test_sixteen_bit_id_with_twenty_four_bit_length_nested() -> None:
    value = b"x" * 70000
    inner = bytes.fromhex("f8 01 2c 01 11 70") + value  # resource 300, 24-bit length
    payload = bytes.fromhex("38 ab cd") + len(inner).to_bytes(3) + inner  # instance 0xabcd
    assert decode(payload, "/9") == [RV("/9/43981/300", value)]
    assert encode([RV("/9/43981/300", value)], "/9") == payload


def test_value_longer_than_24_bits_is_refused() -> None:
    with pytest.raises(ContentEncodeError, match="24-bit"):
        encode([RV("/3/0/5", bytes(1 << 24))], "/3/0")


@pytest.mark.parametrize(
    ("value", "raw"),
    [
        (0, "00"),
        (127, "7f"),
        (-128, "80"),
        (128, "0080"),
        (-129, "ff7f"),
        (32767, "7fff"),
        (32768, "00008000"),
        (2**31, "0000000080000000"),
        (-(2**63), "8000000000000000"),
        (2**63 - 1, "7fffffffffffffff"),
        (1.5, "3fc00000"),
        (-30.0, "c1f00000"),
        (0.1, "3fb999999999999a"),
        (1e300, "7e37e43c8800759c"),
        (True, "01"),
        (False, "00"),
        ("", ""),
        ("é", "c3a9"),
        (b"\x00\xff", "00ff"),
        (ObjLink(33606, 0), "83460000"),
        (None, ""),
    ],
)
def test_value_bytes(value: Value, raw: str) -> None:
    assert value_bytes(value) == bytes.fromhex(raw)


def test_integers_beyond_64_bits_are_refused() -> None:
    with pytest.raises(ContentEncodeError, match="64 bits"):
        value_bytes(2**63)


def test_typed_readers() -> None:
    assert tlv_int(b"\xff") == -1
    assert tlv_int(b"\xff", signed=False) == 255
    assert tlv_int(bytes.fromhex("0000000000000100")) == 256
    assert tlv_float(bytes.fromhex("c1f00000")) == -30.0
    assert tlv_float(bytes.fromhex("3fb999999999999a")) == 0.1
    assert tlv_bool(b"\x01") is True
    assert tlv_bool(b"\x00") is False
    assert tlv_str("Zoë".encode()) == "Zoë"
    assert tlv_objlnk(bytes.fromhex("0003ffff")) == ObjLink(3, 65535)


@pytest.mark.parametrize(
    ("reader", "raw"),
    [
        (tlv_int, b""),
        (tlv_int, b"\x00\x00\x00"),
        (tlv_float, b"\x00\x00"),
        (tlv_bool, b"\x02"),
        (tlv_bool, b""),
        (tlv_str, b"\xff"),
        (tlv_objlnk, b"\x00\x03\x00"),
    ],
)
def test_typed_readers_refuse_wrong_sizes(reader: object, raw: bytes) -> None:
    with pytest.raises(ContentDecodeError):
        reader(raw)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("payload", "base", "message"),
    [
        ("c1 00", "/3/0", "needs 1 bytes, 0 remain"),
        ("c8", "/3/0", "truncated"),
        ("c8 00", "/3/0", "truncated"),
        ("e1 01", "/3/0", "truncated"),
        ("d8 00 00 00", "/3/0", "truncated"),
        ("03 00 c1 00 2a 00", "/3", "truncated"),
        ("03 00 c2 00 2a", "/3", "needs 2 bytes, 1 remain"),
        ("c1 00 2a", "/3", "resource 0 is not allowed under /3"),
        ("05 00 03 00 c1 00 2a", "/3/0", "object instance 0 is not allowed under /3/0"),
        ("41 00 2a", "/3/0", "resource instance 0 is not allowed under /3/0"),
        ("83 06 c1 00 01", "/3/0", "resource 0 is not allowed under /3/0/6"),
        ("c1 02 2a", "/3/0/1", "resource 2 does not belong to /3/0/1"),
        ("41 00 2a", "/3/0/6/1", "resource instance 0 does not belong"),
    ],
)
def test_malformed_payloads(payload: str, base: str, message: str) -> None:
    with pytest.raises(ContentDecodeError, match=message):
        decode(bytes.fromhex(payload), base)


@pytest.mark.parametrize("base", [None, "/", "3/x", "/3/0/1/2/3"])
def test_bad_bases(base: str | None) -> None:
    with pytest.raises(ContentDecodeError):
        decode(b"", base)


def test_encode_refusals() -> None:
    with pytest.raises(ContentEncodeError, match="not all under"):
        encode([RV("/3/0/1", 1)], "/4")
    with pytest.raises(ContentEncodeError, match="not all under"):
        encode([RV("/3/0/1", 1), RV("/4/0/1", 1)])
    with pytest.raises(ContentEncodeError, match="both single and multiple"):
        encode([RV("/3/0/6", 1), RV("/3/0/6/0", 1)])
    with pytest.raises(ContentEncodeError, match="2 values for one resource instance"):
        encode([RV("/3/0/6/0", 1), RV("/3/0/6/0", 2)])
    with pytest.raises(ContentEncodeError, match="shallower"):
        encode([RV("/3/0", 1)])
    with pytest.raises(ContentEncodeError, match="no TLV representation"):
        encode([RV("/3/0/1", [1])], "/3/0")  # type: ignore[arg-type]
    assert encode([], "/3/0") == b""


def test_values_are_grouped_by_instance_and_resource() -> None:
    scattered = [RV("/3/0/6/0", 1), RV("/3/1/1", "a"), RV("/3/0/1", "b"), RV("/3/0/6/1", 5)]
    payload = encode(scattered, "/3")
    assert decode(payload, "/3") == [
        RV("/3/0/6/0", b"\x01"),
        RV("/3/0/6/1", b"\x05"),
        RV("/3/0/1", b"b"),
        RV("/3/1/1", b"a"),
    ]


# --- round trips ---------------------------------------------------------------------------

ids = st.integers(0, 65535)
tlv_values: st.SearchStrategy[Value] = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(),
    st.binary(),
    st.builds(ObjLink, ids, ids),
)
resource = st.one_of(tlv_values, st.dictionaries(ids, tlv_values, min_size=1, max_size=4))
instance = st.dictionaries(ids, resource, min_size=1, max_size=5)
objects = st.dictionaries(ids, instance, min_size=1, max_size=3)


def _flatten(object_id: int, tree: dict[int, dict[int, object]]) -> list[RV]:
    out = []
    for instance_id, resources in tree.items():
        for resource_id, value in resources.items():
            path = f"/{object_id}/{instance_id}/{resource_id}"
            if isinstance(value, dict):
                out += [RV(f"{path}/{ri}", v) for ri, v in value.items()]
            else:
                out.append(RV(path, value))  # type: ignore[arg-type]
    return out


def _read_as(original: Value, raw: object) -> object:
    """Read TLV bytes back with the type of the value that was encoded."""
    assert isinstance(raw, bytes)
    match original:
        case bool():
            return tlv_bool(raw)
        case int():
            return tlv_int(raw)
        case float():
            return tlv_float(raw)
        case str():
            return tlv_str(raw)
        case ObjLink():
            return tlv_objlnk(raw)
    return raw


def _fits_single(value: float) -> bool:
    try:
        return bool(struct.unpack(">f", struct.pack(">f", value))[0] == value)
    except OverflowError:
        return False


def _check_round_trip(values: list[RV], base: str) -> None:
    decoded = decode(encode(values, base), base)
    assert [v.path for v in decoded] == [v.path for v in values]
    for original, got in zip(values, decoded, strict=True):
        assert isinstance(got.value, bytes)
        assert got.value == value_bytes(original.value)
        read = _read_as(original.value, got.value)
        assert read == original.value
        if isinstance(original.value, float):  # 4 bytes exactly when exact, sign kept
            assert len(got.value) == (4 if _fits_single(original.value) else 8)
            assert isinstance(read, float)
            assert math.copysign(1, read) == math.copysign(1, original.value)


@settings(max_examples=150)
@given(object_id=ids, tree=objects)
def test_round_trip_under_object_base(object_id: int, tree: dict[int, dict[int, object]]) -> None:
    values = _flatten(object_id, tree)
    _check_round_trip(values, f"/{object_id}")


@settings(max_examples=150)
@given(object_id=ids, instance_id=ids, resources=instance)
def test_round_trip_under_instance_base(
    object_id: int, instance_id: int, resources: dict[int, object]
) -> None:
    values = _flatten(object_id, {instance_id: resources})
    encoded = encode(values, f"/{object_id}/{instance_id}")
    assert decode(encoded, f"/{object_id}/{instance_id}") == [
        RV(v.path, value_bytes(v.value)) for v in values
    ]


@settings(max_examples=150)
@given(value=resource)
def test_round_trip_under_resource_base(value: object) -> None:
    values = _flatten(3, {0: {6: value}})
    assert decode(encode(values), "/3/0/6") == [RV(v.path, value_bytes(v.value)) for v in values]
