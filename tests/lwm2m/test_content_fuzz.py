"""Hostile payloads: every decoder either returns well-formed values or raises
ContentDecodeError, never anything else, for random bytes and for mutations of real payloads
(the captured Wakaama/Anjay bodies plus one encoding of each format that has no capture)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.message import decode as decode_message
from dm_actor.coap.numbers import OptionNumber
from dm_actor.lwm2m.content import (
    CODECS,
    ContentDecodeError,
    ObjLink,
    ResourceValue,
    UnsupportedContentFormat,
    decode,
    encode,
)
from dm_actor.lwm2m.content.values import path_ids

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
BASES = [None, "/3", "/3/0", "/3/0/6", "/3/0/6/1"]
SAMPLE = [
    ResourceValue("/3/0/0", "Open Mobile Alliance"),
    ResourceValue("/3/0/6/0", 1),
    ResourceValue("/3/0/6/1", 5),
    ResourceValue("/3/0/9", -2.5, 12.0),
    ResourceValue("/3/0/20", True),
    ResourceValue("/3/0/21", b"\x00\xff"),
    ResourceValue("/3/0/22/0", ObjLink(33606, 0)),
]


def _captured() -> list[bytes]:
    bodies = []
    for path in sorted(VECTORS.glob("*-udp*.jsonl")):
        for line in path.read_text().splitlines()[1:]:
            msg = decode_message(bytes.fromhex(json.loads(line)["hex"]))
            content_format = dict(msg.options).get(OptionNumber.CONTENT_FORMAT)
            if msg.payload and content_format not in (None, b"\x28"):  # not link-format
                bodies.append(msg.payload)
    return bodies


SEEDS = [
    *_captured(),
    *(encode(cf, SAMPLE, "/3/0") for cf in (11542, 110, 112, 11543, 11544)),
    encode(60, [SAMPLE[3]]),
]


def _check(content_format: int, payload: bytes, base: str | None) -> None:
    try:
        values = decode(content_format, payload, base)
    except ContentDecodeError:
        return
    for value in values:
        assert isinstance(value, ResourceValue)
        assert 1 <= len(path_ids(value.path)) <= 4
        assert value.value is None or isinstance(value.value, int | float | str | bytes | ObjLink)
        assert value.time is None or isinstance(value.time, float)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        pos = rng.randrange(len(buf) + 1)
        if choice == 0 and buf:
            buf[pos % len(buf)] ^= 1 << rng.randrange(8)
        elif choice == 1 and buf:
            buf[pos % len(buf)] = rng.randrange(256)
        elif choice == 2:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif choice == 3:
            del buf[pos : pos + rng.randint(1, 3)]
        else:
            buf = buf[:pos]
    return bytes(buf)


def test_seeds_decode_somewhere() -> None:
    # at least 37 content answers, 4 text writes (more as captures are added), 6 encodings
    assert len(SEEDS) >= 47
    for seed in SEEDS:
        assert any(_decodes(cf, seed, base) for cf in CODECS for base in ("/3/0", "/3/0/9"))


def _decodes(content_format: int, payload: bytes, base: str) -> bool:
    try:
        decode(content_format, payload, base)
    except ContentDecodeError:
        return False
    return True


@pytest.mark.parametrize("content_format", sorted(CODECS))
def test_mutated_real_payloads(content_format: int) -> None:
    rng = random.Random(content_format)
    for seed in SEEDS:
        for _ in range(60):
            payload = _mutate(seed, rng)
            for base in BASES:
                _check(content_format, payload, base)
        for cut in range(len(seed)):
            _check(content_format, seed[:cut], "/3/0")


@settings(max_examples=300)
@given(
    content_format=st.sampled_from(sorted(CODECS)),
    payload=st.binary(max_size=64),
    base=st.sampled_from(BASES),
)
def test_random_bytes(content_format: int, payload: bytes, base: str | None) -> None:
    _check(content_format, payload, base)


@settings(max_examples=100)
@given(content_format=st.integers(0, 65535).filter(lambda n: n not in CODECS))
def test_unknown_formats_raise_unsupported(content_format: int) -> None:
    with pytest.raises(UnsupportedContentFormat):
        decode(content_format, b"x", "/3/0/0")


def test_deep_cbor_nesting_is_a_decode_error() -> None:
    for cf in (60, 112, 11544):
        _check(cf, b"\x81" * 100_000, "/3/0/1")
        _check(cf, b"\xa1\x01" * 50_000 + b"\x01", "/3/0/1")
    _check(110, b"[" * 100_000, None)
    _check(11543, b'{"e":' + b"[" * 100_000, None)
