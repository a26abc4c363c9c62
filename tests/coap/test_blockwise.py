from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.blockwise import (
    BERT_SZX,
    DEFAULT_MAX_BODY,
    MAX_NUM,
    Ask,
    Block,
    Block1Receiver,
    Block1Sender,
    Block2Assembler,
    Complete,
    Continue,
    Done,
    Failed,
    Reject,
    Send,
    get_block,
    get_size,
    size_option,
    slice_block2,
)
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message, decode, encode
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

B1 = OptionNumber.BLOCK1.value
B2 = OptionNumber.BLOCK2.value
SIZE1 = OptionNumber.SIZE1.value
SIZE2 = OptionNumber.SIZE2.value

szxs = st.integers(0, 6)
nums = st.integers(0, MAX_NUM)


def body(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def wire(block: Block, *, bert: bool = False) -> Block:
    """The block as the peer sees it after encoding."""
    return Block.decode(block.encode(), bert=bert)


# -- the option value -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("szx", "size"), [(0, 16), (1, 32), (2, 64), (3, 128), (4, 256), (5, 512), (6, 1024), (7, 1024)]
)
def test_size(szx: int, size: int) -> None:
    assert Block(3, False, szx).size == size
    assert Block(3, False, szx).offset == 3 * size


@pytest.mark.parametrize(
    ("block", "raw"),
    [
        (Block(0, False, 0), b""),
        (Block(0, True, 0), b"\x08"),
        (Block(0, False, 6), b"\x06"),
        (Block(1, False, 6), b"\x16"),
        (Block(15, True, 6), b"\xfe"),
        (Block(16, False, 0), b"\x01\x00"),
        (Block(4095, True, 2), b"\xff\xfa"),
        (Block(4096, False, 0), b"\x01\x00\x00"),
        (Block(MAX_NUM, True, 6), b"\xff\xff\xfe"),
    ],
)
def test_encode_is_minimal(block: Block, raw: bytes) -> None:
    assert block.encode() == raw
    assert Block.decode(raw) == block


def test_every_short_value_round_trips() -> None:
    for value in range(1 << 16):
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        if value & 7 == 7:
            with pytest.raises(DecodeError):
                Block.decode(raw)
            block = Block.decode(raw, bert=True)
        else:
            block = Block.decode(raw)
        assert (block.num, block.more, block.szx) == (value >> 4, bool(value & 8), value & 7)
        assert block.encode() == raw


@settings(max_examples=300)
@given(nums, st.booleans(), st.integers(0, 7))
def test_round_trip_all_values(num: int, more: bool, szx: int) -> None:
    block = Block(num, more, szx)
    raw = block.encode()
    assert len(raw) <= 3
    assert Block.decode(raw, bert=True) == block
    assert Block.decode(b"\x00" * (3 - len(raw)) + raw, bert=True) == block  # leading zeros
    if szx != BERT_SZX:
        assert Block.decode(raw) == block


