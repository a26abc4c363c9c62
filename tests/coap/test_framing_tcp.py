"""RFC 8323 framing: real Anjay TCP streams split at every offset, codec properties, limits,
malformed input, and the signalling builders and CSM parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.framing_tcp import (
    BASE_CSM,
    BASE_MAX_MESSAGE_SIZE,
    MAX_DIAGNOSTIC,
    MIN_PEER_MESSAGE_SIZE,
    BadCsmOption,
    Csm,
    StreamDecoder,
    abort,
    check_signalling,
    csm,
    encode,
    parse_csm,
    ping,
    pong,
    release,
)
from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, OptionNumber

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
BIG = 1 << 20


def _tcp_streams() -> list[object]:
    """One case per (file, direction): the concatenated stream bytes from `src_port`."""
    cases: list[object] = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if json.loads(lines[0])["transport"] != "tcp":
            continue
        streams: dict[int, bytearray] = {}
        for line in lines[1:]:
            if line.strip():
                rec = json.loads(line)
                streams.setdefault(rec["src_port"], bytearray()).extend(bytes.fromhex(rec["hex"]))
        for port, data in streams.items():
            cases.append(pytest.param(bytes(data), id=f"{path.stem}:{port}"))
    return cases


STREAMS = _tcp_streams()


def _anjay(port: int) -> bytes:
    lines = (VECTORS / "anjay-client-tcp.jsonl").read_text().splitlines()[1:]
    return b"".join(
        bytes.fromhex(r["hex"]) for r in map(json.loads, lines) if r["src_port"] == port
    )


CLIENT = _anjay(51356)
SERVER = _anjay(5700)


def decode_all(*chunks: bytes, max_message_size: int = BIG) -> list[Message]:
    """Feed `chunks` one by one, draining after each; assert no partial frame is left over."""
    decoder = StreamDecoder(max_message_size)
    out = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


# -- real streams ---------------------------------------------------------------------------


def test_tcp_vectors_are_present() -> None:
    assert len(STREAMS) == 2
    assert len(CLIENT) > 700
    assert len(SERVER) > 100


@pytest.mark.parametrize("stream", STREAMS)
def test_stream_decodes_and_re_encodes_exactly(stream: bytes) -> None:
    messages = decode_all(stream)
    assert len(messages) >= 5
    assert all(m.mtype == 0 and m.mid == 0 for m in messages)
    assert b"".join(encode(m) for m in messages) == stream
    # every frame boundary is a prefix where decoding stops cleanly with nothing pending
    assert decode_all(stream[: len(encode(messages[0]))]) == messages[:1]


@pytest.mark.parametrize("stream", STREAMS)
def test_stream_split_at_every_offset(stream: bytes) -> None:
    whole = decode_all(stream)
    for cut in range(len(stream) + 1):
        assert decode_all(stream[:cut], stream[cut:]) == whole, cut


@pytest.mark.parametrize("stream", STREAMS)
def test_stream_one_byte_at_a_time(stream: bytes) -> None:
    chunks = [stream[i : i + 1] for i in range(len(stream))]
    assert decode_all(*chunks) == decode_all(stream)


@pytest.mark.parametrize("stream", STREAMS)
def test_truncated_stream_waits_for_more(stream: bytes) -> None:
    whole = decode_all(stream)
    ends: list[int] = []
    for msg in whole:
        ends.append((ends[-1] if ends else 0) + len(encode(msg)))
    for cut in range(len(stream)):
        complete = sum(1 for end in ends if end <= cut)
        assert decode_all(stream[:cut]) == whole[:complete], cut


def test_anjay_stream_content() -> None:
    client = decode_all(CLIENT)
    server = decode_all(SERVER)
    # CSM first in both directions (RFC 8323 5.3)
    assert client[0].code == Code.CSM
    assert server[0].code == Code.CSM
    assert parse_csm(client[0]) == Csm(max_message_size=0xFFFFFFFF, block_wise=True)
    assert parse_csm(server[0]) == Csm(max_message_size=0x800100, block_wise=True)
    assert len(client[0].token) == 8
    # the client's Register
    register = client[1]
    assert register.code == Code.POST
    assert register.uri_path == ("rd",)
    assert "b=T" in register.uri_query
    assert "ep=anjay-tcp" in register.uri_query
    assert register.content_format == 40
    assert register.payload.startswith(b"</1/1>,</2>,")
    # the server's answer: 2.01 Created, same token, Location-Path rd/<id>
    created = server[1]
    assert created.code == Code.CREATED
    assert created.token == register.token
    assert created.location_path == ("rd", "0-59c")
    # the client ends the connection with an Abort
    assert client[-1] == Message(0, Code.ABORT)
    assert [m.code for m in server].count(Code.METHOD_NOT_ALLOWED) == 2


# -- codec properties -----------------------------------------------------------------------

codes = st.integers(0, 255).filter(lambda c: (c >> 5) not in (1, 6))
option_lists = st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=300)), max_size=8).map(
    lambda opts: tuple(sorted(opts, key=lambda o: o[0]))
)
messages = st.builds(
    Message,
    mtype=st.just(0),
    code=codes,
    mid=st.just(0),
    token=st.binary(max_size=8),
    options=option_lists,
    payload=st.binary(max_size=4000),
)


@settings(max_examples=300)
@given(messages)
def test_encode_decode_identity(msg: Message) -> None:
    data = encode(msg)
    assert decode_all(data) == [msg]


@settings(max_examples=50)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_concatenated_messages_in_random_chunks(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(map(encode, msgs))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode_all(*chunks) == msgs


@pytest.mark.parametrize(
    ("body", "head"),
    [
        (0, b"\x00"),
        (12, b"\xc0"),
        (13, b"\xd0\x00"),
        (268, b"\xd0\xff"),
        (269, b"\xe0\x00\x00"),
        (65804, b"\xe0\xff\xff"),
        (65805, b"\xf0\x00\x00\x00\x00"),
        (70000, b"\xf0\x00\x00\x10\x63"),
    ],
)
def test_length_field_forms(body: int, head: bytes) -> None:
    """Len nibble 0-12 inline, 13/14/15 with 1/2/4 extra bytes offset by 13/269/65805."""
    payload = bytes(range(256)) * (body // 256 + 1)
    msg = Message(0, Code.CONTENT, 0, b"\x01\x02", (), payload[: body - 1] if body else b"")
    data = encode(msg)
    assert data[: len(head)] == bytes((head[0] | 2,)) + head[1:]
    assert data[len(head) : len(head) + 3] == b"\x45\x01\x02"
    assert len(data) == len(head) + 3 + body
    assert decode_all(data) == [msg]
    # split inside the extended length and one byte into the body
    for cut in range(1, len(head) + 2):
        assert decode_all(data[:cut], data[cut:]) == [msg]


def test_encode_refuses_long_token() -> None:
    with pytest.raises(ValueError, match="token"):
        encode(Message(0, Code.GET, 0, b"123456789"))


def test_mtype_and_mid_are_not_on_the_wire() -> None:
    assert encode(Message(2, Code.GET, 0x1234, b"\xaa")) == b"\x01\x01\xaa"


# -- limits and malformed input ---------------------------------------------------------------


def test_oversize_frame_refused_once_its_length_is_known() -> None:
    decoder = StreamDecoder(max_message_size=1152)
    header = b"\xf8\x00\x01\x00\x00"  # TKL 8, 4-byte length: a 131 KB frame
    for i in range(len(header) - 1):
        decoder.receive_data(header[i : i + 1])
        assert decoder.next_message() is None
    decoder.receive_data(header[-1:])
    with pytest.raises(DecodeError, match="exceeds Max-Message-Size 1152") as info:
        decoder.next_message()
    assert info.value.reply is Reply.ABORT


def test_frame_of_exactly_max_message_size_is_accepted() -> None:
    msg = Message(0, Code.CONTENT, 0, b"tok", (), b"x" * 1000)
    data = encode(msg)
    assert decode_all(data, max_message_size=len(data)) == [msg]
    with pytest.raises(DecodeError, match="exceeds"):
        decode_all(data[:4], max_message_size=len(data) - 1)


def test_default_limit_has_headroom_over_the_base() -> None:
    block = Message(0, Code.CONTENT, 0, b"12345678", ((23, b"\x0e"),), b"x" * 1024)
    assert len(encode(block)) <= BASE_MAX_MESSAGE_SIZE
    larger = block._replace(payload=b"x" * 2000)
    decoder = StreamDecoder()
    decoder.receive_data(encode(larger))
    assert decoder.next_message() == larger
    decoder.receive_data(encode(block._replace(payload=b"x" * 3000))[:4])
    with pytest.raises(DecodeError, match="exceeds Max-Message-Size 2048"):
        decoder.next_message()


def _drain(decoder: StreamDecoder, data: bytes) -> None:
    decoder.receive_data(data)
    while decoder.next_message() is not None:
        pass


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"\x09\x01" + b"\x00" * 9, "reserved token length 9"),
        (b"\x0f\x01", "reserved token length 15"),
        (b"\x00\x21", "reserved code class 1"),
        (b"\x00\xc1", "reserved code class 6"),
        (b"\x10\x45\xff", "payload marker followed by no payload"),
        (b"\x10\x45\xf0", "reserved option delta 15"),
        (b"\x10\x45\x0f", "reserved option length 15"),
        (b"\x20\x45\x02\x00", "option value runs past the end"),
        (b"\x10\x45\xd0", "truncated option delta"),
    ],
)
def test_malformed_frames_abort(data: bytes, what: str) -> None:
    with pytest.raises(DecodeError, match=what) as info:
        _drain(StreamDecoder(), data)
    assert info.value.reply is Reply.ABORT


def test_error_is_sticky() -> None:
    decoder = StreamDecoder()
    decoder.receive_data(encode(ping()) + b"\x00\x21" + encode(ping()))
    assert decoder.next_message() == ping()
    for _ in range(2):
        with pytest.raises(DecodeError):
            decoder.next_message()


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(1, 16))
def test_garbage_raises_only_decode_error(data: bytes, step: int) -> None:
    decoder = StreamDecoder(max_message_size=256)
    error = None
    try:
        for i in range(0, len(data), step):
            decoder.receive_data(data[i : i + step])
            while (msg := decoder.next_message()) is not None:
                assert len(encode(msg)) <= 256
    except DecodeError as e:
        error = e
    assert error is None or error.reply is Reply.ABORT


@settings(max_examples=100)
@given(messages, st.data())
def test_truncated_or_corrupted_frame_raises_only_decode_error(
    msg: Message, data: st.DataObject
) -> None:
    frame = bytearray(encode(msg))
    cut = data.draw(st.integers(0, len(frame)))
    index = data.draw(st.integers(0, len(frame) - 1))
    frame[index] = data.draw(st.integers(0, 255))
    prefix = bytes(frame[:cut])
    try:
        decoded = decode_all(prefix)
    except DecodeError:
        return
    # whatever decodes (a corrupted byte may split one frame into several) is exact wire bytes
    assert prefix.startswith(b"".join(map(encode, decoded)))


# -- signalling ---------------------------------------------------------------------------------


def _wire(msg: Message) -> Message:
    [decoded] = decode_all(encode(msg))
    return decoded


def test_csm_bytes_and_round_trip() -> None:
    assert encode(csm()) == b"\x30\xe1\x22\x04\x80"
    assert encode(csm(0x800100, block_wise=True)) == bytes.fromhex("50e12380010020")  # libcoap's
    for size, bw in [(1152, False), (128, True), (2048, True), (0xFFFFFFFF, False)]:
        assert parse_csm(_wire(csm(size, block_wise=bw))) == Csm(size, bw)


@pytest.mark.parametrize(
    ("wire", "size"),
    [
        (b"\x20\xe1\x21\x80", 128),  # the floor, declared in one byte
        (b"\x30\xe1\x22\x00\x80", 128),  # the same with a leading zero byte
        (b"\x50\xe1\x24\xff\xff\xff\xff", 0xFFFFFFFF),  # the largest a 4-byte value holds
    ],
)
def test_any_max_message_size_from_the_floor_up_is_kept(wire: bytes, size: int) -> None:
    [msg] = decode_all(wire)
    assert parse_csm(msg) == Csm(size, False)
    assert MIN_PEER_MESSAGE_SIZE == 128


@pytest.mark.parametrize(
    ("wire", "size"),
    [
        (b"\x10\xe1\x20", 0),  # Max-Message-Size 0 as an empty uint
        (b"\x20\xe1\x21\x00", 0),
        (b"\x20\xe1\x21\x7f", 127),
        (b"\x50\xe1\x24\x00\x00\x00\x01", 1),
    ],
)
def test_a_max_message_size_below_the_floor_is_a_bad_csm_option(wire: bytes, size: int) -> None:
    [msg] = decode_all(wire)
    with pytest.raises(BadCsmOption, match=f"Max-Message-Size {size} is below 128") as info:
        parse_csm(msg)
    assert info.value.option == 2
    assert info.value.reply is Reply.ABORT
    # also in a later CSM, which would lower a size already in force
    with pytest.raises(BadCsmOption):
        parse_csm(msg, Csm(4096, True))


def test_an_abort_fits_the_smallest_max_message_size_we_accept() -> None:
    long = abort("x" * 1000, bad_csm_option=2)
    assert len(long.payload) == MAX_DIAGNOSTIC
    assert len(encode(long)) <= MIN_PEER_MESSAGE_SIZE
    cut = abort("é" * 100)  # 2-byte characters: never cut in the middle of one
    assert cut.payload.decode() == "é" * (MAX_DIAGNOSTIC // 2)


def test_csm_options_are_cumulative() -> None:
    first = parse_csm(csm(4096, block_wise=True))
    assert parse_csm(Message(0, Code.CSM), first) == first
    assert parse_csm(Message(0, Code.CSM)) == BASE_CSM == Csm(1152, False)
    assert parse_csm(csm(2000), first) == Csm(2000, True)


def test_csm_ignores_elective_and_malformed_options() -> None:
    msg = Message(
        0,
        Code.CSM,
        0,
        b"",
        ((2, b"\x01\x00\x00\x00\x00"), (2, b"\x08\x00"), (4, b"x"), (6, b"\x01")),
    )
    # the 5-byte size is skipped, so the second one counts; a non-empty Block-Wise is ignored
    assert parse_csm(msg) == Csm(2048, False)


def test_unknown_critical_csm_option_is_reported() -> None:
    msg = csm(block_wise=True).with_options((9, b"\x01"))
    with pytest.raises(BadCsmOption) as info:
        parse_csm(_wire(msg))
    assert info.value.option == 9
    assert info.value.reply is Reply.ABORT
    answer = _wire(abort("unknown critical CSM option", bad_csm_option=info.value.option))
    assert answer.code == Code.ABORT
    assert answer.uint_option(2) == 9
    assert answer.payload == b"unknown critical CSM option"


def test_parse_csm_needs_a_csm() -> None:
    with pytest.raises(ValueError, match="not a CSM"):
        parse_csm(ping())


def test_check_signalling() -> None:
    check_signalling(ping(custody=True).with_options((8, b"")))
    with pytest.raises(DecodeError) as info:
        check_signalling(ping().with_options((OptionNumber.URI_PATH, b"x")))
    assert type(info.value) is DecodeError
    assert info.value.reply is Reply.ABORT


def test_ping_pong_release_abort() -> None:
    assert encode(ping()) == b"\x00\xe2"
    assert _wire(ping(token=b"\x07", custody=True)) == Message(
        0, Code.PING, 0, b"\x07", ((2, b""),)
    )
    assert _wire(pong(b"\x07")) == Message(0, Code.PONG, 0, b"\x07")
    assert _wire(pong(b"", custody=True)).options == ((2, b""),)
    assert _wire(release()) == Message(0, Code.RELEASE)
    rel = _wire(release(alternative_address="coap+tcp://[::1]:5683", hold_off=30))
    assert rel.options == ((2, b"coap+tcp://[::1]:5683"), (4, b"\x1e"))
    assert encode(abort()) == b"\x00\xe5"  # what Anjay sends
    assert _wire(abort("bye")) == Message(0, Code.ABORT, 0, b"", (), b"bye")


def test_buffer_stays_bounded_on_a_long_stream() -> None:
    """1 MB of frames in chunks that always end mid-frame: consumed bytes are dropped."""
    frame = encode(Message(0, Code.CONTENT, 0, b"tk", (), b"p" * 97))
    stream = frame * (1_000_000 // len(frame))
    decoder = StreamDecoder()
    count = 0
    for i in range(0, len(stream), 1000):
        decoder.receive_data(stream[i : i + 1000])
        while decoder.next_message() is not None:
            count += 1
        assert len(decoder._buffer) < len(frame) + 1000  # private: the property under test
    assert count == len(stream) // len(frame)
