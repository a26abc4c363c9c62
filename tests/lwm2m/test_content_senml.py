"""SenML JSON / SenML CBOR / LwM2M JSON: name and time resolution, value kinds, errors, and
round trips of generated value lists (each format tested for what it can carry)."""

from __future__ import annotations

import math

import cbor2
import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.lwm2m.content import ContentDecodeError, ContentEncodeError, ObjLink
from dm_actor.lwm2m.content.senml import (
    decode_lwm2m_json,
    decode_senml_cbor,
    decode_senml_json,
    encode_lwm2m_json,
    encode_senml_cbor,
    encode_senml_json,
)
from dm_actor.lwm2m.content.values import ResourceValue as RV, Value


def test_base_name_is_concatenated_and_carried() -> None:
    payload = (
        b'[{"bn":"/3/0/","n":"0","vs":"a"},{"n":"6/1","v":5},'
        b'{"bn":"/4/0/","n":"1","vb":true},{"n":"2","v":1.5}]'
    )
    assert decode_senml_json(payload) == [
        RV("/3/0/0", "a"),
        RV("/3/0/6/1", 5),
        RV("/4/0/1", True),
        RV("/4/0/2", 1.5),
    ]


def test_name_without_base_name_and_base_name_without_name() -> None:
    assert decode_senml_json(b'[{"n":"/3/0/1","vs":"x"}]') == [RV("/3/0/1", "x")]
    assert decode_senml_json(b'[{"bn":"/3/0/1","vs":"x"}]') == [RV("/3/0/1", "x")]


def test_value_kinds() -> None:
    payload = (
        b'[{"bn":"/9/0/","n":"1","v":-7},{"n":"2","v":2.25},{"n":"3","vs":"s"},'
        b'{"n":"4","vb":false},{"n":"5","vd":"AP8-_w"},{"n":"6","vlo":"3:65535"},{"n":"7"}]'
    )
    assert decode_senml_json(payload) == [
        RV("/9/0/1", -7),
        RV("/9/0/2", 2.25),
        RV("/9/0/3", "s"),
        RV("/9/0/4", False),
        RV("/9/0/5", b"\x00\xff\x3e\xff"),
        RV("/9/0/6", ObjLink(3, 65535)),
        RV("/9/0/7", None),
    ]


def test_times_add_base_time() -> None:
    payload = (
        b'[{"bn":"/3/0/9","bt":1700000000,"v":1},{"n":"","t":-5,"v":2},{"bn":"/3/0/7/0","v":3}]'
    )
    assert decode_senml_json(payload) == [
        RV("/3/0/9", 1, 1700000000.0),
        RV("/3/0/9", 2, 1699999995.0),
        RV("/3/0/7/0", 3, 1700000000.0),
    ]
    assert decode_senml_json(b'[{"n":"/3/0/9","t":12.5,"v":1}]') == [RV("/3/0/9", 1, 12.5)]


def test_value_less_records_may_name_objects_and_instances() -> None:
    assert decode_senml_json(b'[{"n":"/3/0"},{"n":"/1"}]') == [RV("/3/0", None), RV("/1", None)]
    assert encode_senml_json([RV("/3/0", None), RV("/1", None)]) == (
        b'[{"bn":"/","n":"3/0"},{"n":"1"}]'
    )


def test_encode_puts_the_common_parent_in_the_first_record() -> None:
    values = [RV("/3/0/0", "a"), RV("/3/0/6/0", 1), RV("/3/0/6/1", 5)]
    assert encode_senml_json(values) == (
        b'[{"bn":"/3/0/","n":"0","vs":"a"},{"n":"6/0","v":1},{"n":"6/1","v":5}]'
    )
    assert encode_senml_json([RV("/3/0/0", "a")]) == b'[{"bn":"/3/0/0","vs":"a"}]'
    assert encode_senml_json([]) == b"[]"
    # a parent that is itself named moves the base name one level up
    assert encode_senml_json([RV("/3/0", None), RV("/3/0/1", 1)]) == (
        b'[{"bn":"/3/","n":"0"},{"n":"0/1","v":1}]'
    )


