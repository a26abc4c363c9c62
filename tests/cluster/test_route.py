"""Which slot a datagram names (dm_actor.cluster.route.slot_named): against the full decoder,
and never an exception on arbitrary or mutated bytes."""

from __future__ import annotations

import timeit
from functools import partial

from hypothesis import given, settings, strategies as st

from dm_actor.cluster import slots
from dm_actor.cluster.route import MAX_ROUTED, slot_named
from dm_actor.coap import message as m
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.lwm2m import registration as reg_iface

COUNT = 1024
PATH = OptionNumber.URI_PATH.value
QUERY = OptionNumber.URI_QUERY.value
FORMAT = OptionNumber.CONTENT_FORMAT.value
BLOCK1 = OptionNumber.BLOCK1.value


def register(ep: str, *, token: bytes = b"\1\2", extra: tuple[m.Option, ...] = ()) -> bytes:
    options = (
        (PATH, b"rd"),
        (FORMAT, b"\x28"),
        (QUERY, b"lwm2m=1.1"),
        (QUERY, b"ep=" + ep.encode()),
        (QUERY, b"lt=300"),
        *extra,
    )
    return m.encode(
        Message(MessageType.CON, Code.POST, 7, token, m.sort_options(options), b"</1/0>")
    )


def test_register_names_the_slot_of_its_endpoint() -> None:
    for ep in ["dev-1", "urn:imei:490154203237518", "名前", "x" * 200]:
        assert slot_named(register(ep), COUNT) == slots.slot_of(ep, COUNT)
    # in blocks: every block carries the path and query
    block = register("dev-2", extra=((BLOCK1, b"\x0a"),))
    assert slot_named(block, COUNT) == slots.slot_of("dev-2", COUNT)
    # a 6-byte token on a request means nothing (the device chose it)
    assert slot_named(register("dev-3", token=b"\0\0\0\0\0\0"), COUNT) == slots.slot_of(
        "dev-3", COUNT
    )


def test_update_and_deregister_name_the_slot_of_their_registration_id() -> None:
    reg = slots.reg_id(513)
    for code in (Code.POST, Code.DELETE):
        msg = Message(MessageType.CON, code, 9, b"t", ((PATH, b"rd"), (PATH, reg.encode())))
        assert slot_named(m.encode(msg), COUNT) == 513
        assert slot_named(m.encode(msg), 100) is None  # (a slot beyond the count)
    # a single node's registration id names nothing
    msg = Message(MessageType.CON, Code.POST, 9, b"t", ((PATH, b"rd"), (PATH, b"0123456789ab")))
    assert slot_named(m.encode(msg), COUNT) is None


def test_responses_and_notifications_name_the_slot_of_their_token() -> None:
    token = slots.token_prefix(77) + b"\0\0\0\5"
    for mtype, code in [
        (MessageType.ACK, Code.CONTENT),
        (MessageType.CON, Code.CONTENT),
        (MessageType.NON, Code.CHANGED),
        (MessageType.ACK, Code.NOT_FOUND),
    ]:
        data = m.encode(Message(mtype, code, 1, token, ((6, b"\1"),), b"23"))
        assert slot_named(data, COUNT) == 77
    assert slot_named(m.encode(Message(MessageType.ACK, Code.CONTENT, 1, b"\0\1")), COUNT) is None


def test_what_names_no_slot() -> None:
    assert slot_named(m.empty_ack(5), COUNT) is None
    assert slot_named(m.reset_for(5), COUNT) is None
    assert slot_named(b"\x40\x00\x00\x01", COUNT) is None  # ping
    get = Message(MessageType.CON, Code.GET, 1, b"", ((PATH, b"rd"),))
    assert slot_named(m.encode(get), COUNT) is None
    send = Message(MessageType.CON, Code.POST, 1, b"", ((PATH, b"dp"),), b"x")
    assert slot_named(m.encode(send), COUNT) is None
    no_ep = Message(MessageType.CON, Code.POST, 1, b"", ((PATH, b"rd"), (QUERY, b"lt=5")))
    assert slot_named(m.encode(no_ep), COUNT) is None
    delete_rd = Message(MessageType.CON, Code.DELETE, 1, b"", ((PATH, b"rd"), (QUERY, b"ep=a")))
    assert slot_named(m.encode(delete_rd), COUNT) is None
    assert slot_named(register("x") + b"\0" * MAX_ROUTED, COUNT) is None  # too long: not read
    assert slot_named(b"", COUNT) is None
    assert slot_named(b"\xff" * 10, COUNT) is None


