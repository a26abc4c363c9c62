from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.message import decode
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.coap.observe import (
    FRESHNESS_SECONDS,
    OBSERVE_DEREGISTER,
    OBSERVE_REGISTER,
    SEQ_MODULUS,
    NotificationOrder,
    is_fresher,
    observe_bytes,
    observe_value,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
TOP = SEQ_MODULUS - 1
HALF = 1 << 23
seqs = st.integers(0, TOP)


def test_constants() -> None:
    assert (OBSERVE_REGISTER, OBSERVE_DEREGISTER) == (0, 1)
    assert SEQ_MODULUS == 1 << 24
    assert FRESHNESS_SECONDS == 128.0


@pytest.mark.parametrize(
    ("v1", "t1", "v2", "t2", "fresher"),
    [
        (0, 0.0, 1, 0.0, True),
        (1, 0.0, 0, 0.0, False),  # older
        (5, 0.0, 5, 0.0, False),  # duplicate
        (5, 0.0, 5, 127.9, False),
        (TOP, 0.0, 0, 0.0, True),  # wrap-around: 0 follows 2**24 - 1
        (TOP - 10, 0.0, 20, 0.0, True),
        (0, 0.0, TOP, 0.0, False),  # 2**24 - 1 is far "behind" 0
        (20, 0.0, TOP - 10, 0.0, False),
        (0, 0.0, HALF - 1, 0.0, True),  # last number inside the window
        (0, 0.0, HALF, 0.0, False),  # exactly 2**23 apart: neither is fresher
        (HALF, 0.0, 0, 0.0, False),
        (HALF + 1, 0.0, 0, 0.0, True),  # v1 - v2 > 2**23: v2 wrapped
        (10, 0.0, 5, 128.0, False),  # 128 s rule is strict: T2 > T1 + 128
        (10, 0.0, 5, 128.001, True),
        (10, 100.0, 5, 228.5, True),
        (10, 100.0, 10, 229.0, True),  # even a repeated number after 128 s
        (0, 0.0, HALF, 129.0, True),
    ],
)
def test_freshness_table(v1: int, t1: float, v2: int, t2: float, fresher: bool) -> None:
    assert is_fresher(v1, t1, v2, t2) is fresher


@settings(max_examples=200)
@given(seqs, seqs)
def test_freshness_is_antisymmetric(v1: int, v2: int) -> None:
    a, b = is_fresher(v1, 0.0, v2, 0.0), is_fresher(v2, 0.0, v1, 0.0)
    if v1 == v2 or abs(v1 - v2) == HALF:
        assert not a
        assert not b
    else:
        assert a != b


@settings(max_examples=200)
@given(seqs, st.integers(1, HALF - 1))
def test_counting_forward_modulo_is_fresher(v: int, step: int) -> None:
    assert is_fresher(v, 0.0, (v + step) % SEQ_MODULUS, 0.0)
    assert not is_fresher((v + step) % SEQ_MODULUS, 0.0, v, 0.0)


@pytest.mark.parametrize(
    ("seq", "raw"),
    [
        (0, b""),
        (1, b"\x01"),
        (255, b"\xff"),
        (256, b"\x01\x00"),
        (TOP, b"\xff\xff\xff"),
        (SEQ_MODULUS, b""),  # reduced modulo 2**24
        (SEQ_MODULUS + 5, b"\x05"),
    ],
)
def test_observe_bytes(seq: int, raw: bytes) -> None:
    assert observe_bytes(seq) == raw


@settings(max_examples=200)
@given(seqs)
def test_observe_value_round_trip(seq: int) -> None:
    raw = observe_bytes(seq)
    assert len(raw) <= 3
    assert observe_value(raw) == seq


def test_observe_value_accepts_leading_zeros_and_ignores_over_long() -> None:
    assert observe_value(b"\x00\x00\x07") == 7
    assert observe_value(b"\x00\x00\x00\x07") is None


def test_order_accepts_first_then_only_fresher() -> None:
    order = NotificationOrder()
    assert order.accept(100, 0.0)  # the registration response
    assert order.accept(101, 1.0)
    assert not order.accept(101, 1.5)  # duplicate
    assert not order.accept(99, 2.0)  # reordered, older
    assert order.accept(103, 3.0)
    assert not order.accept(102, 3.1)  # arrived after a newer one
    assert order.accept(102, 131.5)  # more than 128 s after the last accepted one
    assert not order.accept(101, 131.6)  # 102 at 131.5 is now the reference
    assert order.accept(103, 131.7)


def test_order_wraps_around() -> None:
    order = NotificationOrder()
    assert order.accept(TOP - 1, 0.0)
    assert order.accept(TOP, 1.0)
    assert order.accept(0, 2.0)
    assert not order.accept(TOP, 3.0)
    assert order.accept(1, 4.0)


def test_order_reliable_takes_latest_as_freshest() -> None:
    order = NotificationOrder(reliable=True)
    assert order.reliable
    assert order.accept(5, 0.0)
    assert order.accept(5, 0.0)
    assert order.accept(0, 1.0)  # RFC 8323 7.1: the value is ignored
    assert NotificationOrder().reliable is False


def _observe_traffic(name: str) -> tuple[list[int], dict[bytes, list[tuple[float, int]]]]:
    """The server's GET Observe values, and per token the (arrival time, Observe value) of
    each 2.05 with Observe from the client (the registration response, then notifications)."""
    lines = (VECTORS / name).read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    server_port = records[0]["dst_port"]  # the first datagram is the client's Register
    requests: list[int] = []
    notes: dict[bytes, list[tuple[float, int]]] = {}
    for rec in records:
        msg = decode(bytes.fromhex(rec["hex"]))
        raw = msg.option(OptionNumber.OBSERVE)
        if raw is None:
            continue
        value = observe_value(raw)
        assert value is not None
        if rec["dst_port"] != server_port:
            assert msg.code == Code.GET
            requests.append(value)
        elif msg.code == Code.CONTENT:
            notes.setdefault(msg.token, []).append((rec["t"], value))
    return requests, notes


@pytest.mark.parametrize(
    "name",
    [
        "anjay-client-udp.jsonl",
        "wakaama-client-udp.jsonl",
        "wakaama-client-udp-queue-full.jsonl",
        "wakaama-client-udp-queue-v10.jsonl",
    ],
)
def test_real_client_observations(name: str) -> None:
    requests, notes = _observe_traffic(name)
    assert requests[0] == OBSERVE_REGISTER
    assert requests[-1] == OBSERVE_DEREGISTER
    assert notes
    for sequence in notes.values():
        assert len(sequence) >= 2
        order = NotificationOrder()
        assert all(order.accept(value, t) for t, value in sequence)
        # replayed within 128 s, every earlier notification is now stale
        t_end = sequence[-1][0]
        assert not any(order.accept(value, t_end + 1.0) for _, value in sequence)
        # ... but not after 128 s of silence
        assert order.accept(sequence[0][1], t_end + 200.0)
