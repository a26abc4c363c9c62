"""LwM2M Send (`POST /dp`): the real clients' Sends parse to absolute paths and times, what each
subscribed path is told, and every refusal (format, malformed, too large, not `POST /dp`)."""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, strategies as st

from dm_actor.coap.message import Message, decode, path_options, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import ResourceValue
from dm_actor.lwm2m.send import (
    MAX_RECORDS,
    SendError,
    SendRequest,
    parse_body,
    parse_send,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
WALL = 1_796_290_000.0
JSON, CBOR = 110, 112


def sends(stem: str) -> list[Message]:
    """The `POST /dp` requests of a capture, in order."""
    out = []
    for line in (VECTORS / f"{stem}.jsonl").read_text().splitlines()[1:]:
        msg = decode(bytes.fromhex(json.loads(line)["hex"]))
        if msg.code == Code.POST and msg.uri_path == ("dp",):
            out.append(msg)
    return out


def ok(result: SendRequest | SendError) -> SendRequest:
    assert isinstance(result, SendRequest), result
    return result


def request(
    payload: bytes, ct: int | None = JSON, path: str = "/dp", code: int = Code.POST
) -> Message:
    options = path_options(path)
    if ct is not None:
        options += ((OptionNumber.CONTENT_FORMAT, uint_bytes(ct)),)
    return Message(MessageType.CON, code, 1, b"", options, payload)


# -- the real clients -------------------------------------------------------------------------


def test_anjay_sends_senml_cbor_with_base_name_base_time_and_relative_names() -> None:
    first, second, third = (ok(parse_send(m, WALL)) for m in sends("anjay-client-udp-send"))
    assert first == SendRequest(CBOR, (ResourceValue("/3/0/0", "anjay", 1796290283.8770697),))
    t = 1796290285.8062441
    # {bn:"/3/0", n:"/0"}: the name carries its own slash
    assert second.values == (
        ResourceValue("/3/0/0", "anjay", t),
        ResourceValue("/3/0/9", 0, t),
        ResourceValue("/3/0/13", 1796290285, t),
        ResourceValue("/3/0/14", "+01:00", t),
    )
    assert third.values == (ResourceValue("/3303/0/5700", 18.0, 1796290287.9058747),)


def test_wakaama_sends_senml_json_with_a_zero_length_token() -> None:
    messages = sends("wakaama-client-udp-send")
    assert [m.token for m in messages] == [b""] * 4
    one, three, full, mixed = (ok(parse_send(m, WALL)) for m in messages)
    assert one == SendRequest(JSON, (ResourceValue("/3/0/9", 100),))
    assert [v.path for v in three.values] == ["/3/0/0", "/3/0/9", "/3/0/14"]
    assert len(messages[2].payload) == 416
    assert [v.path for v in full.values][:6] == [
        "/3/0/0", "/3/0/1", "/3/0/2", "/3/0/3", "/3/0/6/0", "/3/0/6/1"]  # fmt: skip
    assert full.values[-1] == ResourceValue("/3/0/16", "U")
    # {"bn":"/"} and names spanning objects
    assert mixed.values == (ResourceValue("/1/0/1", 300), ResourceValue("/31024/10/1", 20))


def test_a_block1_send_body_once_reassembled_is_parsed_by_parse_body() -> None:
    """Anjay's Send in two Block1 blocks: the reassembly (not here) hands the whole body."""
    path = VECTORS / "anjay-client-udp-block1-send.jsonl"
    if not path.exists():
        pytest.skip("the Block1 capture is not in tests/vectors")
    blocks = [m for m in _all(path) if m.code == Code.POST and m.uri_path == ("dp",)]
    assert len(blocks) == 2
    send = ok(parse_body(blocks[-1].content_format, b"".join(m.payload for m in blocks), WALL))
    assert len(send.values) == 15
    assert send.values[0].path == "/3/0/0" and send.values[-1].path == "/3/0/21"


def _all(path: Path) -> list[Message]:
    return [
        decode(bytes.fromhex(json.loads(ln)["hex"])) for ln in path.read_text().splitlines()[1:]
    ]


# -- what a subscribed path is told -----------------------------------------------------------


def test_a_subscription_to_the_instance_gets_the_sent_resources_under_it_in_the_sent_format() -> (
    None
):
    send = ok(parse_send(sends("wakaama-client-udp-send")[1], WALL))
    payloads = dict(send.payloads(["/1/0", "/3/0", "/3/0/9", "/3/0/1", "/3"]))
    assert set(payloads) == {"/3/0", "/3/0/9", "/3"}  # nothing for /1/0 nor the unsent /3/0/1
    assert payloads["/3/0"] == payloads["/3"]
    assert json.loads(payloads["/3/0"]) == [
        {"bn": "/3/0/", "n": "0", "vs": "Open Mobile Alliance"},
        {"n": "9", "v": 100},
        {"n": "14", "vs": "+01:00"},
    ]
    # a single resource: what a GET of /3/0/9 in SenML JSON gives (Wakaama's own answer)
    assert payloads["/3/0/9"] == b'[{"bn":"/3/0/9","v":100}]'
    assert content.decode(JSON, payloads["/3/0"]) == list(send.values)


def test_senml_cbor_stays_cbor_and_keeps_each_value_time() -> None:
    send = ok(parse_send(sends("anjay-client-udp-send")[1], WALL))
    [(path, payload)] = send.payloads(["/3/0"])
    assert path == "/3/0"
    assert content.decode(CBOR, payload) == list(send.values)  # times included
    [(_, single)] = send.payloads(["/3/0/9"])
    assert content.decode(CBOR, single) == [ResourceValue("/3/0/9", 0, 1796290285.8062441)]


def test_covered_is_by_path_segments_and_keeps_resource_instances() -> None:
    values = [("/3/1/9", 1), ("/3/10/9", 2), ("/3/1/6/0", 3), ("/3/1/6/1", 4)]
    send = SendRequest(JSON, tuple(ResourceValue(p, v) for p, v in values))
    assert [v.value for v in send.covered("/3/1")] == [1, 3, 4]
    assert [v.value for v in send.covered("/3/1/6")] == [3, 4]
    assert [v.value for v in send.covered("/3/1/6/1")] == [4]
    assert send.covered("/3/1/60") == []
    assert [v.value for v in send.covered("/3")] == [1, 2, 3, 4]


def test_a_time_series_keeps_every_record_and_relative_times_become_absolute() -> None:
    body = json.dumps([
        {"bn": "/3303/0/5700", "bt": 1_700_000_000, "v": 20.5},
        {"t": 10, "v": 21.0},
        {"bn": "/3303/0/", "n": "5701", "bt": -5, "vs": "Cel"},
        {"n": "5601", "bt": 0, "v": 1},
    ]).encode()  # fmt: skip
    send = ok(parse_body(JSON, body, WALL))
    assert send.values == (
        ResourceValue("/3303/0/5700", 20.5, 1_700_000_000),
        ResourceValue("/3303/0/5700", 21.0, 1_700_000_010),
        ResourceValue("/3303/0/5701", "Cel", WALL - 5),  # relative: 5 s before it was read
        ResourceValue("/3303/0/5601", 1, WALL),
    )
    [(_, payload)] = send.payloads(["/3303/0/5700"])
    assert [r["t"] for r in json.loads(payload)] == [1_700_000_000, 1_700_000_010]


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ct", "code"),
    [
        (None, Code.UNSUPPORTED_CONTENT_FORMAT),
        (0, Code.UNSUPPORTED_CONTENT_FORMAT),  # text/plain
        (11542, Code.UNSUPPORTED_CONTENT_FORMAT),  # TLV
        (11543, Code.UNSUPPORTED_CONTENT_FORMAT),  # LwM2M JSON
        (11544, Code.UNSUPPORTED_CONTENT_FORMAT),  # LwM2M CBOR (1.2's Send)
        (60, Code.UNSUPPORTED_CONTENT_FORMAT),  # plain CBOR
        (40, Code.UNSUPPORTED_CONTENT_FORMAT),
    ],
)
def test_other_content_formats_get_4_15(ct: int | None, code: int) -> None:
    result = parse_send(request(b'[{"bn":"/3/0/9","v":1}]', ct), WALL)
    assert isinstance(result, SendError) and result.code == code