def test_encode_value_kinds() -> None:
    values = [
        RV("/9/0/1", True),
        RV("/9/0/2", b"\x00\xff\x3e\xff"),
        RV("/9/0/3", ObjLink(3, 0)),
        RV("/9/0/4", 1.0, 17.5),
    ]
    assert encode_senml_json(values) == (
        b'[{"bn":"/9/0/","n":"1","vb":true},{"n":"2","vd":"AP8-_w"},{"n":"3","vlo":"3:0"},'
        b'{"n":"4","v":1.0,"t":17.5}]'
    )
    assert cbor2.loads(encode_senml_cbor(values)) == [
        {-2: "/9/0/", 0: "1", 4: True},
        {0: "2", 8: b"\x00\xff\x3e\xff"},
        {0: "3", "vlo": "3:0"},
        {0: "4", 2: 1.0, 6: 17.5},
    ]


def test_senml_cbor_labels() -> None:
    pack = [
        {-2: "/9/0/", -3: 100, 0: "1", 2: 7, 6: 1},
        {0: "2", 3: "s", "unknown": 1},
        {0: "3", 8: b"\x01"},
        {0: "4", "vlo": "1:2"},
        {0: "5", 4: True},
    ]
    assert decode_senml_cbor(cbor2.dumps(pack)) == [
        RV("/9/0/1", 7, 101.0),
        RV("/9/0/2", "s", 100.0),
        RV("/9/0/3", b"\x01", 100.0),
        RV("/9/0/4", ObjLink(1, 2), 100.0),
        RV("/9/0/5", True, 100.0),
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "bad SenML JSON"),
        (b"{}", "bad SenML JSON"),
        (b'[{"n":"/3/0/1","v":"1"}]', "bad SenML JSON"),
        (b'[{"n":"/3/0/1","v":true}]', "bad SenML JSON"),
        (b'[{"n":"/3/0/1","v":1,"vs":"a"}]', "has 2 values"),
        (b'[{"n":"/3/0","v":1}]', "does not name a resource"),
        (b'[{"bn":"/3/0/","vs":"a"}]', "segment"),
        (b'[{"n":"/3/0/1/2/3","vs":"a"}]', "1 to 4"),
        (b'[{"n":"/3/70000/1","vs":"a"}]', "65535"),
        (b'[{"vs":"a"}]', "empty path"),
        (b'[{"n":"/3/0/1","vd":"AP8=="}]', "base64"),
        (b'[{"n":"/3/0/1","vd":"A*8"}]', "base64"),
        (b'[{"n":"/3/0/1","vlo":"3"}]', "object:instance"),
        (b'[{"n":"/3/0/1","vlo":"3:-1"}]', "bad LwM2M id"),
    ],
)
def test_malformed_senml_json(payload: bytes, message: str) -> None:
    with pytest.raises(ContentDecodeError, match=message):
        decode_senml_json(payload)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({0: "/3/0/1"}, "not an array of maps"),
        ([1], "not an array of maps"),
        ([{0: 1}], "bad SenML CBOR record"),
        ([{0: "/3/0/1", 8: "text"}], "bad SenML CBOR record"),
        ([{0: "/3/0/1", 2: 1, 3: "a"}], "has 2 values"),
    ],
)
def test_malformed_senml_cbor(item: object, message: str) -> None:
    with pytest.raises(ContentDecodeError, match=message):
        decode_senml_cbor(cbor2.dumps(item))


def test_senml_cbor_refuses_trailing_bytes() -> None:
    with pytest.raises(ContentDecodeError, match="1 bytes after"):
        decode_senml_cbor(cbor2.dumps([{0: "/3/0/1", 2: 1}]) + b"\x00")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([RV("/3/0", 1)], "shallower"),
        ([RV("/3/0/1", math.nan)], "no JSON representation"),
        ([RV("/3/0/1", math.inf)], "no JSON representation"),
        ([RV("nope", 1)], "segment"),
    ],
)
def test_encode_refusals(values: list[RV], message: str) -> None:
    with pytest.raises(ContentEncodeError, match=message):
        encode_senml_json(values)


