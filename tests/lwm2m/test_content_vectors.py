"""Every content payload the captured clients (Wakaama, Anjay) sent decodes to what they meant.

The payloads come from tests/vectors/*.jsonl; each response is paired with its request (by
token) so the request path is the decoding base, as the server will use it. The .txt files
show the same exchanges for humans; the expected values below are read from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dm_actor.coap.message import decode as decode_message, uint_value
from dm_actor.coap.numbers import ContentFormat, OptionNumber
from dm_actor.lwm2m.content import (
    ResourceValue,
    decode,
    encode,
    tlv_float,
    tlv_int,
    tlv_objlnk,
    tlv_str,
)
from dm_actor.lwm2m.content.values import ObjLink

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
_STRUCTURED = {
    ContentFormat.TEXT,
    ContentFormat.SENML_JSON,
    ContentFormat.SENML_CBOR,
    ContentFormat.LWM2M_TLV,
}


def _content_payloads(name: str) -> list[tuple[str, int, bytes]]:
    """(request path, content format, payload) for each response carrying content."""
    lines = (VECTORS / f"{name}.jsonl").read_text().splitlines()
    paths: dict[bytes, str] = {}
    found = []
    for line in lines[1:]:
        msg = decode_message(bytes.fromhex(json.loads(line)["hex"]))
        options = dict(msg.options)
        if 1 <= msg.code <= 31:
            segments = [v.decode() for n, v in msg.options if n == OptionNumber.URI_PATH]
            paths[msg.token] = "/" + "/".join(segments)
        elif OptionNumber.CONTENT_FORMAT in options and msg.payload:
            content_format = uint_value(options[OptionNumber.CONTENT_FORMAT])
            if content_format != ContentFormat.LINK_FORMAT:
                found.append((paths[msg.token], content_format, msg.payload))
    return found


ALL = [
    (name, *item)
    for name in (
        "wakaama-client-udp",
        "wakaama-client-udp-queue-full",
        "wakaama-client-udp-queue-v10",
        "anjay-client-udp",
        "anjay-client-udp-queue",
    )
    for item in _content_payloads(name)
]


def test_vectors_hold_every_structured_format() -> None:
    assert len(ALL) == 37
    assert {item[2] for item in ALL} == _STRUCTURED


@pytest.mark.parametrize(("name", "path", "content_format", "payload"), ALL)
def test_every_payload_decodes_under_its_request_path(
    name: str, path: str, content_format: int, payload: bytes
) -> None:
    values = decode(content_format, payload, path)
    assert values
    assert all(value.path.startswith(path) for value in values)
    # a re-encoding decodes to the same values (TLV re-encodes the raw bytes it decoded)
    assert decode(content_format, encode(content_format, values, path), path) == values


def _only(name: str, path: str, content_format: int) -> list[list[ResourceValue]]:
    return [
        decode(content_format, payload, path)
        for p, cf, payload in _content_payloads(name)
        if p == path and cf == content_format
    ]


# Wakaama's Device object and test object 31024, as its SenML JSON answer shows them (the
# other captures ran at another clock time, so their Current Time /3/0/13 differs).
WAKAAMA_DEVICE = {
    "/3/0/0": "Open Mobile Alliance",
    "/3/0/1": "Lightweight M2M Client",
    "/3/0/2": "345000123",
    "/3/0/3": "1.0",
    "/3/0/6/0": 1,
    "/3/0/6/1": 5,
    "/3/0/7/0": 3800,
    "/3/0/7/1": 5000,
    "/3/0/8/0": 125,
    "/3/0/8/1": 900,
    "/3/0/9": 100,
    "/3/0/10": 15,
    "/3/0/11/0": 0,
    "/3/0/13": 3163156543,
    "/3/0/14": "+01:00",
    "/3/0/15": "Europe/Berlin",
    "/3/0/16": "U",
}
WAKAAMA_31024 = {
    "/31024/10/1": 42,
    "/31024/10/3": -30.0,
    "/31024/10/5": "",
    "/31024/11/1": 21,
    "/31024/11/3": -28.99,
    "/31024/11/5": "I",
    "/31024/12/1": 22,
    "/31024/12/3": -27.98,
    "/31024/12/5": "II",
}
_STRINGS = {"3": {0, 1, 2, 3, 14, 15, 16}, "31024": {5}}  # the String resources
_FLOATS = {"3": set(), "31024": {3}}


def _typed(values: list[ResourceValue]) -> dict[str, object]:
    """Read TLV bytes with the types of objects 3 and 31024."""
    out: dict[str, object] = {}
    for value in values:
        assert isinstance(value.value, bytes)
        _, object_id, _, resource_id, *_ = value.path.split("/")
        if int(resource_id) in _STRINGS[object_id]:
            out[value.path] = tlv_str(value.value)
        elif int(resource_id) in _FLOATS[object_id]:
            out[value.path] = tlv_float(value.value)
        else:
            out[value.path] = tlv_int(value.value)
    return out


def test_wakaama_senml_json_device_object() -> None:
    (values,) = _only("wakaama-client-udp", "/3/0", ContentFormat.SENML_JSON)
    assert {v.path: v.value for v in values} == WAKAAMA_DEVICE
    assert [v.path for v in values] == list(WAKAAMA_DEVICE)
    assert all(v.time is None for v in values)


def test_wakaama_senml_json_single_resource() -> None:
    assert _only("wakaama-client-udp", "/3/0/0", ContentFormat.SENML_JSON) == [
        [ResourceValue("/3/0/0", "Open Mobile Alliance")]
    ]
    assert _only("wakaama-client-udp", "/3/0/9", ContentFormat.SENML_JSON) == [
        [ResourceValue("/3/0/9", 100)],
        [ResourceValue("/3/0/9", 77)],
    ]
    assert _only("wakaama-client-udp", "/3/0/9", ContentFormat.TEXT) == [
        [ResourceValue("/3/0/9", "77")]
    ]


def test_wakaama_senml_json_object_keeps_int_float_distinction() -> None:
    (values,) = _only("wakaama-client-udp", "/31024", ContentFormat.SENML_JSON)
    got = {v.path: v.value for v in values}
    assert got == WAKAAMA_31024
    assert type(got["/31024/10/1"]) is int
    assert type(got["/31024/10/3"]) is float  # sent as -30.0


def test_wakaama_senml_cbor_matches_its_senml_json() -> None:
    (device,) = _only("wakaama-client-udp-queue-full", "/3/0", ContentFormat.SENML_CBOR)
    assert {v.path: v.value for v in device} == WAKAAMA_DEVICE | {"/3/0/13": 3163154860}
    (test_object,) = _only("wakaama-client-udp-queue-full", "/31024", ContentFormat.SENML_CBOR)
    got = {v.path: v.value for v in test_object}
    assert got == WAKAAMA_31024
    assert type(got["/31024/10/3"]) is float  # a CBOR half float
    assert _only("wakaama-client-udp-queue-full", "/31024/10", ContentFormat.SENML_CBOR) == [
        [
            ResourceValue("/31024/10/1", 42),
            ResourceValue("/31024/10/3", -30.0),
            ResourceValue("/31024/10/5", ""),
        ],
        [
            ResourceValue("/31024/10/1", 55),
            ResourceValue("/31024/10/3", -30.0),
            ResourceValue("/31024/10/5", ""),
        ],
    ]


def test_wakaama_tlv_matches_its_senml() -> None:
    (device,) = _only("wakaama-client-udp-queue-v10", "/3/0", ContentFormat.LWM2M_TLV)
    assert _typed(device) == WAKAAMA_DEVICE | {"/3/0/13": 3163154860}  # an 8-byte integer
    (test_object,) = _only("wakaama-client-udp-queue-v10", "/31024", ContentFormat.LWM2M_TLV)
    typed = _typed(test_object)
    # TLV carries 4-byte floats here, so -28.99 arrives rounded to single precision
    floats = {p for p, v in WAKAAMA_31024.items() if isinstance(v, float)}
    assert {p: v for p, v in typed.items() if p not in floats} == {
        p: v for p, v in WAKAAMA_31024.items() if p not in floats
    }
    for path in floats:
        assert typed[path] == pytest.approx(WAKAAMA_31024[path], rel=1e-6)
    assert typed["/31024/11/3"] != -28.99
    assert _only("wakaama-client-udp-queue-v10", "/31024/10/1", ContentFormat.LWM2M_TLV) == [
        [ResourceValue("/31024/10/1", b"\x14")]
    ]
    observed = _only("wakaama-client-udp-queue-v10", "/3/0/9", ContentFormat.LWM2M_TLV)
    assert [tlv_int(values[0].value) for values in observed] == [100, 77]  # type: ignore[arg-type]


def test_anjay_tlv_device_object() -> None:
    (values,) = _only("anjay-client-udp", "/3/0", ContentFormat.LWM2M_TLV)
    raw = {v.path: v.value for v in values}
    assert [v.path for v in values] == [
        *("/3/0/0", "/3/0/1", "/3/0/2", "/3/0/3", "/3/0/6/0", "/3/0/7/0", "/3/0/8/0"),
        *("/3/0/9", "/3/0/10", "/3/0/11/0", "/3/0/13", "/3/0/14", "/3/0/15", "/3/0/16"),
        *("/3/0/17", "/3/0/18", "/3/0/19", "/3/0/20", "/3/0/21", "/3/0/22/0"),
    ]
    assert raw["/3/0/0"] == b"anjay"
    assert raw["/3/0/1"] == b"demo-client"
    assert raw["/3/0/3"] == b"3.14.0"
    assert raw["/3/0/15"] == b"Europe/Warsaw"
    assert raw["/3/0/16"] == b"UQ"
    assert raw["/3/0/17"] == b""  # empty strings are zero-length TLVs
    assert tlv_int(raw["/3/0/7/0"]) == 32179  # type: ignore[arg-type]
    assert tlv_int(raw["/3/0/13"]) == 1795664990  # type: ignore[arg-type]
    # ExtDevInfo: an object link to 33606/0, which the registration lists
    assert tlv_objlnk(raw["/3/0/22/0"]) == ObjLink(33606, 0)  # type: ignore[arg-type]


def test_anjay_observed_time_matches_its_text_answer() -> None:
    observed = _only("anjay-client-udp", "/3/0/13", ContentFormat.LWM2M_TLV)
    times = [tlv_int(values[0].value) for values in observed]  # type: ignore[arg-type]
    assert times == [1795664999 + i for i in range(4)]
    (text,) = _only("anjay-client-udp", "/3/0/13", ContentFormat.TEXT)
    assert text == [ResourceValue("/3/0/13", "1795665002")]


def test_anjay_queue_single_resources() -> None:
    got = [
        (path, decode(cf, payload, path))
        for path, cf, payload in _content_payloads("anjay-client-udp-queue")
    ]
    assert got == [
        ("/3/0/0", [ResourceValue("/3/0/0", b"anjay")]),
        ("/3/0/2", [ResourceValue("/3/0/2", b"anjay_queue_v11")]),
        ("/3/0/1", [ResourceValue("/3/0/1", b"demo-client")]),
    ]
