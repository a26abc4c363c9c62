"""The internal link's frames (dm_actor.cluster.wire): round trips, tampering, bounds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.cluster import wire
from dm_actor.cluster.wire import BACKWARD, FORWARD, UNREACHABLE, WireError

if TYPE_CHECKING:
    from dm_actor.address import Address

KEY = wire.link_key(b"cluster secret")

ipv4 = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
ipv4_addr = st.builds(
    lambda octets, port: (".".join(map(str, octets)), port), ipv4, st.integers(0, 65535)
)
ipv6_host = st.sampled_from(
    ["::1", "2001:db8::7", "fe80::1%lo", "fe80::aa:bb%eth0", "::ffff:10.0.0.1", "::"]
)
ipv6_addr = st.tuples(
    ipv6_host, st.integers(0, 65535), st.integers(0, 2**20 - 1), st.integers(0, 2**32 - 1)
)
addresses = st.one_of(ipv4_addr, ipv6_addr)
senders = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
kinds = st.sampled_from([FORWARD, BACKWARD])


@settings(max_examples=300)
@given(kinds, senders, addresses, st.binary(max_size=wire.MAX_PAYLOAD))
def test_round_trip(kind: int, sender: str, addr: tuple[str, int], payload: bytes) -> None:
    frame = wire.encode(kind, sender, addr, payload, KEY)
    assert len(frame) <= wire.MAX_FRAME
    assert wire.decode(frame, KEY) == (kind, sender, addr, payload)


@given(senders, addresses)
def test_unreachable_round_trip(sender: str, addr: tuple[str, int]) -> None:
    frame = wire.encode(UNREACHABLE, sender, addr, b"", KEY)
    assert wire.decode(frame, KEY) == (UNREACHABLE, sender, addr, b"")


def test_the_address_text_is_kept_exactly() -> None:
    # the owner must key the device by exactly what the ingress socket reported
    cases: list[Address] = [
        ("::ffff:127.0.0.1", 5683, 0, 0),
        ("fe80::1%lo", 1, 0, 1),
        ("127.0.0.1", 9),
    ]
    for addr in cases:
        assert wire.decode(wire.encode(FORWARD, "a", addr, b"x", KEY), KEY).addr == addr


@settings(max_examples=300)
@given(kinds, addresses, st.binary(max_size=64), st.data())
def test_any_changed_byte_is_refused(
    kind: int, addr: tuple[str, int], payload: bytes, data: st.DataObject
) -> None:
    frame = bytearray(wire.encode(kind, "node-a", addr, payload, KEY))
    index = data.draw(st.integers(0, len(frame) - 1))
    frame[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(WireError):
        wire.decode(bytes(frame), KEY)


@given(st.binary(max_size=wire.MAX_FRAME + 10))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        wire.decode(data, KEY)


@given(addresses, st.binary(max_size=64), st.integers(1, 40))
def test_truncated_or_extended_frames_are_refused(
    addr: tuple[str, int], payload: bytes, cut: int
) -> None:
    frame = wire.encode(FORWARD, "node-a", addr, payload, KEY)
    with pytest.raises(WireError):
        wire.decode(frame[:-cut], KEY)
    with pytest.raises(WireError):
        wire.decode(frame + b"\0" * cut, KEY)


def test_another_key_is_refused() -> None:
    frame = wire.encode(FORWARD, "a", ("127.0.0.1", 5683), b"hello", KEY)
    with pytest.raises(WireError) as caught:
        wire.decode(frame, wire.link_key(b"another secret"))
    assert caught.value.reason == "mac"
    assert wire.link_key(b"cluster secret") != b"cluster secret"


def _signed(body: bytes) -> bytes:
    return body + wire._mac(KEY, body)


@pytest.mark.parametrize(
    ("family", "host", "reason"),
    [
        (4, b"localhost", "address"),
        (4, b"1.2.3.256", "address"),
        (4, b"01.2.3.4", "address"),
        (4, b"1.2.3.4 ", "address"),
        (6, b"example.com", "address"),
        (6, b"fe80::1%eth0 x", "address"),
        (6, b"\xff::1", "address"),
        (5, b"1.2.3.4", "address"),
    ],
)
def test_authenticated_frames_with_bad_addresses_are_refused(
    family: int, host: bytes, reason: str
) -> None:
    # a node holding the secret cannot make its peer resolve a name either
    head = wire._HEAD.pack(wire.MAGIC, wire.VERSION, FORWARD, 1, family, len(host), 5683, 0.0)
    v6 = wire._V6.pack(0, 0) if family == 6 else b""
    with pytest.raises(WireError) as caught:
        wire.decode(_signed(head + v6 + b"a" + host + b"payload"), KEY)
    assert caught.value.reason == reason


def test_authenticated_frames_of_unknown_kinds_or_versions_are_refused() -> None:
    head = wire._HEAD.pack(wire.MAGIC, wire.VERSION, 9, 1, 4, 9, 5683, 0.0)
    with pytest.raises(WireError, match="kind"):
        wire.decode(_signed(head + b"a127.0.0.1x"), KEY)
    head = wire._HEAD.pack(wire.MAGIC, 1, FORWARD, 1, 4, 9, 5683, 0.0)
    with pytest.raises(WireError, match="version"):
        wire.decode(_signed(head + b"a127.0.0.1x"), KEY)
    frame = wire.encode(UNREACHABLE, "a", ("127.0.0.1", 1), b"", KEY)
    head = wire._HEAD.pack(wire.MAGIC, wire.VERSION, UNREACHABLE, 1, 4, 9, 1, 0.0)
    assert _signed(head + b"a127.0.0.1") == frame
    with pytest.raises(WireError, match="no payload"):
        wire.decode(_signed(head + b"a127.0.0.1x"), KEY)


def test_encode_refuses_what_it_cannot_frame() -> None:
    with pytest.raises(ValueError, match="over"):
        wire.encode(FORWARD, "a", ("127.0.0.1", 1), b"x" * (wire.MAX_PAYLOAD + 1), KEY)
    with pytest.raises(ValueError, match="kind"):
        wire.encode(7, "a", ("127.0.0.1", 1), b"", KEY)
    with pytest.raises(ValueError, match="too long"):
        wire.encode(FORWARD, "a" * 65, ("127.0.0.1", 1), b"", KEY)
    with pytest.raises(ValueError, match="address"):
        wire.encode(FORWARD, "a", ("127.0.0.1", 70000), b"", KEY)
    longest = wire.encode(FORWARD, "n" * 64, ("f" * 64, 1, 0, 0), b"x" * wire.MAX_PAYLOAD, KEY)
    assert len(longest) == wire.MAX_FRAME