@pytest.mark.parametrize(
    ("ct", "body"),
    [
        (JSON, b""),
        (JSON, b"[]"),
        (JSON, b"{}"),
        (JSON, b"[{"),
        (JSON, b'[{"bn":"/3/0","v":1}]'),  # an instance with a value
        (JSON, b'[{"bn":"/3/0/9"}]'),  # no value (read-composite style)
        (JSON, b'[{"bn":"/3/0/9","v":1,"vs":"x"}]'),  # two values
        (JSON, b'[{"bn":"/3/0/99999999","v":1}]'),
        (JSON, b'[{"n":"/3/0/9","v":"text in v"}]'),
        (JSON, b"\xff\xfe"),
        (JSON, b"[" * 4000),
        (CBOR, b""),
        (CBOR, b"\x80"),  # []
        (CBOR, b"\xa0"),  # {}
        (CBOR, cbor2.dumps([{-2: "/3/0/9", 2: 1}]) + b"\x00"),  # trailing bytes
        (CBOR, cbor2.dumps([{-2: "/3/0/9"}])),
        (CBOR, cbor2.dumps([{-2: "/3/0/9", 2: [1]}])),
        (CBOR, b"\x81" * 4000 + b"\x00"),  # nested arrays, 4000 deep
        (CBOR, b"\xa1\x00" * 2000 + b"\x00"),  # nested maps
        (CBOR, b"\x9f" * 3000),  # indefinite arrays, never closed
        (CBOR, b"\x5b\xff\xff\xff\xff\xff\xff\xff\xff"),  # a byte string of 2**64 - 1
    ],
)
def test_malformed_bodies_get_4_00(ct: int, body: bytes) -> None:
    result = parse_body(ct, body, WALL)
    assert isinstance(result, SendError), result
    assert result.code == Code.BAD_REQUEST, result


