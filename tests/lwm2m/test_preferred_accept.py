"""Issue 13 items 4 and 8 on the registration side: the Accept a read asks for when the
application names none (`Registration.preferred_accept`), from the formats a device announces on
its root link and its LwM2M version, and the 4.12 that makes a 1.2 client register as 1.1. With
the Register bytes Wakaama and Anjay sent (tests/vectors)."""

from __future__ import annotations

import json
from pathlib import Path as FilePath

import pytest

from dm_actor.coap.framing_tcp import StreamDecoder
from dm_actor.coap.message import Message, decode, path_options, query_options, sort_options
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.lwm2m.content import CODECS
from dm_actor.lwm2m.link_format import parse_links, registered_objects, serialise_links
from dm_actor.lwm2m.path import Path, parse
from dm_actor.lwm2m.registration import (
    PREFERRED_FORMATS,
    RegisterRequest,
    Registration,
    RegistrationError,
    UpdateRequest,
    classify,
    error,
    parse_register,
    parse_update,
)

VECTORS = FilePath(__file__).resolve().parent.parent / "vectors"
TLV = ContentFormat.LWM2M_TLV
SENML_JSON = ContentFormat.SENML_JSON
SENML_CBOR = ContentFormat.SENML_CBOR
_ACCEPT = OptionNumber.ACCEPT.value
_CF = OptionNumber.CONTENT_FORMAT.value
_LINK_FORMAT = ContentFormat.LINK_FORMAT.value
PATHS = [parse(p) for p in ("/3", "/3/0", "/3/0/0", "/3/0/7/0", "/31024/10/1")]


def datagrams(stem: str) -> list[Message]:
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()
    return [decode(bytes.fromhex(json.loads(line)["hex"])) for line in lines[1:]]


def registration(msg: Message) -> Registration:
    req = parse_register(msg)
    assert isinstance(req, RegisterRequest), req
    return Registration.from_request(req, "0", 0.0)


def first_register(stem: str) -> Message:
    return next(m for m in datagrams(stem) if classify(m) == "register")


def register(query: str, payload: bytes) -> Registration:
    options = path_options("rd") + query_options(query) + ((_CF, bytes([_LINK_FORMAT])),)
    return registration(
        Message(MessageType.CON, Code.POST, 1, b"t", sort_options(options), payload)
    )


def _uint(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


# -- the captures --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stem", "announced", "accept"),
    [
        ("wakaama-client-udp", (110,), SENML_JSON),  # `</>;rt="oma.lwm2m";ct=110`, LwM2M 1.1
        ("wakaama-client-udp-queue-full", (112,), SENML_CBOR),
    ],
)
def test_wakaama_gets_the_format_it_announced_for_every_path(
    stem: str, announced: tuple[int, ...], accept: int
) -> None:
    reg = registration(first_register(stem))
    assert reg.objects.content_formats == announced
    assert [reg.preferred_accept(p) for p in PATHS] == [accept] * len(PATHS)


@pytest.mark.parametrize("stem", ["wakaama-client-udp", "wakaama-client-udp-queue-full"])
def test_wakaama_answered_every_read_in_the_format_we_would_ask(stem: str) -> None:
    """Each GET of the capture (Discover aside) asked for the format we choose, and Wakaama
    answered 2.05 in it: the choice is one the device serves."""
    messages = datagrams(stem)
    reg = registration(next(m for m in messages if classify(m) == "register"))
    answers = {(m.token, m.mid): m for m in messages if m.mtype == MessageType.ACK}
    checked = 0
    for msg in messages:
        accept = dict(msg.options).get(_ACCEPT)
        if msg.code != Code.GET or accept is None or _uint(accept) == _LINK_FORMAT:
            continue
        assert reg.preferred_accept(parse("/".join(msg.uri_path))) == _uint(accept)
        answer = answers[(msg.token, msg.mid)]
        assert answer.code == Code.CONTENT
        assert answer.content_format == _uint(accept)
        checked += 1
    assert checked >= 4


def test_wakaama_1_0_gets_tlv_for_objects_and_instances_and_no_accept_for_resources() -> None:
    reg = registration(first_register("wakaama-client-udp-queue-v10"))
    assert (reg.lwm2m_version, reg.objects.content_formats) == ("1.0", ())
    assert [reg.preferred_accept(p) for p in PATHS] == [TLV, TLV, None, None, None]


def test_anjay_1_2_register_gets_4_12_and_its_1_1_register_is_created() -> None:
    registers = [m for m in datagrams("anjay-client-udp") if classify(m) == "register"]
    first, retry = registers[:2]
    assert "lwm2m=1.2" in first.uri_query and "lwm2m=1.1" in retry.uri_query
    refused = parse_register(first)
    assert isinstance(refused, RegistrationError)
    assert error(refused) == (Code.PRECONDITION_FAILED, ())
    assert "1.2" in refused.reason
    reg = registration(retry)
    assert reg.lwm2m_version == "1.1"
    # Anjay announces no format: it is left to choose (it picks SenML CBOR, SenML JSON or TLV)
    assert reg.objects.content_formats == ()
    assert [reg.preferred_accept(p) for p in PATHS] == [None] * len(PATHS)


