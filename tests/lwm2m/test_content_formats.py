"""The registry, the single-value formats (text/plain, opaque, CBOR) and LwM2M CBOR."""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

import cbor2
import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.numbers import ContentFormat
from dm_actor.lwm2m.content import (
    CODECS,
    ContentDecodeError,
    ContentEncodeError,
    ObjLink,
    ResourceValue as RV,
    UnsupportedContentFormat,
    decode,
    encode,
)
from dm_actor.lwm2m.errors import Lwm2mError

if TYPE_CHECKING:
    from dm_actor.lwm2m.content.values import Value


def test_registry_covers_the_lwm2m_formats() -> None:
    assert set(CODECS) == {
        ContentFormat.TEXT,
        ContentFormat.OCTET_STREAM,
        ContentFormat.CBOR,
        ContentFormat.SENML_JSON,
        ContentFormat.SENML_CBOR,
        ContentFormat.LWM2M_TLV,
        ContentFormat.LWM2M_TLV_LEGACY,
        ContentFormat.LWM2M_JSON,
        ContentFormat.LWM2M_JSON_LEGACY,
        ContentFormat.LWM2M_CBOR,
    }
    assert CODECS[1542] == CODECS[11542]
    assert CODECS[1543] == CODECS[11543]


@pytest.mark.parametrize("number", [40, 41, 50, 9999])
def test_unknown_formats(number: int) -> None:
    with pytest.raises(UnsupportedContentFormat, match=f"unsupported content format {number}"):
        decode(number, b"", "/3/0/0")
    with pytest.raises(UnsupportedContentFormat) as info:
        encode(number, [RV("/3/0/0", "a")])
    assert info.value.content_format == number


def test_errors_are_lwm2m_value_errors() -> None:
    for error in (ContentDecodeError, ContentEncodeError, UnsupportedContentFormat):
        assert issubclass(error, Lwm2mError)
        assert issubclass(error, ValueError)


def test_text() -> None:
    assert decode(0, b"77", "/3/0/9") == [RV("/3/0/9", "77")]
    assert decode(0, "Zoë".encode(), "/3/0/1/2") == [RV("/3/0/1/2", "Zoë")]
    assert decode(0, b"", "/3/0/1") == [RV("/3/0/1", "")]
    with pytest.raises(ContentDecodeError, match="not UTF-8"):
        decode(0, b"\xff", "/3/0/1")
    with pytest.raises(ContentDecodeError, match="needs the request path"):
        decode(0, b"1")
    with pytest.raises(ContentDecodeError, match="does not name a resource"):
        decode(0, b"1", "/3/0")


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ("42", b"42"),
        (42, b"42"),
        (-1, b"-1"),
        (1.5, b"1.5"),
        (True, b"1"),
        (False, b"0"),
        (ObjLink(3, 0), b"3:0"),
        (b"\xff\x00", b"/wA="),
    ],
)
def test_text_encode(value: Value, body: bytes) -> None:
    assert encode(0, [RV("/31024/10/1", value)]) == body


def test_single_value_encode_refusals() -> None:
    with pytest.raises(ContentEncodeError, match="carries 1 value, not 2"):
        encode(0, [RV("/3/0/1", 1), RV("/3/0/2", 2)])
    with pytest.raises(ContentEncodeError, match="missing value"):
        encode(0, [RV("/3/0/1", None)])
    with pytest.raises(ContentEncodeError, match="shallower"):
        encode(0, [RV("/3/0", 1)])
    with pytest.raises(ContentEncodeError, match="not int"):
        encode(42, [RV("/3/0/1", 1)])


def test_opaque() -> None:
    assert decode(42, b"\x00\xff", "/5/0/0") == [RV("/5/0/0", b"\x00\xff")]
    assert encode(42, [RV("/5/0/0", b"\x00\xff")]) == b"\x00\xff"


@pytest.mark.parametrize(
    ("item", "value"),
    [
        (1, 1),
        (-(2**64), -(2**64)),
        (2.5, 2.5),
        (True, True),
        ("s", "s"),
        (b"b", b"b"),
        (None, None),
        (Decimal("4.5"), 4.5),
        (datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), 1704067200),
    ],
)
def test_cbor_scalar(item: object, value: Value) -> None:
    decoded = decode(60, cbor2.dumps(item, datetime_as_timestamp=True), "/3/0/13")
    assert decoded == [RV("/3/0/13", value)]
    assert type(decoded[0].value) is type(value)


@pytest.mark.parametrize(
    "payload", [b"", b"\x01\x02", cbor2.dumps([1]), cbor2.dumps({1: 2}), b"\xf7", b"\xe0"]
)
def test_cbor_scalar_refusals(payload: bytes) -> None:
    with pytest.raises(ContentDecodeError):
        decode(60, payload, "/3/0/1")


def test_cbor_scalar_encode() -> None:
    assert encode(60, [RV("/3/0/9", 100)]) == b"\x18\x64"
    assert encode(60, [RV("/3/0/9", -30.0)]) == b"\xf9\xcf\x80"  # shortest exact float
    assert encode(60, [RV("/3/0/22/0", ObjLink(3, 0))]) == cbor2.dumps("3:0")
    with pytest.raises(ContentEncodeError, match="cannot encode as CBOR"):
        encode(60, [RV("/3/0/9", object())])  # type: ignore[arg-type]


