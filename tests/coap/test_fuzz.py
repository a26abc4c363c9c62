"""Deterministic mutation fuzzing of the datagram codec.

More than 100,000 inputs per run, derived with a seeded `random.Random` from the real interop
datagrams in tests/vectors: truncation at every length, bit flips, byte replacement, insertion,
deletion and splicing. The only exception `decode` and `check_options` may raise is
`DecodeError`; a datagram that decodes re-encodes to the same bytes (the wire format has one
encoding per message); the reply to an error is itself a well-formed datagram.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dm_actor.coap import framing_tcp
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message, check_options, decode, encode, reply_for
from dm_actor.coap.numbers import MessageType

if TYPE_CHECKING:
    from collections.abc import Iterator

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
SEED = 0x7252
MUTANTS_PER_KIND = 16_000
TCP_MUTANTS_PER_KIND = 4_000
MINIMUM_INPUTS = 100_000

# bytes that sit on the codec's decision points: nibbles 12..15, marker, empty
_INTERESTING = (0x00, 0x01, 0x0C, 0x0D, 0x0E, 0x0F, 0xC0, 0xD0, 0xE0, 0xF0, 0xFF, 0x7F, 0x80)


def _records(transport: str) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if json.loads(lines[0])["transport"] == transport:
            records.extend(json.loads(line) for line in lines[1:] if line)
    return records


def _seeds() -> list[bytes]:
    seeds = [bytes.fromhex(str(r["hex"])) for r in _records("udp")]
    # extended delta and length forms, which the captures never use
    seeds.append(
        encode(
            Message(MessageType.CON, 2, 0x1234, b"tok", ((13, b"a" * 13), (300, b"b" * 300)), b"p")
        )
    )
    return seeds


def _mutants(seeds: list[bytes], rng: random.Random, per_kind: int) -> Iterator[bytes]:
    for s in seeds:  # truncation at every length
        for n in range(len(s)):
            yield s[:n]
    for _ in range(per_kind):  # bit flips (1..4 bits)
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        yield bytes(b)
    for _ in range(per_kind):  # bit flip in the first 16 bytes, where the header is
        b = bytearray(rng.choice(seeds))
        b[rng.randrange(min(16, len(b)))] ^= 1 << rng.randrange(8)
        yield bytes(b)
    for _ in range(per_kind):  # byte replacement, random or on a decision point
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            pick = rng.randrange(256) if rng.random() < 0.5 else rng.choice(_INTERESTING)
            b[rng.randrange(len(b))] = pick
        yield bytes(b)
    for _ in range(per_kind):  # insertion
        s = rng.choice(seeds)
        i = rng.randrange(len(s) + 1)
        yield s[:i] + rng.randbytes(rng.randint(1, 4)) + s[i:]
    for _ in range(per_kind):  # deletion of a short run
        s = rng.choice(seeds)
        i = rng.randrange(len(s))
        yield s[:i] + s[i + rng.randint(1, 8) :]
    for _ in range(per_kind):  # splicing two inputs
        head, tail = rng.choice(seeds), rng.choice(seeds)
        yield head[: rng.randrange(len(head) + 1)] + tail[rng.randrange(len(tail) + 1) :]
    for _ in range(per_kind // 4):  # random header + random tail
        yield rng.randbytes(rng.randint(0, 40))


def _feed(data: bytes) -> bool:
    """Decode one input; True if it was accepted. Fails on any exception but DecodeError."""
    try:
        msg = decode(data)
    except DecodeError as err:
        _check_reply(err)
        return False
    if encode(msg) != data:
        pytest.fail(f"re-encoding differs for {data.hex()}")
    try:
        check_options(msg)
        _ = (msg.uri_path, msg.uri_query, msg.location_path)
        _ = (msg.content_format, msg.accept, msg.observe, msg.max_age)
    except DecodeError as err:
        _check_reply(err)
    return True


def _check_reply(err: DecodeError) -> None:
    assert isinstance(err.reply, Reply)
    answer = reply_for(err)
    if answer is not None:
        reply = decode(answer)
        assert reply.mtype in (MessageType.ACK, MessageType.RST)
        assert reply.mid == err.mid


def test_fuzz_decode() -> None:
    seeds = _seeds()
    assert len(seeds) > 100
    count = accepted = 0
    for data in _mutants(seeds, random.Random(SEED), MUTANTS_PER_KIND):
        count += 1
        try:
            accepted += _feed(data)
        except pytest.fail.Exception:
            raise
        except Exception as exc:  # the test's point: name the input that broke the codec
            pytest.fail(f"{type(exc).__name__}: {exc} on input {data.hex()}")
    assert count >= MINIMUM_INPUTS
    # the mutations must reach the parser's depths, not only its header checks
    assert count // 20 < accepted < count - count // 20


# -- RFC 8323 stream framing ----------------------------------------------------------------


def _stream_seeds() -> list[bytes]:
    """Each captured TCP segment, and each direction's whole stream."""
    records = _records("tcp")
    seeds = [bytes.fromhex(str(r["hex"])) for r in records]
    ports = sorted({int(str(r["src_port"])) for r in records})
    seeds.extend(
        b"".join(bytes.fromhex(str(r["hex"])) for r in records if r["src_port"] == port)
        for port in ports
    )
    return seeds


def _feed_stream(data: bytes, rng: random.Random) -> int:
    """Feed one stream in random chunks; returns the number of messages it yielded."""
    decoder = framing_tcp.StreamDecoder()
    out: list[Message] = []
    pos = 0
    try:
        while pos < len(data):
            step = rng.randint(1, 48)
            decoder.receive_data(data[pos : pos + step])
            pos += step
            while (msg := decoder.next_message()) is not None:
                out.append(msg)
    except DecodeError as err:
        if err.reply is not Reply.ABORT:
            pytest.fail(f"{err.reply} for a stream error on {data.hex()}")
    # frames come out in order from the stream's start, each exactly as it was on the wire
    consumed = b"".join(framing_tcp.encode(m) for m in out)
    if not data.startswith(consumed):
        pytest.fail(f"decoded frames do not re-encode to a prefix of {data.hex()}")
    return len(out)


def test_fuzz_stream_decoder() -> None:
    seeds = _stream_seeds()
    assert len(seeds) > 10
    rng = random.Random(SEED)
    count = frames = 0
    for data in _mutants(seeds, random.Random(SEED + 1), TCP_MUTANTS_PER_KIND):
        count += 1
        try:
            frames += _feed_stream(data, rng)
        except pytest.fail.Exception:
            raise
        except Exception as exc:  # name the input that broke the decoder
            pytest.fail(f"{type(exc).__name__}: {exc} on stream {data.hex()}")
    assert count >= 20_000
    assert frames > count