@pytest.mark.parametrize(
    "raw", [b"\x00\x00\x00\x00", b"\x01\x00\x00\x06", b"\x07", b"\xff\xff\xff"]
)
def test_decode_rejects_with_bad_option(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        Block.decode(raw)
    assert info.value.reply is Reply.BAD_OPTION


def test_bert_only_where_marked() -> None:
    assert Block.decode(b"\x17", bert=True) == Block(1, False, 7)
    assert Block(1, False, 7).offset == 1024
    with pytest.raises(DecodeError):
        Block.decode(b"\x00\x00\x00\x17", bert=True)


@pytest.mark.parametrize(("num", "szx"), [(-1, 0), (MAX_NUM + 1, 0), (0, -1), (0, 8)])
def test_constructor_rejects_out_of_range(num: int, szx: int) -> None:
    with pytest.raises(ValueError, match="invalid block"):
        Block(num, False, szx)


@pytest.mark.parametrize(
    ("block", "length", "ok"),
    [
        (Block(0, True, 2), 64, True),
        (Block(0, True, 2), 63, False),
        (Block(0, True, 2), 65, False),
        (Block(0, False, 2), 0, True),
        (Block(0, False, 2), 64, True),
        (Block(0, False, 2), 65, False),
        (Block(0, True, 7), 3072, True),
        (Block(0, True, 7), 0, False),
        (Block(0, True, 7), 1000, False),
        (Block(0, False, 7), 5000, True),
    ],
)
def test_fits(block: Block, length: int, ok: bool) -> None:
    assert block.fits(length) is ok


def test_message_helpers() -> None:
    msg = Message(
        MessageType.CON,
        Code.PUT,
        1,
        b"t",
        (Block(2, True, 5).option(B1), size_option(SIZE1, 70000)),
        b"x" * 512,
    )
    again = decode(encode(msg))
    assert get_block(again, B1) == Block(2, True, 5)
    assert get_block(again, B2) is None
    assert get_size(again, SIZE1) == 70000
    assert get_size(again, SIZE2) is None
    assert get_size(Message(0, Code.CONTENT, options=((SIZE2, b"\x01" * 5),)), SIZE2) is None
    with pytest.raises(DecodeError):
        get_block(Message(0, Code.GET, options=((B2, b"\x0f"),)), B2)
    assert get_block(Message(0, Code.GET, options=((B2, b"\x0f"),)), B2, bert=True) == Block(
        0, True, 7
    )


# -- Block1: sender -> receiver -------------------------------------------------------------


def upload(
    payload: bytes, szx: int, server_szx: list[int], *, bert_units: int = 1
) -> tuple[bytes, list[Block]]:
    """Run a whole Block1 transfer; the server's preferred SZX follows `server_szx` per step."""
    bert = szx == BERT_SZX
    sender = Block1Sender(payload, szx, bert_units=bert_units)
    receiver = Block1Receiver(szx=server_szx[0], max_body=len(payload) + 1)
    send = sender.current
    sent: list[Block] = []
    for step in range(len(payload) // 16 + 3):
        receiver.szx = server_szx[min(step, len(server_szx) - 1)]
        block = wire(send.block, bert=bert)
        sent.append(block)
        assert block.fits(len(send.payload))
        result = receiver.feed(block, send.payload, len(payload) if block.num == 0 else None)
        if isinstance(result, Complete):
            assert sender.on_response(Code.CHANGED, block) == Done(Code.CHANGED)
            return result.body, sent
        assert isinstance(result, Continue), result
        assert result.block.num == block.num
        assert result.block.more
        nxt = sender.on_response(Code.CONTINUE, wire(result.block, bert=bert))
        assert isinstance(nxt, Send), nxt
        assert nxt.block.szx <= min(block.szx, receiver.szx)  # follows a smaller preference
        send = nxt
    raise AssertionError("transfer did not finish")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6000), szxs, st.lists(szxs, min_size=1, max_size=8), st.integers())
def test_block1_round_trip_any_szx_and_changes(
    length: int, szx: int, server_szx: list[int], seed: int
) -> None:
    payload = body(length, seed)
    got, sent = upload(payload, szx, server_szx)
    assert got == payload
    assert sent[0].num == 0
    assert [b.szx for b in sent] == sorted((b.szx for b in sent), reverse=True)


@pytest.mark.parametrize("szx", range(7))
def test_block1_round_trip_each_szx_exact_multiple(szx: int) -> None:
    size = 16 << szx
    payload = body(3 * size, szx)
    got, sent = upload(payload, szx, [6])
    assert got == payload
    assert [(b.num, b.more) for b in sent] == [(0, True), (1, True), (2, False)]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 9000), st.integers(1, 3), st.integers())
