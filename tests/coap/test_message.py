"""Unit tests of the RFC 7252 datagram codec: edge cases, error replies, accessors, round trips."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings, strategies as st

from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import (
    Message,
    Option,
    check_options,
    decode,
    empty_ack,
    encode,
    encode_options,
    path_options,
    query_options,
    reply_for,
    reset_for,
    sort_options,
    uint_bytes,
)
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST


def _header(mtype: int, code: int, mid: int, tkl: int = 0) -> bytes:
    return bytes((0x40 | (mtype << 4) | tkl, code, mid >> 8, mid & 0xFF))


def _decode_error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(data)
    return info.value


# -- extended option delta and length -------------------------------------------------------

# (value, nibble, extension bytes) at every boundary of RFC 7252 3.1's three forms
BOUNDARIES = [
    (0, 0, b""),
    (12, 12, b""),
    (13, 13, b"\x00"),
    (268, 13, b"\xff"),
    (269, 14, b"\x00\x00"),
    (65804, 14, b"\xff\xff"),
]


@pytest.mark.parametrize(("value", "nibble", "ext"), BOUNDARIES)
def test_option_delta_boundaries(value: int, nibble: int, ext: bytes) -> None:
    msg = Message(CON, Code.GET, 0x1234, b"", ((value, b"x"),))
    wire = encode(msg)
    assert wire == _header(CON, Code.GET, 0x1234) + bytes(((nibble << 4) | 1,)) + ext + b"x"
    assert decode(wire) == msg


@pytest.mark.parametrize(("value", "nibble", "ext"), BOUNDARIES)
def test_option_length_boundaries(value: int, nibble: int, ext: bytes) -> None:
    body = bytes(i & 0xFF for i in range(value))
    msg = Message(ACK, Code.CONTENT, 7, b"\xaa", ((60, body),))
    wire = encode(msg)
    head = _header(ACK, Code.CONTENT, 7, 1) + b"\xaa"
    # Size1 (60) is delta 60 from 0: the one-byte extended delta 60 - 13 = 47
    assert wire == head + bytes(((13 << 4) | nibble, 47)) + ext + body
    assert decode(wire) == msg


def test_delta_and_length_both_extended_in_one_option() -> None:
    opts = ((269, b"v" * 13), (269 + 65804, b"w" * 269))
    msg = Message(NON, Code.POST, 1, b"", opts, b"p")
    wire = encode(msg)
    assert wire[4:7] == bytes((0xED, 0x00, 0x00))  # delta 269 (14), length 13 (13, ext 0)
    assert decode(wire) == msg


def test_largest_encodable_delta_and_length() -> None:
    msg = Message(CON, Code.PUT, 9, b"", ((65804, b"\x01" * 65804),))
    wire = encode(msg)
    assert wire[4:9] == b"\xee\xff\xff\xff\xff"
    assert decode(wire) == msg


@pytest.mark.parametrize("options", [((65805, b""),), ((1, b"\x00" * 65805),)])
def test_too_large_delta_or_length_is_refused(options: tuple[Option, ...]) -> None:
    with pytest.raises(ValueError, match="too large"):
        encode(Message(CON, Code.GET, 1, b"", options))


def test_unsorted_options_are_refused() -> None:
    with pytest.raises(ValueError, match="sorted"):
        encode(Message(CON, Code.GET, 1, b"", ((11, b"a"), (3, b"h"))))


def test_repeated_options_keep_their_order() -> None:
    opts = ((11, b"b"), (11, b""), (11, b"a"))
    wire = encode(Message(CON, Code.GET, 1, b"", opts))
    assert wire[4:] == b"\xb1b\x00\x01a"
    assert decode(wire).options == opts


# -- token ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tkl", range(9))
def test_token_lengths_0_to_8(tkl: int) -> None:
    token = bytes(range(0xF0, 0xF0 + tkl))
    msg = Message(NON, Code.GET, 0xBEEF, token, ((11, b"rd"),))
    wire = encode(msg)
    assert wire[0] == 0x50 | tkl
    assert wire[4 : 4 + tkl] == token
    assert decode(wire) == msg


def test_token_of_9_bytes_is_refused_by_encode() -> None:
    with pytest.raises(ValueError, match="token"):
        encode(Message(CON, Code.GET, 1, bytes(9)))


@pytest.mark.parametrize("mid", [-1, 0x10000])
def test_message_id_out_of_range_is_refused_by_encode(mid: int) -> None:
    with pytest.raises(ValueError, match="message ID"):
        encode(Message(CON, Code.GET, mid))


@pytest.mark.parametrize("tkl", range(9, 16))
@pytest.mark.parametrize(
    ("mtype", "reply"),
    [(CON, Reply.RESET), (NON, Reply.IGNORE), (ACK, Reply.IGNORE), (RST, Reply.IGNORE)],
)
def test_reserved_token_lengths(tkl: int, mtype: int, reply: Reply) -> None:
    err = _decode_error(_header(mtype, Code.GET, 0x0102, tkl) + bytes(16))
    assert err.reply is reply
    assert (err.mtype, err.mid, err.token) == (mtype, 0x0102, None)


def test_token_running_past_the_end() -> None:
    err = _decode_error(_header(CON, Code.GET, 5, 4) + b"\x01\x02")
    assert err.reply is Reply.RESET
    assert err.mid == 5


# -- format errors --------------------------------------------------------------------------


@pytest.mark.parametrize(("mtype", "reply"), [(CON, Reply.RESET), (NON, Reply.IGNORE)])
def test_payload_marker_without_payload(mtype: int, reply: Reply) -> None:
    err = _decode_error(_header(mtype, Code.POST, 3, 1) + b"\x07\xb2rd\xff")
    assert err.reply is reply
    assert err.token == b"\x07"
    assert "payload marker" in str(err)


@pytest.mark.parametrize(
    "option_bytes",
    [
        pytest.param(b"\xf0", id="delta15"),
        pytest.param(b"\xf3abc", id="delta15-len3"),
        pytest.param(b"\x0f", id="len15"),
        pytest.param(b"\xbf", id="delta11-len15"),
        pytest.param(b"\xdf\x00", id="delta13-len15"),
    ],
)
def test_reserved_nibble_15(option_bytes: bytes) -> None:
    err = _decode_error(_header(CON, Code.GET, 3) + option_bytes + b"\x00" * 20)
    assert err.reply is Reply.RESET
    assert "reserved option" in str(err)


@pytest.mark.parametrize(
    "option_bytes",
    [
        pytest.param(b"\xd0", id="delta13-no-ext"),
        pytest.param(b"\xe0\x01", id="delta14-half-ext"),
        pytest.param(b"\x0d", id="len13-no-ext"),
        pytest.param(b"\x0e\x00", id="len14-half-ext"),
        pytest.param(b"\x03ab", id="value-short"),
        pytest.param(b"\x0d\x00" + b"x" * 12, id="ext-value-short"),
    ],
)
def test_truncated_options(option_bytes: bytes) -> None:
    err = _decode_error(_header(NON, Code.GET, 3) + option_bytes)
    assert err.reply is Reply.IGNORE
    assert err.mid == 3


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        pytest.param(_header(CON, 0, 9, 1) + b"\x01", Reply.RESET, id="CON-with-token"),
        pytest.param(_header(CON, 0, 9) + b"\x00", Reply.RESET, id="CON-trailing"),
        pytest.param(_header(CON, 0, 9) + b"\xff\x01", Reply.RESET, id="CON-payload"),
        pytest.param(_header(ACK, 0, 9) + b"\x00", Reply.IGNORE, id="ACK-trailing"),
        pytest.param(_header(RST, 0, 9, 2) + b"\x01\x02", Reply.IGNORE, id="RST-with-token"),
    ],
)
def test_empty_message_with_bytes_after_header(data: bytes, reply: Reply) -> None:
    err = _decode_error(data)
    assert err.reply is reply
    assert err.mid == 9


@pytest.mark.parametrize("mtype", [CON, NON, ACK, RST])
def test_empty_message(mtype: int) -> None:
    wire = _header(mtype, 0, 0xABCD)
    assert decode(wire) == Message(mtype, 0, 0xABCD)
    assert encode(decode(wire)) == wire


@pytest.mark.parametrize("cls", [1, 6, 7])
@pytest.mark.parametrize(("mtype", "reply"), [(CON, Reply.RESET), (NON, Reply.IGNORE)])
def test_reserved_code_classes(cls: int, mtype: int, reply: Reply) -> None:
    err = _decode_error(_header(mtype, (cls << 5) | 1, 4, 1) + b"\x42")
    assert err.reply is reply
    assert (err.mid, err.token) == (4, b"\x42")


@pytest.mark.parametrize("cls", [0, 2, 3, 4, 5])
def test_valid_code_classes(cls: int) -> None:
    code = (cls << 5) | 31
    assert decode(_header(CON, code, 4)).code == code


@pytest.mark.parametrize("version", [0, 2, 3])
def test_wrong_version_is_ignored(version: int) -> None:
    err = _decode_error(bytes(((version << 6) | 0x00, Code.GET, 0, 1)))
    assert err.reply is Reply.IGNORE
    assert err.mid is None
    assert reply_for(err) is None


@pytest.mark.parametrize("data", [b"", b"\x40", b"\x40\x01", b"\x40\x01\x00"])
def test_shorter_than_header_is_ignored(data: bytes) -> None:
    err = _decode_error(data)
    assert err.reply is Reply.IGNORE
    assert err.mid is None


def test_decoded_fields_are_bytes() -> None:
    wire = encode(Message(CON, Code.POST, 1, b"t", ((11, b"rd"),), b"payload"))
    msg = decode(wire)
    assert type(msg.token) is bytes
    assert type(msg.payload) is bytes
    assert all(type(v) is bytes for _, v in msg.options)


# -- check_options --------------------------------------------------------------------------

UNKNOWN_CRITICAL = 13  # odd, unassigned
UNKNOWN_ELECTIVE = 16  # even, unassigned


def _check_error(msg: Message) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        check_options(msg)
    return info.value


@pytest.mark.parametrize(
    ("mtype", "code", "reply"),
    [
        (CON, Code.GET, Reply.BAD_OPTION),
        (CON, Code.POST, Reply.BAD_OPTION),
        (CON, 31, Reply.BAD_OPTION),
        (CON, Code.CONTENT, Reply.RESET),
        (CON, Code.NOT_FOUND, Reply.RESET),
        (NON, Code.GET, Reply.IGNORE),
        (NON, Code.CONTENT, Reply.IGNORE),
        (ACK, Code.CONTENT, Reply.IGNORE),
    ],
)
def test_unknown_critical_option(mtype: int, code: int, reply: Reply) -> None:
    msg = Message(mtype, code, 77, b"tk", ((11, b"rd"), (UNKNOWN_CRITICAL, b"")))
    err = _check_error(msg)
    assert err.reply is reply
    assert (err.mtype, err.mid, err.token) == (mtype, 77, b"tk")


def test_unknown_elective_option_is_ignored() -> None:
    check_options(Message(CON, Code.GET, 1, b"", ((11, b"rd"), (UNKNOWN_ELECTIVE, b"zz"))))


def test_custom_known_set() -> None:
    msg = Message(CON, Code.GET, 1, b"", ((UNKNOWN_CRITICAL, b""),))
    check_options(msg, frozenset({UNKNOWN_CRITICAL}))
    with pytest.raises(DecodeError):
        check_options(msg, frozenset())


@pytest.mark.parametrize(
    "option",
    [
        pytest.param((OptionNumber.IF_NONE_MATCH, b"\x00"), id="If-None-Match-with-value"),
        pytest.param((OptionNumber.URI_HOST, b""), id="Uri-Host-empty"),
        pytest.param((OptionNumber.URI_HOST, b"h" * 256), id="Uri-Host-256"),
        pytest.param((OptionNumber.URI_PORT, b"\x00\x00\x01"), id="Uri-Port-3"),
        pytest.param((OptionNumber.URI_PATH, b"p" * 256), id="Uri-Path-256"),
        pytest.param((OptionNumber.IF_MATCH, b"e" * 9), id="If-Match-9"),
        pytest.param((OptionNumber.BLOCK1, b"\x00" * 4), id="Block1-4"),
        pytest.param((OptionNumber.PROXY_URI, b""), id="Proxy-Uri-empty"),
    ],
)
def test_known_critical_option_with_bad_length(option: Option) -> None:
    err = _check_error(Message(CON, Code.PUT, 2, b"", (option,)))
    assert err.reply is Reply.BAD_OPTION


@pytest.mark.parametrize(
    "option",
    [
        pytest.param((OptionNumber.IF_NONE_MATCH, b""), id="If-None-Match"),
        pytest.param((OptionNumber.URI_HOST, b"h" * 255), id="Uri-Host-255"),
        pytest.param((OptionNumber.URI_PORT, b""), id="Uri-Port-0"),
        pytest.param((OptionNumber.URI_PATH, b""), id="Uri-Path-empty"),
        pytest.param((OptionNumber.BLOCK2, b"\x00" * 3), id="Block2-3"),
        pytest.param((OptionNumber.ETAG, b"e" * 9), id="ETag-9-elective"),
        pytest.param((OptionNumber.CONTENT_FORMAT, b"\x00" * 3), id="Content-Format-3-elective"),
    ],
)
def test_acceptable_or_elective_lengths_pass(option: Option) -> None:
    check_options(Message(CON, Code.PUT, 2, b"", (option,)))


# -- reply_for ------------------------------------------------------------------------------


def test_reply_for_reset() -> None:
    err = _decode_error(_header(CON, Code.GET, 0x1234, 15))
    assert reply_for(err) == b"\x70\x00\x12\x34"
    assert reset_for(0x1234) == b"\x70\x00\x12\x34"


def test_reply_for_bad_request_is_piggybacked_with_token() -> None:
    err = DecodeError("x", Reply.BAD_REQUEST, mtype=CON, mid=0x0A0B, token=b"\x01\x02\x03")
    assert reply_for(err) == b"\x63\x80\x0a\x0b\x01\x02\x03"


def test_reply_for_bad_option_is_piggybacked_with_token() -> None:
    msg = Message(CON, Code.GET, 0xFFFE, b"\xca\xfe", ((UNKNOWN_CRITICAL, b""),))
    assert reply_for(_check_error(msg)) == b"\x62\x82\xff\xfe\xca\xfe"


def test_reply_for_without_token_falls_back_to_reset() -> None:
    err = DecodeError("x", Reply.BAD_OPTION, mtype=CON, mid=5, token=None)
    assert reply_for(err) == b"\x70\x00\x00\x05"


@pytest.mark.parametrize("reply", [Reply.IGNORE, Reply.ABORT])
def test_reply_for_silent_replies(reply: Reply) -> None:
    assert reply_for(DecodeError("x", reply, mtype=CON, mid=5, token=b"")) is None


def test_reply_for_unknown_mid_sends_nothing() -> None:
    assert reply_for(DecodeError("x", Reply.RESET)) is None


def test_empty_ack() -> None:
    assert empty_ack(0x0102) == b"\x60\x00\x01\x02"
    assert decode(empty_ack(0x0102)) == Message(ACK, 0, 0x0102)


# -- accessors and helpers ------------------------------------------------------------------


def _request() -> Message:
    opts = (
        (OptionNumber.OBSERVE, b""),
        (OptionNumber.URI_PATH, b"3"),
        (OptionNumber.URI_PATH, b"0"),
        (OptionNumber.URI_PATH, b"9"),
        (OptionNumber.CONTENT_FORMAT, b"\x2d\x16"),
        (OptionNumber.URI_QUERY, b"pmin=1"),
        (OptionNumber.URI_QUERY, b"pmax=5"),
        (OptionNumber.ACCEPT, b"\x6e"),
    )
    return Message(CON, Code.GET, 1, b"\x01", opts)


def test_accessors() -> None:
    msg = _request()
    assert msg.uri_path == ("3", "0", "9")
    assert msg.uri_query == ("pmin=1", "pmax=5")
    assert msg.location_path == ()
    assert msg.content_format == 11542
    assert msg.accept == 110
    assert msg.observe == 0
    assert msg.max_age == 60
    assert msg.option(OptionNumber.URI_PATH) == b"3"
    assert msg.option(OptionNumber.ETAG) is None
    assert msg.option(OptionNumber.SIZE1) is None
    assert msg.option_values(OptionNumber.URI_QUERY) == [b"pmin=1", b"pmax=5"]
    assert msg.uint_option(OptionNumber.MAX_AGE) is None


def test_absent_uint_accessors_are_none() -> None:
    msg = Message(CON, Code.GET, 1)
    assert (msg.content_format, msg.accept, msg.observe) == (None, None, None)


@pytest.mark.parametrize(
    ("raw", "seconds"), [(b"", 0), (b"\x1e", 30), (b"\x00\x01\x51\x80", 86400)]
)
def test_max_age(raw: bytes, seconds: int) -> None:
    assert Message(ACK, Code.CONTENT, 1, b"", ((OptionNumber.MAX_AGE, raw),)).max_age == seconds


@pytest.mark.parametrize(("mtype", "reply"), [(CON, Reply.BAD_REQUEST), (NON, Reply.IGNORE)])
def test_non_utf8_uri_path(mtype: int, reply: Reply) -> None:
    msg = decode(encode(Message(mtype, Code.GET, 3, b"\x09", ((11, b"\xff\xfe"),))))
    with pytest.raises(DecodeError) as info:
        _ = msg.uri_path
    assert info.value.reply is reply
    assert (info.value.mid, info.value.token) == (3, b"\x09")
    if mtype == CON:
        assert reply_for(info.value) == b"\x61\x80\x00\x03\x09"


def test_non_utf8_location_path_in_a_con_response_is_reset() -> None:
    msg = Message(CON, Code.CREATED, 3, b"\x09", ((OptionNumber.LOCATION_PATH, b"\xc3"),))
    with pytest.raises(DecodeError) as info:
        _ = msg.location_path
    assert info.value.reply is Reply.RESET
    assert reply_for(info.value) == b"\x70\x00\x00\x03"


def test_with_options_keeps_order() -> None:
    msg = Message(CON, Code.GET, 1, b"", ((11, b"a"), (15, b"q")))
    out = msg.with_options((11, b"b"), (6, b""), (60, b"\x01"))
    assert out.options == ((6, b""), (11, b"a"), (11, b"b"), (15, b"q"), (60, b"\x01"))


def test_sort_options_is_stable() -> None:
    assert sort_options([(11, b"2"), (3, b"h"), (11, b"1")]) == ((3, b"h"), (11, b"2"), (11, b"1"))


def test_path_and_query_options() -> None:
    assert path_options("/3/0/1") == ((11, b"3"), (11, b"0"), (11, b"1"))
    assert path_options("/") == ()
    assert path_options("rd/0", OptionNumber.LOCATION_PATH) == ((8, b"rd"), (8, b"0"))
    assert query_options("ep=x&lt=60&&b=U") == ((15, b"ep=x"), (15, b"lt=60"), (15, b"b=U"))


@pytest.mark.parametrize(
    ("value", "raw"),
    [
        (0, b""),
        (1, b"\x01"),
        (255, b"\xff"),
        (256, b"\x01\x00"),
        (65535, b"\xff\xff"),
        (0x1000000, b"\x01\x00\x00\x00"),
    ],
)
def test_uint_bytes(value: int, raw: bytes) -> None:
    assert uint_bytes(value) == raw


def test_encode_options_alone() -> None:
    assert encode_options(((11, b"rd"),), b"") == b"\xb2rd"
    assert encode_options((), b"hi") == b"\xffhi"
    assert encode_options((), b"") == b""


# -- property: decode(encode(m)) == m --------------------------------------------------------

_numbers = st.one_of(
    st.integers(0, 14),
    st.integers(0, 300),
    st.sampled_from([12, 13, 268, 269, 270, 65535, 65804]),
    st.integers(0, 70000),
)
_values = st.one_of(
    st.binary(max_size=14),
    st.binary(min_size=260, max_size=1000),
    st.sampled_from([b"x" * 12, b"x" * 13, b"x" * 268, b"x" * 269]),
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    mtype = draw(st.integers(0, 3))
    cls = draw(st.sampled_from([0, 2, 3, 4, 5]))
    code = (cls << 5) | draw(st.integers(0, 31))
    mid = draw(st.integers(0, 0xFFFF))
    if code == 0:
        return Message(mtype, 0, mid)
    token = draw(st.binary(max_size=8))
    numbers = sorted(draw(st.lists(_numbers, max_size=6)))
    assume(all(b - a <= 65804 for a, b in zip([0, *numbers], numbers, strict=False)))
    options = tuple((n, draw(_values)) for n in numbers)
    payload = draw(st.binary(max_size=64))
    return Message(mtype, code, mid, token, options, payload)


@settings(max_examples=300, deadline=None)
@given(messages())
def test_decode_inverts_encode(msg: Message) -> None:
    wire = encode(msg)
    assert decode(wire) == msg
    assert encode(decode(wire)) == wire
