"""The registration interface: every Register, Update and De-register that real clients sent
(tests/vectors) is read correctly, each bad request gets its response code, and the
`Registration` value follows Updates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path as FilePath

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.framing_tcp import StreamDecoder
from dm_actor.coap.message import Message, decode, path_options, query_options, sort_options
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.device.transfer import Answer, Block1Pool, Incoming, intake
from dm_actor.lwm2m.link_format import parse_links
from dm_actor.lwm2m.path import Path, parse
from dm_actor.lwm2m.registration import (
    DeregisterRequest,
    RegisterRequest,
    Registration,
    RegistrationError,
    UpdateRequest,
    changed,
    classify,
    created,
    deleted,
    error,
    parse_deregister,
    parse_register,
    parse_update,
    update_interval,
)

VECTORS = FilePath(__file__).resolve().parent.parent / "vectors"
_CF = OptionNumber.CONTENT_FORMAT.value
_URI_PORT = OptionNumber.URI_PORT.value


class Captured:
    """One message of a capture, with when it was sent."""

    def __init__(self, t: float, msg: Message) -> None:
        self.t = t
        self.msg = msg


def capture(stem: str) -> list[Captured]:
    """Every message in tests/vectors/`stem`.jsonl, both directions, in capture order."""
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()
    tcp = json.loads(lines[0])["transport"] == "tcp"
    decoders: dict[tuple[int, int], StreamDecoder] = {}
    out: list[Captured] = []
    for line in lines[1:]:
        rec = json.loads(line)
        data = bytes.fromhex(rec["hex"])
        if not tcp:
            out.append(Captured(rec["t"], decode(data)))
            continue
        decoder = decoders.setdefault((rec["src_port"], rec["dst_port"]), StreamDecoder())
        decoder.receive_data(data)
        while (msg := decoder.next_message()) is not None:
            out.append(Captured(rec["t"], msg))
    return out


STEMS = sorted(p.stem for p in VECTORS.glob("*.jsonl"))


def requests(stem: str, kind: str) -> list[Captured]:
    return [c for c in capture(stem) if classify(c.msg) == kind]


# (endpoint, lifetime, lwm2m version, binding, queue mode, transports) of each Register, in order;
# a bare response code for a Register refused (LwM2M 1.2: 4.12, so that the client retries as 1.1);
# a Register sent in Block1 blocks is put back together first (`device.transfer.intake`, as the
# server does) and counts once
REFUSED_1_2 = Code.PRECONDITION_FAILED
EXPECTED_REGISTERS: dict[str, list[tuple[str, int, str, str, bool, str] | int]] = {
    "wakaama-client-udp": [("wk-trace-wakaama", 20, "1.1", "U", False, "U")],
    "wakaama-client-udp-queue-full": [("wk-trace-full_uq", 20, "1.1", "U", True, "U")],
    "wakaama-client-udp-queue-v10": [("wk-trace-v10_uq", 20, "1.0", "UQ", True, "U")],
    "anjay-client-udp": [REFUSED_1_2, ("anjay-anjay_udp", 20, "1.1", "U", False, "U")] * 2,
    "anjay-client-udp-queue": [("anjay-anjay_queue_v11", 300, "1.1", "U", True, "U")] * 2,
    "anjay-client-tcp": [REFUSED_1_2] * 3,  # (that capture's server took 1.2)
    "libcoap-client": [("x", 60, "1.0", "U", False, "U"), ("x", 60, "1.1", "U", False, "U")],
    "anjay-client-udp-block1-register": [("anjay-b1reg", 86400, "1.1", "U", False, "U")],
    "anjay-client-udp-block1-register-64": [("anjay-b1reg64", 300, "1.1", "U", False, "U")],
    "anjay-client-udp-block1-send": [("anjay-b1send", 300, "1.1", "U", False, "U")],
    "anjay-client-udp-block1-write-response": [("anjay-b1write", 300, "1.1", "U", False, "U")],
    "anjay-client-udp-send": [("anjay-send", 300, "1.1", "U", False, "U")],
    "wakaama-client-udp-send": [("wk-send", 300, "1.1", "U", False, "U")],
}


# (Updates, De-registers) in each capture
EXPECTED_UPDATES = {
    "wakaama-client-udp": (3, 1),
    "wakaama-client-udp-queue-full": (3, 1),
    "wakaama-client-udp-queue-v10": (3, 1),
    "anjay-client-udp": (2, 1),
    "anjay-client-udp-queue": (0, 1),
    "anjay-client-tcp": (2, 1),
    "libcoap-client": (0, 0),
    "anjay-client-udp-block1-register": (1, 1),
    "anjay-client-udp-block1-register-64": (1, 1),
    "anjay-client-udp-block1-send": (0, 1),
    "anjay-client-udp-block1-write-response": (0, 1),
    "anjay-client-udp-send": (0, 1),
    "wakaama-client-udp-send": (0, 1),
}


def test_expectations_cover_every_capture() -> None:
    assert sorted(EXPECTED_REGISTERS) == sorted(EXPECTED_UPDATES)
    assert set(STEMS) <= set(EXPECTED_REGISTERS)
    assert {"anjay-client-udp", "wakaama-client-udp", "wakaama-client-udp-queue-v10"} <= set(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_every_register_in_the_vectors(stem: str) -> None:
    registers = requests(stem, "register")
    got: list[tuple[str, int, str, str, bool, str] | int] = []
    incoming: Incoming | None = None
    pool = Block1Pool(1, 60.0)
    for c in registers:
        msg = c.msg
        if msg.option(OptionNumber.BLOCK1.value) is not None:  # put back together first
            incoming, whole = intake(
                incoming, "peer", msg, pool, szx=6, max_body=65536, retry_after=60, now=c.t
            )
            if isinstance(whole, Answer):
                assert whole.code == Code.CONTINUE
                continue
            msg = whole
        req = parse_register(msg)
        if isinstance(req, RegistrationError):
            got.append(req.code)
            continue
        got.append(
            (
                req.endpoint,
                req.lifetime,
                req.lwm2m_version,
                req.binding,
                req.queue_mode,
                req.transports,
            )
        )
        assert req.sms is None
        links = parse_links(msg.payload)
        root = [link for link in links if link.params.get("rt") == "oma.lwm2m"]
        assert len(req.objects.paths()) == len(links) - len(root)
        assert req.objects.contains(parse("/3/0"))
        assert req.objects.contains(parse("/1"))
        assert not req.objects.contains(parse("/3/1"))
    assert got == EXPECTED_REGISTERS[stem]


@pytest.mark.parametrize("stem", STEMS)
def test_every_update_and_deregister_in_the_vectors(stem: str) -> None:
    messages = capture(stem)
    registered_ids = {
        c.msg.location_path[1] for c in messages if c.msg.code == Code.CREATED
    }  # the ids the servers handed out
    updates = requests(stem, "update")
    for c in updates:
        update = parse_update(c.msg)
        assert update == UpdateRequest(reg_id=c.msg.uri_path[1]), update
    deregisters = [parse_deregister(c.msg) for c in requests(stem, "deregister")]
    assert all(isinstance(d, DeregisterRequest) for d in deregisters)
    seen = {u.msg.uri_path[1] for u in updates} | {
        d.reg_id for d in deregisters if isinstance(d, DeregisterRequest)
    }
    assert seen <= registered_ids
    assert (len(updates), len(deregisters)) == EXPECTED_UPDATES[stem]


@pytest.mark.parametrize("stem", STEMS)
def test_created_matches_what_the_servers_sent(stem: str) -> None:
    responses = [c.msg for c in capture(stem) if c.msg.code == Code.CREATED]
    assert responses
    for msg in responses:
        # (a 2.01 to a Register sent in blocks also echoes its last Block1: RFC 7959 2.3)
        options = tuple(o for o in msg.options if o[0] != OptionNumber.BLOCK1)
        assert created(msg.location_path[1]) == (msg.code, options)


@pytest.mark.parametrize("stem", ["wakaama-client-udp", "anjay-client-udp"])
def test_clients_update_at_update_interval(stem: str) -> None:
    times = [c.t for c in requests(stem, "update")]
    assert times[-1] - times[-2] == pytest.approx(update_interval(20), abs=0.1)


# -- hand-made requests ------------------------------------------------------------------------


def request(
    query: str = "ep=dev&lt=60&b=U",
    payload: bytes = b"</3/0>,</1/0>",
    *,
    path: str = "rd",
    code: int = Code.POST,
    content_format: int | None = ContentFormat.LINK_FORMAT,
) -> Message:
    options = path_options(path) + query_options(query)
    if content_format is not None:
        options += ((_CF, bytes([content_format >> 8, content_format & 0xFF]).lstrip(b"\0")),)
    return Message(MessageType.CON, code, 1, b"t", sort_options(options), payload)


def test_register_defaults() -> None:
    req = parse_register(request("ep=urn:imei:123"), default_lifetime=86400)
    assert isinstance(req, RegisterRequest), req
    assert (req.endpoint, req.lifetime, req.lwm2m_version, req.binding, req.sms) == (
        "urn:imei:123",
        86400,
        "1.0",
        "U",
        None,
    )
    assert req.queue_mode is False
    assert req.objects.paths() == [Path(1, 0), Path(3, 0)]
    other = parse_register(request("ep=a"), default_lifetime=7)
    assert isinstance(other, RegisterRequest)
    assert other.lifetime == 7


@pytest.mark.parametrize(
    ("query", "version", "binding", "queue", "transports"),
    [
        ("ep=a&b=UQ&lwm2m=1.0", "1.0", "UQ", True, "U"),
        ("ep=a&b=UQS", "1.0", "UQS", True, "US"),
        ("ep=a&b=SQ", "1.0", "SQ", True, "S"),
        ("ep=a&b=US", "1.0", "US", False, "US"),
        ("ep=a&b=S", "1.0", "S", False, "S"),
        ("ep=a&b=T", "1.0", "T", False, "T"),
        ("ep=a&b=TQ", "1.0", "TQ", True, "T"),
        ("ep=a&b=U&Q&lwm2m=1.1", "1.1", "U", True, "U"),
        ("ep=a&b=UT&lwm2m=1.1", "1.1", "UT", False, "UT"),
        ("ep=a&b=N&lwm2m=1.1&Q", "1.1", "N", True, "N"),
        ("ep=a&b=UQ&lwm2m=1.1", "1.1", "UQ", True, "U"),  # Q in b after 1.0: still understood
        ("ep=a&Q", "1.0", "U", True, "U"),
    ],
)
def test_register_bindings(
    query: str, version: str, binding: str, queue: bool, transports: str
) -> None:
    req = parse_register(request(query))
    assert isinstance(req, RegisterRequest), req
    assert (req.lwm2m_version, req.binding, req.queue_mode, req.transports) == (
        version,
        binding,
        queue,
        transports,
    )


def test_register_endpoint_type() -> None:
    """Pelion clients send their endpoint type as `et`; pre-subscriptions match on it."""
    req = parse_register(request("ep=dev&et=Light"))
    assert isinstance(req, RegisterRequest), req
    assert req.endpoint_type == "Light"
    for query in ("ep=dev", "ep=dev&et=", "ep=dev&et"):
        req = parse_register(request(query))
        assert isinstance(req, RegisterRequest), req
        assert req.endpoint_type is None


def test_register_extra_parameters_and_options_are_ignored() -> None:
    msg = request("ep=dev&lt=300&aid=1&iep=x&est=y&sms=%2B4912345&foo").with_options(
        (_URI_PORT, b"\x16\x44")
    )
    req = parse_register(msg)
    assert isinstance(req, RegisterRequest), req
    assert (req.endpoint, req.lifetime, req.sms) == ("dev", 300, "%2B4912345")


def test_register_without_content_format_is_read_as_link_format() -> None:
    req = parse_register(request(content_format=None))
    assert isinstance(req, RegisterRequest)
    assert req.objects.contains(Path(3, 0))


BAD_REQUEST = Code.BAD_REQUEST
PRECONDITION_FAILED = Code.PRECONDITION_FAILED


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("lt=60", BAD_REQUEST),  # 4.03 is for an endpoint the server refuses, not a missing one
        ("ep=&lt=60", BAD_REQUEST),
        ("ep&lt=60", BAD_REQUEST),
        ("ep=a\x00b", BAD_REQUEST),
        ("ep=a/b", BAD_REQUEST),
        ("ep=..", BAD_REQUEST),
        ("ep=.", BAD_REQUEST),
        ("ep=a\nb", BAD_REQUEST),
        ("ep=a\tb", BAD_REQUEST),
        ("ep=a\x7fb", BAD_REQUEST),
        ("ep=a\x85b", BAD_REQUEST),  # a C1 control (NEL)
        ("ep=a%41", BAD_REQUEST),  # Uri-Query is not percent-encoded: % has no business here
        ("ep=a b", BAD_REQUEST),
        ("ep=a?b", BAD_REQUEST),
        ("ep=a#b", BAD_REQUEST),
        ("ep=a\\b", BAD_REQUEST),
        ("ep=" + "x" * 256, BAD_REQUEST),
        ("ep=a&et=x/y", BAD_REQUEST),
        ("ep=a&lt=0", BAD_REQUEST),
        ("ep=a&lt=-1", BAD_REQUEST),
        ("ep=a&lt=+5", BAD_REQUEST),
        ("ep=a&lt=1.5", BAD_REQUEST),
        ("ep=a&lt=abc", BAD_REQUEST),
        ("ep=a&lt=", BAD_REQUEST),
        ("ep=a&lt", BAD_REQUEST),
        ("ep=a&lt=4294967296", BAD_REQUEST),
        ("ep=a&lt=99999999999999999999", BAD_REQUEST),
        ("ep=a&lt=٣", BAD_REQUEST),
        ("ep=a&lwm2m=1.2", PRECONDITION_FAILED),  # not implemented: the client falls back
        ("ep=a&b=T&lwm2m=1.2", PRECONDITION_FAILED),
        ("ep=a&lwm2m=1.3", PRECONDITION_FAILED),
        ("ep=a&lwm2m=2.0", PRECONDITION_FAILED),
        ("ep=a&lwm2m=1", PRECONDITION_FAILED),
        ("ep=a&lwm2m=", PRECONDITION_FAILED),
        ("ep=a&lwm2m", PRECONDITION_FAILED),
        ("ep=a&b=X", BAD_REQUEST),
        ("ep=a&b=u", BAD_REQUEST),
        ("ep=a&b=UU", BAD_REQUEST),
        ("ep=a&b=UQQ", BAD_REQUEST),
        ("ep=a&b=Q", BAD_REQUEST),
        ("ep=a&b=", BAD_REQUEST),
        ("ep=a&b", BAD_REQUEST),
        ("ep=a&b=N", BAD_REQUEST),  # N (non-IP) is LwM2M 1.1
        ("ep=a&b=N&lwm2m=1.0", BAD_REQUEST),
        ("ep=a&b=U Q", BAD_REQUEST),
        ("ep=a&Q=1", BAD_REQUEST),
        ("ep=a&Q=", BAD_REQUEST),
        ("ep=a&sms", BAD_REQUEST),
        ("ep=a&ep=b", BAD_REQUEST),
        ("ep=a&lt=60&lt=60", BAD_REQUEST),
        ("ep=a&Q&Q", BAD_REQUEST),
    ],
)
def test_register_errors(query: str, code: int) -> None:
    result = parse_register(request(query))
    assert isinstance(result, RegistrationError), result
    assert result.code == code
    assert error(result) == (code, ())


def test_register_checks_endpoint_before_version_before_parameters() -> None:
    assert parse_register(request("lwm2m=9.9&lt=0")) == RegistrationError(
        BAD_REQUEST, "missing endpoint name (ep)"
    )
    result = parse_register(request("ep=a&lwm2m=9.9&lt=0"))
    assert isinstance(result, RegistrationError)
    assert result.code == PRECONDITION_FAILED


@pytest.mark.parametrize(
    ("payload", "content_format", "code"),
    [
        (b"", ContentFormat.LINK_FORMAT, BAD_REQUEST),
        (b"not links", ContentFormat.LINK_FORMAT, BAD_REQUEST),
        (b"</3/0", ContentFormat.LINK_FORMAT, BAD_REQUEST),
        (b"</3/0>;x=\xff", ContentFormat.LINK_FORMAT, BAD_REQUEST),
        (b'</>;rt="oma.lwm2m";ct=x,</3/0>', ContentFormat.LINK_FORMAT, BAD_REQUEST),
        (b'["/3/0"]', ContentFormat.JSON, Code.UNSUPPORTED_CONTENT_FORMAT),
    ],
)
def test_register_payload_errors(payload: bytes, content_format: int, code: int) -> None:
    result = parse_register(request(payload=payload, content_format=content_format))
    assert isinstance(result, RegistrationError), result
    assert result.code == code


def test_register_wrong_method_and_bad_utf8() -> None:
    result = parse_register(request(code=Code.PUT))
    assert isinstance(result, RegistrationError)
    assert result.code == Code.METHOD_NOT_ALLOWED
    bad_query = Message(MessageType.CON, Code.POST, 1, b"", ((11, b"rd"), (15, b"ep=\xff")), b"<a>")
    result = parse_register(bad_query)
    assert isinstance(result, RegistrationError)
    assert result.code == BAD_REQUEST


def test_update_with_everything() -> None:
    msg = request("lt=120&b=UQ&sms=123&Q", b"</3/0>,</5/0>", path="rd/5a")
    update = parse_update(msg)
    assert isinstance(update, UpdateRequest), update
    assert (update.reg_id, update.lifetime, update.binding, update.queue_mode, update.sms) == (
        "5a",
        120,
        "UQ",
        True,
        "123",
    )
    assert update.objects is not None
    assert update.objects.paths() == [Path(3, 0), Path(5, 0)]


def test_update_queue_mode_statement() -> None:
    def queue_mode(query: str) -> bool | None:
        update = parse_update(request(query, b"", path="rd/1"))
        assert isinstance(update, UpdateRequest)
        return update.queue_mode

    assert queue_mode("") is None
    assert queue_mode("lt=5") is None
    assert queue_mode("b=U") is False
    assert queue_mode("b=UQ") is True
    assert queue_mode("Q") is True
    assert queue_mode("b=T&Q") is True


@pytest.mark.parametrize(
    ("query", "payload", "path", "code", "expected"),
    [
        ("lt=0", b"", "rd/1", Code.POST, BAD_REQUEST),
        ("b=X", b"", "rd/1", Code.POST, BAD_REQUEST),
        ("Q=yes", b"", "rd/1", Code.POST, BAD_REQUEST),
        ("", b"<<", "rd/1", Code.POST, BAD_REQUEST),
        ("", b"", "rd", Code.POST, Code.NOT_FOUND),
        ("", b"", "rd/1/2", Code.POST, Code.NOT_FOUND),
        ("", b"", "bs/1", Code.POST, Code.NOT_FOUND),
        ("", b"", "rd/1", Code.PUT, Code.METHOD_NOT_ALLOWED),
    ],
)
def test_update_errors(query: str, payload: bytes, path: str, code: int, expected: int) -> None:
    result = parse_update(request(query, payload, path=path, code=code))
    assert isinstance(result, RegistrationError), result
    assert result.code == expected


def test_deregister() -> None:
    assert parse_deregister(request("", b"", path="rd/0", code=Code.DELETE)) == DeregisterRequest(
        "0"
    )
    for path, code, expected in [
        ("rd", Code.DELETE, Code.NOT_FOUND),
        ("rd/0", Code.POST, Code.METHOD_NOT_ALLOWED),
    ]:
        result = parse_deregister(request("", b"", path=path, code=code))
        assert isinstance(result, RegistrationError)
        assert result.code == expected


@pytest.mark.parametrize(
    ("code", "path", "kind"),
    [
        (Code.POST, "rd", "register"),
        (Code.POST, "rd/0", "update"),
        (Code.DELETE, "rd/0", "deregister"),
        (Code.POST, "bs", "bootstrap"),
        (Code.GET, "bs", "bootstrap"),
        (Code.POST, "dp", "send"),
        (Code.GET, "rd", None),
        (Code.DELETE, "rd", None),
        (Code.PUT, "rd/0", None),
        (Code.POST, "rd/0/1", None),
        (Code.POST, "rdx", None),
        (Code.POST, "3/0", None),
        (Code.POST, "", None),
        (Code.CHANGED, "rd", None),  # a response is never a registration request
        (Code.EMPTY, "rd", None),
    ],
)
def test_classify(code: int, path: str, kind: str | None) -> None:
    assert classify(request("", b"", path=path, code=code)) == kind


def test_classify_non_utf8_path() -> None:
    assert classify(Message(MessageType.CON, Code.POST, 1, b"", ((11, b"\xff"),))) is None


# -- the Registration value ------------------------------------------------------------------


def registration(query: str, now: float = 1000.0) -> Registration:
    req = parse_register(request(query))
    assert isinstance(req, RegisterRequest), req
    return Registration.from_request(req, "r1", now)


def test_registration_from_request_and_expiry() -> None:
    reg = registration("ep=dev&lt=60&b=UQ&sms=42")
    assert (reg.endpoint, reg.reg_id, reg.lifetime, reg.lwm2m_version) == ("dev", "r1", 60, "1.0")
    assert (reg.binding, reg.queue_mode, reg.transports, reg.sms) == ("UQ", True, "U", "42")
    assert reg.registered_at == reg.updated_at == 1000.0
    assert reg.expires_at() == 1060.0
    assert reg.expires_at(grace=15) == 1075.0
    with pytest.raises(AttributeError):
        reg.lifetime = 5  # type: ignore[misc]


def test_apply_update() -> None:
    reg = registration("ep=dev&lt=60&b=U")
    same = reg.apply_update(UpdateRequest("r1"), now=1030.0)
    assert same.updated_at == 1030.0
    assert same.registered_at == 1000.0
    assert same.expires_at() == 1090.0
    assert same == dataclasses.replace(reg, updated_at=1030.0)

    new_objects = parse_update(request("lt=300&sms=7", b"</3/0>,</9/0>", path="rd/r1"))
    assert isinstance(new_objects, UpdateRequest)
    updated = reg.apply_update(new_objects, now=1040.0)
    assert (updated.lifetime, updated.sms) == (300, "7")
    assert updated.objects.contains(Path(9, 0))
    assert not updated.objects.contains(Path(1, 0))
    assert updated.expires_at() == 1340.0


@pytest.mark.parametrize(
    ("register", "update", "queue_mode", "binding"),
    [
        ("ep=a&b=UQ", "b=U", False, "U"),  # 1.0: Q is part of the binding
        ("ep=a&b=U", "b=UQ", True, "UQ"),
        ("ep=a&b=UQ", "lt=5", True, "UQ"),
        ("ep=a&b=U&Q&lwm2m=1.1", "b=U", True, "U"),  # 1.1: Q is a Register parameter
        ("ep=a&b=U&lwm2m=1.1", "Q", True, "U"),
        ("ep=a&b=U&lwm2m=1.1", "b=T", False, "T"),
    ],
)
def test_apply_update_queue_mode(
    register: str, update: str, queue_mode: bool, binding: str
) -> None:
    parsed = parse_update(request(update, b"", path="rd/r1"))
    assert isinstance(parsed, UpdateRequest)
    reg = registration(register).apply_update(parsed, now=2000.0)
    assert (reg.queue_mode, reg.binding) == (queue_mode, binding)


def test_response_builders() -> None:
    loc = OptionNumber.LOCATION_PATH.value
    assert created("0") == (Code.CREATED, ((loc, b"rd"), (loc, b"0")))
    assert created("f836-994") == (Code.CREATED, ((loc, b"rd"), (loc, b"f836-994")))
    assert changed() == (Code.CHANGED, ())
    assert deleted() == (Code.DELETED, ())


@pytest.mark.parametrize(
    ("lifetime", "interval"),
    [(20, 10.0), (60, 30.0), (93, 46.5), (94, 1.0), (300, 207.0), (86400, 86307.0), (1, 0.5)],
)
def test_update_interval(lifetime: int, interval: float) -> None:
    assert update_interval(lifetime) == interval


def test_update_interval_with_other_transmission_parameters() -> None:
    assert update_interval(300, max_transmit_wait=45.0) == 255.0
    assert update_interval(60, max_transmit_wait=45.0) == 15.0


# -- fuzzing -----------------------------------------------------------------------------------

_query_items = st.lists(
    st.sampled_from(["ep", "lt", "lwm2m", "b", "sms", "Q", "aid", "x"]).flatmap(
        lambda name: st.one_of(
            st.just(name),
            st.text(max_size=6).map(lambda v: f"{name}={v}"),
            st.sampled_from(["1", "20", "1.1", "U", "UQ", "T", "dev"]).map(lambda v: f"{name}={v}"),
        )
    ),
    max_size=7,
)
_options = st.lists(
    st.tuples(st.sampled_from([7, 11, 12, 15, 17]), st.binary(max_size=6)), max_size=6
).map(lambda opts: tuple(sorted(opts, key=lambda o: o[0])))


@settings(max_examples=300)
@given(
    _query_items,
    st.binary(max_size=30) | st.sampled_from([b"</3/0>", b'</>;rt="oma.lwm2m";ct=1,</1/0>']),
    st.sampled_from(["rd", "rd/0", "rd/0/1", "bs", ""]),
    st.sampled_from([Code.POST, Code.DELETE, Code.GET, Code.CONTENT]),
    _options,
)
def test_parsers_never_raise(
    query: list[str], payload: bytes, path: str, code: int, extra: tuple[tuple[int, bytes], ...]
) -> None:
    options = path_options(path) + tuple((15, q.encode()) for q in query) + extra
    msg = Message(
        MessageType.CON, code, 1, b"", tuple(sorted(options, key=lambda o: o[0])), payload
    )
    kind = classify(msg)
    for parser in (parse_register, parse_update, parse_deregister):
        result = parser(msg)
        assert isinstance(
            result, RegisterRequest | UpdateRequest | DeregisterRequest | RegistrationError
        )
        if isinstance(result, RegistrationError):
            assert 128 <= result.code < 160
    if kind == "register" and isinstance(reg := parse_register(msg), RegisterRequest):
        assert reg.endpoint and reg.lifetime > 0


@pytest.mark.parametrize(
    "name", ["urn:imei:490154203237518", "dev-1.2_x", "é", "x" * 255, "a..b", "...", "urn:uuid:a"]
)
def test_register_accepts_real_endpoint_names(name: str) -> None:
    req = parse_register(request(f"ep={name}"))
    assert isinstance(req, RegisterRequest), req
    assert req.endpoint == name


def test_a_lifetime_over_the_maximum_is_refused() -> None:
    """Hostile-input issue, item 6: lt=4294967295 (136 years) was accepted."""
    assert isinstance(parse_register(request("ep=a&lt=2592000"), max_lifetime=2592000),
                      RegisterRequest)  # fmt: skip
    result = parse_register(request("ep=a&lt=4294967295"), max_lifetime=2592000)
    assert result == RegistrationError(
        BAD_REQUEST, "lifetime lt=4294967295 is over the server's maximum 2592000"
    )
    update = parse_update(request("lt=2592001", b"", path="rd/1"), max_lifetime=2592000)
    assert isinstance(update, RegistrationError)
    assert update.code == BAD_REQUEST


def test_an_object_list_over_the_maximum_is_refused_4_13() -> None:
    """An attacker's finding: a 60 KB Register of 6,000 instances cost the server 2.7 MB."""
    many = b",".join(b"</3303/%d>" % i for i in range(513))
    result = parse_register(request("ep=a", many), max_links=512)
    assert result == RegistrationError(
        Code.REQUEST_ENTITY_TOO_LARGE, "513 object links: the server takes at most 512"
    )
    fits = parse_register(request("ep=a", many.rpartition(b",")[0]), max_links=512)
    assert isinstance(fits, RegisterRequest)
    assert len(fits.objects.paths()) == 512
    update = parse_update(request("", many, path="rd/1"), max_links=512)
    assert isinstance(update, RegistrationError)
    assert update.code == Code.REQUEST_ENTITY_TOO_LARGE