def test_deeper_nesting_than_the_interpreter_recurses_is_4_00() -> None:
    for body in (b"\x81" * 200_000 + b"\x00", b"[" * 200_000 + b"]" * 200_000):
        result = parse_body(CBOR if body[0] == 0x81 else JSON, body, WALL, max_body=1 << 20)
        assert isinstance(result, SendError) and result.code == Code.BAD_REQUEST


def test_a_huge_array_within_a_datagram_is_taken_and_a_larger_one_refused() -> None:
    # ~1,300 records in a 4096-byte datagram: taken
    records = [{-2: "/3303/0/5700", 2: 1}] + [{2: i % 24} for i in range(1, 1300)]
    body = cbor2.dumps(records)
    assert len(body) < 4096
    send = ok(parse_body(CBOR, body, WALL))
    assert len(send.values) == 1300
    [(_, payload)] = send.payloads(["/3303/0/5700"])
    assert len(content.decode(CBOR, payload)) == 1300
    # more records than MAX_RECORDS (a reassembled body): 4.13
    body = cbor2.dumps([{-2: "/3/0/9", 2: 1}] + [{2: 1}] * MAX_RECORDS)
    result = parse_body(CBOR, body, WALL)
    assert isinstance(result, SendError) and result.code == Code.REQUEST_ENTITY_TOO_LARGE
    result = parse_body(CBOR, b"\x00" * 70_000, WALL)
    assert isinstance(result, SendError) and result.code == Code.REQUEST_ENTITY_TOO_LARGE


def test_paths_are_given_one_spelling() -> None:
    send = ok(parse_body(JSON, b'[{"bn":"3/0/9","v":1},{"bn":"/3/0/","n":"6/1","v":2}]', WALL))
    assert [v.path for v in send.values] == ["/3/0/9", "/3/0/6/1"]


def test_only_post_dp_is_a_send() -> None:
    body = b'[{"bn":"/3/0/9","v":1}]'
    result = parse_send(request(body, code=Code.GET), WALL)
    assert isinstance(result, SendError) and result.code == Code.METHOD_NOT_ALLOWED
    result = parse_send(request(body, path="/dp/1"), WALL)
    assert isinstance(result, SendError) and result.code == Code.NOT_FOUND
    assert isinstance(parse_send(request(body), WALL), SendRequest)


@given(ct=st.sampled_from([JSON, CBOR]), body=st.binary(max_size=300))
def test_random_bodies_are_taken_or_refused_never_raised(ct: int, body: bytes) -> None:
    result = parse_body(ct, body, WALL)
    if isinstance(result, SendRequest):
        for path, payload in result.payloads(["/3", "/3/0", "/3/0/0"]):
            assert content.decode(ct, payload) == result.covered(path)
    else:
        assert result.code in (Code.BAD_REQUEST, Code.REQUEST_ENTITY_TOO_LARGE)


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from([-2, -3, 0, 2, 3, 4, 6, 8, "vlo"]),
            st.one_of(
                st.integers(-(2**70), 2**70),
                st.floats(),
                st.text(max_size=8),
                st.binary(max_size=4),
                st.booleans(),
                st.none(),
                st.sampled_from(["/3/0/", "/3/0/9", "9", "6/1", "/", "3:0"]),
            ),
            max_size=4,
        ),
        max_size=6,
    )
)
def test_senml_cbor_shaped_records_are_taken_or_refused_never_raised(
    records: list[dict[object, object]],
) -> None:
    result = parse_body(CBOR, cbor2.dumps(records), WALL)
    if isinstance(result, SendRequest):
        for path, payload in result.payloads(["/3/0", "/3/0/9"]):
            assert content.decode(CBOR, payload) == result.covered(path)