def test_block1_bert_round_trip(length: int, units: int, seed: int) -> None:
    payload = body(length, seed)
    got, sent = upload(payload, BERT_SZX, [BERT_SZX], bert_units=units)
    assert got == payload
    assert all(b.szx == BERT_SZX for b in sent)
    assert len(sent) == max(1, -(-length // (1024 * units)))


def test_block1_bert_falls_back_to_server_size() -> None:
    payload = body(5000)
    got, sent = upload(payload, BERT_SZX, [6], bert_units=2)
    assert got == payload
    assert [(b.num, b.szx) for b in sent] == [(0, 7), (2, 6), (3, 6), (4, 6)]


def test_block1_rfc7959_figure_5_size_negotiation() -> None:
    # client starts with 128-byte blocks, server prefers 32: the second request is block 4
    sender = Block1Sender(body(300), szx=3)
    first = sender.current
    assert first.block == Block(0, True, 3)
    assert len(first.payload) == 128
    nxt = sender.on_response(Code.CONTINUE, Block(0, True, 1))
    assert isinstance(nxt, Send)
    assert nxt.block == Block(4, True, 1)
    assert nxt.payload == body(300)[128:160]


def test_block1_sender_non_atomic_server_and_violations() -> None:
    sender = Block1Sender(body(100), szx=2)
    # 2.04 with Block1 M=0 for a non-final block: a non-atomic server, go on
    nxt = sender.on_response(Code.CHANGED, Block(0, False, 2))
    assert nxt == Send(Block(1, False, 2), body(100)[64:])
    assert sender.on_response(Code.CONTINUE, Block(1, False, 2)) == Failed(
        "2.31 Continue after the last block"
    )
    assert sender.on_response(Code.CHANGED, Block(1, False, 2)) == Done(Code.CHANGED)

    fresh = Block1Sender(body(100), szx=2)
    assert isinstance(fresh.on_response(Code.CHANGED, Block(0, True, 2)), Failed)
    assert isinstance(fresh.on_response(Code.CONTINUE, None), Failed)
    assert isinstance(fresh.on_response(Code.CONTINUE, Block(3, True, 2)), Failed)
    assert fresh.current.block == Block(0, True, 2)  # nothing moved


def test_block1_sender_error_codes() -> None:
    sender = Block1Sender(body(600), szx=6)
    # 4.13 with a smaller Block1 on the first block: restart smaller
    restarted = sender.on_response(Code.REQUEST_ENTITY_TOO_LARGE, Block(0, False, 4))
    assert restarted == Send(Block(0, True, 4), body(600)[:256])
    # ... but not to a larger or equal size, and not without Block1
    assert sender.on_response(Code.REQUEST_ENTITY_TOO_LARGE, Block(0, False, 4)) == Done(
        Code.REQUEST_ENTITY_TOO_LARGE
    )
    assert sender.on_response(Code.REQUEST_ENTITY_TOO_LARGE, None) == Done(
        Code.REQUEST_ENTITY_TOO_LARGE
    )
    assert sender.on_response(Code.REQUEST_ENTITY_INCOMPLETE, None) == Done(
        Code.REQUEST_ENTITY_INCOMPLETE
    )
    assert sender.on_response(Code.INTERNAL_SERVER_ERROR, None) == Done(Code.INTERNAL_SERVER_ERROR)
    # mid-transfer, 4.13 is final
    sender.on_response(Code.CONTINUE, Block(0, True, 4))
    assert sender.on_response(Code.REQUEST_ENTITY_TOO_LARGE, Block(0, False, 2)) == Done(
        Code.REQUEST_ENTITY_TOO_LARGE
    )


def test_block1_sender_small_payload_and_bounds() -> None:
    assert Block1Sender(b"", 6).current == Send(Block(0, False, 6), b"")
    assert Block1Sender(b"abc", 0).current == Send(Block(0, False, 0), b"abc")
    with pytest.raises(ValueError, match="invalid"):
        Block1Sender(b"x", 8)
    with pytest.raises(ValueError, match="invalid"):
        Block1Sender(b"x", 7, bert_units=0)
    limit = (MAX_NUM + 1) * 16
    Block1Sender(bytes(limit), 0)
    with pytest.raises(ValueError, match="too large"):
        Block1Sender(bytes(limit + 1), 0)
    # a body numberable at 32 bytes but not at 16: shrinking to 16 fails cleanly
    sender = Block1Sender(bytes(limit + 1), 1)
    result = sender.on_response(Code.CONTINUE, Block(0, True, 0))
    assert isinstance(result, Failed)
    assert "too large" in result.reason


def test_block1_receiver_gap_and_restart() -> None:
    rx = Block1Receiver(szx=6)
    assert rx.feed(Block(1, True, 2), bytes(64)) == Reject(Code.REQUEST_ENTITY_INCOMPLETE)
    assert rx.feed(Block(0, True, 2), b"a" * 64) == Continue(Block(0, True, 2))
    assert rx.feed(Block(2, True, 2), bytes(64)) == Reject(Code.REQUEST_ENTITY_INCOMPLETE)
    # the reject ended the transfer: block 1 now is a gap too
    assert rx.feed(Block(1, False, 2), b"b") == Reject(Code.REQUEST_ENTITY_INCOMPLETE)
    # block 0 again starts a new transfer, even mid-way
    assert rx.feed(Block(0, True, 2), b"a" * 64) == Continue(Block(0, True, 2))
    assert rx.feed(Block(0, True, 2), b"c" * 64) == Continue(Block(0, True, 2))
    assert rx.feed(Block(1, False, 2), b"d") == Complete(b"c" * 64 + b"d")


def test_block1_receiver_prefers_smaller_and_checks_payload_size() -> None:
    rx = Block1Receiver(szx=1)
    assert rx.feed(Block(0, True, 3), bytes(128)) == Continue(Block(0, True, 1))
    assert rx.feed(Block(4, True, 1), bytes(31)) == Reject(Code.BAD_REQUEST)
    assert rx.feed(Block(0, False, 3), bytes(129)) == Reject(Code.BAD_REQUEST)
    assert rx.feed(Block(0, False, 3), bytes(128)) == Complete(bytes(128))


def test_block1_receiver_too_large() -> None:
    rx = Block1Receiver(max_body=100)
    assert rx.max_body == 100
    assert rx.feed(Block(0, True, 2), bytes(64), size1=101) == Reject(
        Code.REQUEST_ENTITY_TOO_LARGE, 100
    )
    assert rx.feed(Block(0, True, 2), bytes(64), size1=100) == Continue(Block(0, True, 2))
    assert rx.feed(Block(1, True, 2), bytes(64)) == Reject(Code.REQUEST_ENTITY_TOO_LARGE, 100)
    assert rx.feed(Block(0, True, 2), bytes(64)) == Continue(Block(0, True, 2))
    assert rx.feed(Block(1, False, 2), bytes(36)) == Complete(bytes(100))
    assert Block1Receiver().max_body == DEFAULT_MAX_BODY == 1 << 20


# -- Block2: slice_block2 -> assembler ------------------------------------------------------


def download(
    payload: bytes,
    client_szx: list[int],
    server_szx: list[int],
    *,
    early: bool,
    bert_units: int = 1,
) -> tuple[bytes, list[Block]]:
    """Run a whole Block2 transfer; both sides' SZX limits follow their lists per step."""
    bert = BERT_SZX in client_szx
    asm = Block2Assembler(szx=client_szx[0], max_body=len(payload))
    request = Block(0, False, asm.szx) if early else None
    got: list[Block] = []
    for step in range(len(payload) // 16 + 3):
        block, chunk = slice_block2(
            payload, request, server_szx[min(step, len(server_szx) - 1)], bert_units=bert_units
        )
        block = wire(block, bert=bert)
        got.append(block)
        asm.szx = client_szx[min(step, len(client_szx) - 1)]
        size2 = len(payload) if block.num == 0 else None
        result = asm.feed(block, chunk, etag=b"v1", size2=size2)
        if isinstance(result, Complete):
            return result.body, got
        assert isinstance(result, Ask), result
        assert not result.block.more
        assert result.block.offset == block.offset + len(chunk)
        request = wire(result.block, bert=bert)
    raise AssertionError("transfer did not finish")


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 6000),
    st.lists(szxs, min_size=1, max_size=8),
    st.lists(szxs, min_size=1, max_size=8),
    st.booleans(),
    st.integers(),
)
def test_block2_round_trip_any_szx_and_changes(
    length: int, client_szx: list[int], server_szx: list[int], early: bool, seed: int
) -> None:
    payload = body(length, seed)
    got, blocks = download(payload, client_szx, server_szx, early=early)
    assert got == payload
    assert blocks[0].num == 0
    assert not blocks[-1].more
    assert all(b.more for b in blocks[:-1])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 9000), st.integers(1, 3), st.integers())