def test_lwm2m_json_decode() -> None:
    payload = (
        b'{"bn":"/3/0/","e":[{"n":"0","sv":"Open Mobile Alliance"},{"n":"6/0","v":1},'
        b'{"n":"9","v":2.5},{"n":"20","bv":true},{"n":"22/0","ov":"33606:0"}]}'
    )
    assert decode_lwm2m_json(payload) == [
        RV("/3/0/0", "Open Mobile Alliance"),
        RV("/3/0/6/0", 1),
        RV("/3/0/9", 2.5),
        RV("/3/0/20", True),
        RV("/3/0/22/0", ObjLink(33606, 0)),
    ]


def test_lwm2m_json_names_relative_to_the_request_path() -> None:
    payload = b'{"bt":10,"e":[{"n":"1","v":1,"t":2},{"n":"6/0","v":0}]}'
    assert decode_lwm2m_json(payload, "/3/0") == [
        RV("/3/0/1", 1, 12.0),
        RV("/3/0/6/0", 0, 10.0),
    ]
    assert decode_lwm2m_json(b'{"e":[{"v":7}]}', "/3/0/9") == [RV("/3/0/9", 7)]
    assert decode_lwm2m_json(b'{"bn":"/3/0/9","e":[{"v":7}]}') == [RV("/3/0/9", 7)]


def test_lwm2m_json_encode() -> None:
    values = [RV("/3/0/0", "a"), RV("/3/0/6/0", 1), RV("/3/0/5", b"\xff"), RV("/3/0/7", False)]
    assert encode_lwm2m_json(values) == (
        b'{"bn":"/3/0/","e":[{"n":"0","sv":"a"},{"n":"6/0","v":1},{"n":"5","sv":"/w=="},'
        b'{"n":"7","bv":false}]}'
    )
    assert encode_lwm2m_json([RV("/3/0/9", 7)]) == b'{"bn":"/3/0/9","e":[{"v":7}]}'


@pytest.mark.parametrize(
    "payload", [b"[]", b'{"bn":"/3/0/"}', b'{"e":[{"n":"/3/0/1","v":"x"}]}', b'{"e":[{"v":1}]}']
)
def test_malformed_lwm2m_json(payload: bytes) -> None:
    with pytest.raises(ContentDecodeError):
        decode_lwm2m_json(payload)


# --- round trips ---------------------------------------------------------------------------

ids = st.integers(0, 65535)
resource_paths = st.builds(
    lambda o, i, r, ri: f"/{o}/{i}/{r}" + ("" if ri is None else f"/{ri}"),
    ids,
    ids,
    ids,
    st.none() | ids,
)
any_paths = st.lists(ids, min_size=1, max_size=4).map(lambda x: "/" + "/".join(map(str, x)))
ints = st.integers(-(2**63), 2**64 - 1)
times = st.none() | st.floats(allow_nan=False, allow_infinity=False)


def _records(values: st.SearchStrategy[Value]) -> st.SearchStrategy[list[RV]]:
    valued = st.builds(RV, resource_paths, values, times)
    bare = st.builds(RV, any_paths, st.none(), times)
    return st.lists(valued | bare, max_size=8)


json_values = st.one_of(
    ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(),
    st.binary(),
    st.builds(ObjLink, ids, ids),
)
cbor_values = json_values | st.floats(allow_nan=False)


def _same(decoded: list[RV], values: list[RV]) -> None:
    assert decoded == values
    for got, original in zip(decoded, values, strict=True):  # 1 == 1.0 == True in Python
        assert type(got.value) is type(original.value)


@settings(max_examples=200)
@given(values=_records(json_values))
def test_senml_json_round_trip(values: list[RV]) -> None:
    _same(decode_senml_json(encode_senml_json(values)), values)


@settings(max_examples=200)
@given(values=_records(cbor_values))
def test_senml_cbor_round_trip(values: list[RV]) -> None:
    _same(decode_senml_cbor(encode_senml_cbor(values)), values)


@settings(max_examples=200)
@given(values=_records(json_values.filter(lambda v: not isinstance(v, bytes))))
def test_lwm2m_json_round_trip_without_opaque(values: list[RV]) -> None:
    """LwM2M JSON carries opaque values as base64 text in `sv`: they come back as str."""
    _same(decode_lwm2m_json(encode_lwm2m_json(values)), values)