def reference(data: bytes, count: int) -> int | None:
    """The same decision through the full decoder and the registration interface."""
    msg = m.decode(data)
    if msg.code >= 64:
        return slots.slot_of_token(msg.token, count)
    kind = reg_iface.classify(msg)
    if kind == "register":
        for item in msg.uri_query:
            if item.startswith("ep="):
                return slots.slot_of(item[3:], count) if item[3:] else None
        return None
    if kind in ("update", "deregister"):
        return slots.slot_of_reg_id(msg.uri_path[1], count)
    return None


segments = st.one_of(
    st.just("rd"), st.sampled_from(["dp", "bs", "3", ""]), st.text(max_size=20),
    st.builds(lambda s: slots.reg_id(s), st.integers(0, 2047)),
)  # fmt: skip
queries = st.one_of(
    st.builds(lambda t: "ep=" + t, st.text(max_size=30)),
    st.sampled_from(["lt=60", "lwm2m=1.1", "b=UQ", "Q", "ep"]),
)
messages = st.builds(
    lambda mtype, code, token, path, query, other, payload: Message(
        mtype,
        code,
        3,
        token,
        m.sort_options(
            tuple((PATH, s.encode()) for s in path)
            + tuple((QUERY, q.encode()) for q in query)
            + tuple(other)
        ),
        payload,
    ),
    st.sampled_from(list(MessageType)),
    st.sampled_from([0, 1, 2, 3, 4, 5, 65, 68, 69, 132, 160, 163]),
    st.one_of(
        st.binary(max_size=8),
        st.builds(
            lambda s, c: slots.token_prefix(s) + c,
            st.integers(0, 2047),
            st.binary(min_size=4, max_size=4),
        ),
    ),
    st.lists(segments, max_size=3),
    st.lists(queries, max_size=3),
    st.lists(st.tuples(st.sampled_from([1, 6, 12, 17, 23, 27, 60]), st.binary(max_size=4))),
    st.binary(max_size=8),
)


@settings(max_examples=600)
@given(messages, st.sampled_from([1, 1024, 2048]))
def test_agrees_with_the_full_decoder(msg: Message, count: int) -> None:
    data = m.encode(msg)
    try:
        expected = reference(data, count)
    except DecodeError:
        slot_named(data, count)  # (anything goes for what the router refuses; no raise)
        return
    if msg.code == 0 and msg.token:
        return  # (m.encode builds what decode refuses: an empty message with a token)
    assert slot_named(data, count) == expected


@settings(max_examples=600)
@given(messages, st.data())
def test_mutated_datagrams_never_raise(msg: Message, data: st.DataObject) -> None:
    raw = bytearray(m.encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        what = data.draw(st.integers(0, 2))
        i = data.draw(st.integers(0, len(raw)))
        if what == 0 and i < len(raw):
            raw[i] = data.draw(st.integers(0, 255))
        elif what == 1:
            del raw[i:]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    result = slot_named(bytes(raw), 1024)
    assert result is None or 0 <= result < 1024


@settings(max_examples=1000)
@given(st.binary(max_size=64), st.integers(1, 65536))
def test_random_bytes_never_raise(data: bytes, count: int) -> None:
    result = slot_named(data, count)
    assert result is None or 0 <= result < count


def test_it_is_cheap() -> None:
    # a generous bound (the shared machine varies): measured ~0.3 us for a response,
    # ~2-3 us for a Register, on this machine
    ack = m.encode(Message(MessageType.ACK, Code.CONTENT, 1, slots.token_prefix(3) + b"abcd"))
    reg = register("urn:imei:490154203237518")
    for data, bound in ((ack, 5e-6), (reg, 30e-6)):
        seconds = min(timeit.repeat(partial(slot_named, data, 1024), number=2000, repeat=3))
        assert seconds / 2000 < bound