def test_block2_bert_round_trip(length: int, units: int, seed: int) -> None:
    payload = body(length, seed)
    got, blocks = download(payload, [BERT_SZX], [BERT_SZX], early=True, bert_units=units)
    assert got == payload
    assert len(blocks) == max(1, -(-length // (1024 * units)))


def test_slice_block2() -> None:
    payload = body(100)
    assert slice_block2(payload, None, 2) == (Block(0, True, 2), payload[:64])
    assert slice_block2(payload, Block(1, False, 2), 6) == (Block(1, False, 2), payload[64:])
    # the server's smaller size wins and keeps the byte offset
    assert slice_block2(payload, Block(1, False, 2), 1) == (Block(2, True, 1), payload[64:96])
    assert slice_block2(payload, None) == (Block(0, False, 6), payload)
    assert slice_block2(b"", None, 0) == (Block(0, False, 0), b"")
    assert slice_block2(b"", Block(0, False, 3), 6) == (Block(0, False, 3), b"")
    assert slice_block2(bytes(64), Block(0, False, 2)) == (Block(0, False, 2), bytes(64))
    with pytest.raises(DecodeError) as info:
        slice_block2(payload, Block(2, False, 2))
    assert info.value.reply is Reply.BAD_OPTION
    with pytest.raises(DecodeError):
        slice_block2(bytes(64), Block(1, False, 2))


def test_assembler_unblocked_response_and_reuse() -> None:
    asm = Block2Assembler()
    assert asm.feed(None, b"whole") == Complete(b"whole")
    assert asm.feed(Block(0, True, 0), bytes(16)) == Ask(Block(1, False, 0))
    assert asm.feed(Block(1, False, 0), b"end") == Complete(bytes(16) + b"end")
    assert asm.feed(Block(0, False, 0), b"again") == Complete(b"again")


def test_assembler_asks_smaller_size_than_server() -> None:
    asm = Block2Assembler(szx=4)
    assert asm.feed(Block(0, True, 6), bytes(1024)) == Ask(Block(4, False, 4))


def test_assembler_out_of_order_asks_again_then_gives_up() -> None:
    asm = Block2Assembler(max_retries=2)
    payload = body(200)
    assert asm.feed(Block(0, True, 2), payload[:64]) == Ask(Block(1, False, 2))
    assert asm.feed(Block(2, True, 2), payload[128:192]) == Ask(Block(1, False, 2))
    assert asm.feed(Block(0, True, 2), payload[:64]) == Ask(Block(1, False, 2))  # stale repeat
    result = asm.feed(Block(3, False, 2), payload[192:])
    assert isinstance(result, Failed)
    assert "gave up" in result.reason
    # the failure reset the assembler: a new transfer works
    assert asm.feed(Block(0, False, 2), b"ok") == Complete(b"ok")


def test_assembler_recovers_when_right_block_follows_wrong_one() -> None:
    asm = Block2Assembler()
    payload = body(150)
    asm.feed(Block(0, True, 2), payload[:64])
    assert asm.feed(Block(2, False, 2), payload[128:]) == Ask(Block(1, False, 2))
    assert asm.feed(Block(1, True, 2), payload[64:128]) == Ask(Block(2, False, 2))
    assert asm.feed(Block(2, False, 2), payload[128:]) == Complete(payload)


def test_assembler_etag_change_restarts() -> None:
    old, new = body(150, 1), body(130, 2)
    asm = Block2Assembler()
    assert asm.feed(Block(0, True, 2), old[:64], etag=b"A") == Ask(Block(1, False, 2))
    # block 1 comes from a changed representation: start again from block 0
    assert asm.feed(Block(1, True, 2), new[64:128], etag=b"B") == Ask(Block(0, False, 2))
    assert asm.feed(Block(0, True, 2), new[:64], etag=b"B") == Ask(Block(1, False, 2))
    assert asm.feed(Block(1, True, 2), new[64:128], etag=b"B") == Ask(Block(2, False, 2))
    assert asm.feed(Block(2, False, 2), new[128:], etag=b"B") == Complete(new)


def test_assembler_etag_change_on_block_zero_and_limit() -> None:
    asm = Block2Assembler(max_retries=1)
    asm.feed(Block(0, True, 2), bytes(64), etag=b"A")
    # a block 0 with a new ETag is taken as the restart itself
    assert asm.feed(Block(0, True, 2), b"n" * 64, etag=b"B") == Ask(Block(1, False, 2))
    result = asm.feed(Block(0, True, 2), bytes(64), etag=None)  # changed again: out of retries
    assert isinstance(result, Failed)
    assert "ETag" in result.reason


def test_assembler_bounds_body_size() -> None:
    asm = Block2Assembler(max_body=100)
    assert isinstance(asm.feed(Block(0, True, 2), bytes(64), size2=101), Failed)
    assert isinstance(asm.feed(None, bytes(101)), Failed)
    assert asm.feed(None, bytes(100)) == Complete(bytes(100))
    assert asm.feed(Block(0, True, 2), bytes(64), size2=100) == Ask(Block(1, False, 2))
    result = asm.feed(Block(1, True, 2), bytes(64))
    assert isinstance(result, Failed)
    assert "exceeds" in result.reason
    asm.feed(Block(0, True, 2), bytes(64))
    assert asm.feed(Block(1, False, 2), bytes(36)) == Complete(bytes(100))
    assert Block2Assembler().max_body == DEFAULT_MAX_BODY


def test_assembler_rejects_wrong_payload_length() -> None:
    asm = Block2Assembler()
    result = asm.feed(Block(0, True, 2), bytes(63))
    assert isinstance(result, Failed)
    assert "does not fit" in result.reason
    assert isinstance(asm.feed(Block(0, False, 2), bytes(65)), Failed)