def test_long_object_lists_are_not_kept_for_sharing() -> None:
    """Only short lists (a fleet's few kinds) are cached: hostile long ones would fill the
    caches with megabytes each."""
    from dm_actor.lwm2m import link_format

    before = len(link_format._ENTRIES)
    for n in range(20):
        long_list = b",".join(b"</%d/%d>" % (3300 + n, i) for i in range(300))
        req = parse_register(request("ep=a", long_list))
        assert isinstance(req, RegisterRequest)
        assert len(req.objects.paths()) == 300
    assert len(link_format._ENTRIES) == before


def test_a_register_in_blocks_is_refused_until_block1_is_reassembled() -> None:
    """An attacker's finding (and Anjay with --outbuf-size 256): a Register sent with Block1
    was registered with its first block's links only. Until Block1 requests are put back
    together (the device-interop issue), it gets 4.02, RFC 7959's answer of a server
    without Block1."""
    first = request("ep=a", b"</1/0>,</3/0>,</33")
    block1 = (OptionNumber.BLOCK1.value, bytes([0x08]))  # NUM 0, M=1, SZX 0 (16 bytes)
    msg = first._replace(options=sort_options((*first.options, block1)))
    result = parse_register(msg)
    assert isinstance(result, RegistrationError)
    assert result.code == Code.BAD_OPTION