# LwM2M CBOR payloads from the Anjay unit tests' comments (ids 13/26/1 ...)
@pytest.mark.parametrize(
    "payload",
    [
        "a1 83 0d 18 1a 01 18 2a",  # {[13, 26, 1]: 42}
        "bf 9f 0d 18 1a 01 ff 18 2a ff",  # indefinite lengths
        "a1 0d a1 18 1a a1 01 18 2a",  # {13: {26: {1: 42}}}
        "a1 81 0d a1 81 18 1a a1 81 01 18 2a",  # {[13]: {[26]: {[1]: 42}}}
    ],
)
def test_lwm2m_cbor_key_shapes(payload: str) -> None:
    assert decode(11544, bytes.fromhex(payload)) == [RV("/13/26/1", 42)]


def test_lwm2m_cbor_mixed_keys_and_values() -> None:
    # {[13, 26, 1]: 42, [13, 26]: {[2]: 21}} and {[13, 26, 1]: {2: null, 3: 5}}
    mixed = bytes.fromhex("a2 83 0d 18 1a 01 18 2a 82 0d 18 1a a1 81 02 15")
    assert decode(11544, mixed) == [RV("/13/26/1", 42), RV("/13/26/2", 21)]
    nulls = bytes.fromhex("a1 83 0d 18 1a 01 a2 02 f6 03 05")
    assert decode(11544, nulls) == [RV("/13/26/1/2", None), RV("/13/26/1/3", 5)]
    fraction = bytes.fromhex("a1 84 0d 18 1a 01 02 c4 82 20 18 2d")  # 4([-1, 45])
    assert decode(11544, fraction) == [RV("/13/26/1/2", 4.5)]


def test_lwm2m_cbor_encode_folds_single_branches() -> None:
    assert encode(11544, [RV("/13/26/1", 42)]) == bytes.fromhex("a1 83 0d 18 1a 01 18 2a")
    assert encode(11544, [RV("/13/26/1", 42), RV("/13/26/2", 21)]) == bytes.fromhex(
        "a1 82 0d 18 1a a2 01 18 2a 02 15"
    )
    values = [RV("/3/0/6/0", 1), RV("/3/0/6/1", 5), RV("/3/1/0", "x"), RV("/4/0/1", None)]
    assert cbor2.loads(encode(11544, values)) == {
        3: {(0, 6): {0: 1, 1: 5}, (1, 0): "x"},
        (4, 0, 1): None,
    }


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ([1], "not a map"),
        ({3: {0: 1}}, "does not name a resource"),
        ({"3": {0: {1: 1}}}, "is no id"),
        ({(): 1}, "is no id"),
        ({(3, 0, 70000): 1}, "is no id"),
        ({(3, True, 1): 1}, "is no id"),
        ({(3, 0, 1, 2): {3: 1}}, "too deep"),
        ({(3, 0, 1): [1]}, "not an LwM2M value"),
    ],
)
def test_lwm2m_cbor_refusals(item: object, message: str) -> None:
    with pytest.raises(ContentDecodeError, match=message):
        decode(11544, cbor2.dumps(item))


def test_lwm2m_cbor_encode_refusals() -> None:
    with pytest.raises(ContentEncodeError, match="appears twice"):
        encode(11544, [RV("/3/0/1", 1), RV("/3/0/1", 2)])
    with pytest.raises(ContentEncodeError, match="appears twice or holds instances"):
        encode(11544, [RV("/3/0/6/0", 1), RV("/3/0/6", 2)])
    with pytest.raises(ContentEncodeError, match="under a value"):
        encode(11544, [RV("/3/0/6", 2), RV("/3/0/6/0", 1)])


ids = st.integers(0, 65535)
cbor_values = st.one_of(
    st.integers(-(2**64), 2**64 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(),
    st.binary(),
    st.none(),
)
trees = st.dictionaries(
    ids,
    st.dictionaries(
        ids,
        st.dictionaries(
            ids,
            cbor_values | st.dictionaries(ids, cbor_values, min_size=1, max_size=3),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=3,
    ),
    max_size=3,
)


@settings(max_examples=200)
@given(tree=trees)
def test_lwm2m_cbor_round_trip(tree: dict[int, dict[int, dict[int, object]]]) -> None:
    values = []
    for o, instances in tree.items():
        for i, resources in instances.items():
            for r, value in resources.items():
                if isinstance(value, dict):
                    values += [RV(f"/{o}/{i}/{r}/{ri}", v) for ri, v in value.items()]
                else:
                    values.append(RV(f"/{o}/{i}/{r}", value))  # type: ignore[arg-type]
    decoded = decode(11544, encode(11544, values))
    assert sorted(decoded, key=repr) == sorted(values, key=repr)
    assert sorted(type(v.value).__name__ for v in decoded) == sorted(
        type(v.value).__name__ for v in values
    )