def test_anjay_tcp_1_2_register_gets_4_12() -> None:
    lines = (VECTORS / "anjay-client-tcp.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    client_port = records[1]["src_port"]  # the client speaks second, after the server's CSM
    decoder = StreamDecoder()
    for rec in records:
        if rec["src_port"] == client_port:
            decoder.receive_data(bytes.fromhex(rec["hex"]))
    messages = []
    while (msg := decoder.next_message()) is not None:
        messages.append(msg)
    registers = [m for m in messages if classify(m) == "register"]
    assert registers  # (the capture's server, a libcoap RD, took 1.2)
    for msg in registers:
        refused = parse_register(msg)
        assert isinstance(refused, RegistrationError), refused
        assert refused.code == Code.PRECONDITION_FAILED


# -- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "payload", "expected"),
    [
        # no lwm2m= is 1.0
        ("ep=a", b"</3/0>", [TLV, TLV, None, None, None]),
        ("ep=a&lwm2m=1.0", b'</>;rt="oma.lwm2m",</3/0>', [TLV, TLV, None, None, None]),
        ("ep=a&lwm2m=1.1", b"</3/0>", [None] * 5),
        # a list (RFC 7252 7.2.1): the server's preference, not the list's order
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct="11542 110 112",</3/0>', [SENML_CBOR] * 5),
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct="60 110",</3/0>', [SENML_JSON] * 5),
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct="11542 11543",</3/0>', [TLV] * 5),
        # only single-value formats announced: they cannot answer a read of an instance
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct="0 42 60",</3/0>', [None] * 5),
        ("ep=a&lwm2m=1.0", b'</>;rt="oma.lwm2m";ct=60,</3/0>', [TLV, TLV, None, None, None]),
        # formats the server does not know are passed over
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct="65000 112",</3/0>', [SENML_CBOR] * 5),
        ("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct=65000,</3/0>', [None] * 5),
        # LwM2M 1.0's form, a plain root link without rt
        ("ep=a", b"</>;ct=11543,</1/0>,</3/0>", [ContentFormat.LWM2M_JSON] * 5),
        # the pre-standard numbers, when that is what a device says it has
        ("ep=a", b"</>;ct=1542,</3/0>", [ContentFormat.LWM2M_TLV_LEGACY] * 5),
        # an alternate path carries the formats too
        ("ep=a&lwm2m=1.1", b'</lwm2m>;rt="oma.lwm2m";ct=110,</lwm2m/3/0>', [SENML_JSON] * 5),
    ],
)
def test_preferred_accept(query: str, payload: bytes, expected: list[int | None]) -> None:
    reg = register(query, payload)
    assert [reg.preferred_accept(p) for p in PATHS] == expected


def test_preferred_formats_are_multi_value_formats_the_server_decodes() -> None:
    assert PREFERRED_FORMATS[:2] == (SENML_CBOR, SENML_JSON)
    assert set(PREFERRED_FORMATS) <= set(CODECS)
    single_value = {ContentFormat.TEXT, ContentFormat.OCTET_STREAM, ContentFormat.CBOR}
    assert single_value.isdisjoint(PREFERRED_FORMATS)


def test_an_update_with_new_links_changes_the_format_asked_for() -> None:
    reg = register("ep=a&lwm2m=1.1", b'</>;rt="oma.lwm2m";ct=110,</3/0>')
    payload = b'</>;rt="oma.lwm2m";ct=112,</3/0>'
    options = (*path_options("rd/0"), (_CF, bytes([_LINK_FORMAT])))
    update = parse_update(Message(MessageType.CON, Code.POST, 2, b"u", options, payload))
    assert isinstance(update, UpdateRequest)
    assert reg.apply_update(update, 1.0).preferred_accept(Path(3, 0)) == SENML_CBOR
    # an Update without links keeps them
    bare = parse_update(Message(MessageType.CON, Code.POST, 3, b"v", path_options("rd/0")))
    assert isinstance(bare, UpdateRequest)
    assert reg.apply_update(bare, 2.0).preferred_accept(Path(3, 0)) == SENML_JSON


def test_the_announced_formats_survive_the_store_round_trip() -> None:
    """The store keeps `objects.links()` as text (actors/persist.py): a `</>;ct=` without rt
    comes back as the same formats."""
    objects = registered_objects(parse_links(b"</>;ct=11543,</1/0>,</3/0>"))
    again = registered_objects(parse_links(serialise_links(objects.links())))
    assert again == objects
    assert again.content_formats == (ContentFormat.LWM2M_JSON,)


def test_registrations_with_the_same_links_share_one_value() -> None:
    """No per-device cost: the choice is made from the shared `RegisteredObjects`."""
    payload = b'</>;rt="oma.lwm2m";ct=110,</3/0>,</1/0>'
    a = register("ep=a&lwm2m=1.1", payload)
    b = register("ep=b&lwm2m=1.1", payload)
    assert a.objects is b.objects
    assert a.__slots__ == b.__slots__ == Registration.__slots__
    assert "preferred_accept" not in Registration.__slots__
