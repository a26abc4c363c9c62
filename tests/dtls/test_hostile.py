"""Hostile input against `DtlsServer`: each trap of dtls-notes.md a test. Nothing raises out
of `receive`, nothing is allocated before a valid cookie, every table stays bounded."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("mbedtls")

from dm_actor.dtls import DtlsClient, DtlsServer, HandshakeFailed, SessionEstablished
from dm_actor.dtls.messages import (
    HandshakeType,
    client_hello,
    handshake_message,
)
from dm_actor.dtls.record import ContentType, plaintext_record, seal, split_records
from tests.dtls.mbed import MbedClient, mbed_handshake
from tests.dtls.peers import (
    CLIENT,
    IDENTITY,
    KEY,
    SERVER,
    app_data,
    datagrams,
    established,
    our_handshake,
)

if TYPE_CHECKING:
    from dm_actor.address import Address


def make_server(**kwargs: object) -> DtlsServer:
    keys = {IDENTITY: KEY}
    return DtlsServer(keys.get, **kwargs)  # type: ignore[arg-type]


def alerts(data: bytes) -> list[bytes]:
    records, _ = split_records(data, 0)
    return [r.fragment for r in records if r.type == ContentType.ALERT and r.epoch == 0]


def hello_datagram(random_bytes: bytes, cookie: bytes = b"", seq: int = 0) -> bytes:
    body = client_hello(random_bytes, cookie, [], 0xFEFD)
    message = handshake_message(HandshakeType.CLIENT_HELLO, 0, body)
    return plaintext_record(ContentType.HANDSHAKE, 0, seq, message)


def test_wrong_key_mbedtls_gets_decrypt_error_and_no_session() -> None:
    server = make_server()
    client = MbedClient(key=b"\x00" * 16)
    events = mbed_handshake(server, client)
    assert not client.established and client.error is not None
    (failed,) = [e for e in events if isinstance(e, HandshakeFailed)]
    assert failed.identity == IDENTITY
    assert alerts(datagrams(events)[-1]) == [b"\x02\x33"]  # fatal decrypt_error
    stats = server.statistics()
    assert stats.sessions == 0 and stats.handshakes == 0 and stats.handshakes_failed == 1


def test_wrong_key_our_client() -> None:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, b"\x00" * 16)
    events = our_handshake(server, client)
    assert not established(events) and client.session is None
    assert [e.reason for e in events if isinstance(e, HandshakeFailed)] == [
        "Finished does not authenticate",
        "server alert 51",
    ]


def test_unknown_identity_gets_unknown_psk_identity() -> None:
    server = make_server()
    client = MbedClient(identity="nobody")
    events = mbed_handshake(server, client)
    assert client.error is not None and not client.established
    (failed,) = [e for e in events if isinstance(e, HandshakeFailed)]
    assert failed.identity == b"nobody" and failed.reason == "unknown PSK identity"
    assert alerts(datagrams(events)[-1]) == [b"\x02\x73"]  # fatal unknown_psk_identity (115)
    assert server.statistics().handshakes == 0


def established_pair() -> tuple[DtlsServer, DtlsClient]:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, KEY)
    our_handshake(server, client)
    assert client.session is not None
    return server, client


def test_bad_mac_is_dropped_silently_and_counted() -> None:
    server, client = established_pair()
    good = bytearray(client.send(b"data"))
    good[-1] ^= 1
    assert server.receive(bytes(good), CLIENT, 1.0) == []
    assert server.statistics().records_dropped == 1
    assert server.session_at(CLIENT) is not None  # never a reset of the session
    assert app_data(server.receive(client.send(b"next"), CLIENT, 1.0)) == [b"next"]


def test_replayed_record_is_dropped() -> None:
    server, client = established_pair()
    record = client.send(b"once")
    assert app_data(server.receive(record, CLIENT, 1.0)) == [b"once"]
    assert server.receive(record, CLIENT, 1.0) == []
    assert server.statistics().records_dropped == 1


def test_truncated_records_are_dropped_at_every_length() -> None:
    server, client = established_pair()
    record = client.send(b"truncate me")
    for cut in range(len(record)):
        assert server.receive(record[:cut], CLIENT, 1.0) == []
    assert app_data(server.receive(record, CLIENT, 1.0)) == [b"truncate me"]


def test_unknown_epochs_are_dropped() -> None:
    server, _client = established_pair()
    for epoch in (2, 7, 0xFFFF):
        forged = seal(KEY, b"\x00" * 4, ContentType.APPLICATION_DATA, epoch, 1, b"x")
        assert server.receive(forged, CLIENT, 1.0) == []
    assert (
        server.receive(plaintext_record(ContentType.APPLICATION_DATA, 0, 5, b"x"), CLIENT, 1) == []
    )
    assert server.statistics().records_dropped == 4


def test_protected_records_from_strangers_are_dropped() -> None:
    server, client = established_pair()
    assert server.receive(client.send(b"x"), ("127.0.0.9", 1), 1.0) == []
    forged_cid = b"\x19\xfe\xfd\x00\x01" + bytes(6) + b"abcdef" + b"\x00\x10" + bytes(16)
    assert server.receive(forged_cid, CLIENT, 1.0) == []
    assert server.statistics().records_dropped == 2


def test_client_hello_flood_without_cookies_allocates_nothing() -> None:
    server = make_server()
    rng = random.Random(1)
    for i in range(5000):
        address: Address = (f"127.0.{i // 250}.{i % 250}", 1000 + i)
        (reply,) = datagrams(server.receive(hello_datagram(rng.randbytes(32)), address, 0.0))
        assert reply[13] == HandshakeType.HELLO_VERIFY_REQUEST
    stats = server.statistics()
    assert stats.hello_verify_requests == 5000
    assert stats.handshakes == 0 and stats.sessions == 0
    assert server._handshakes == {} and server._per_host == {} and server._timers == []
    # A wrong cookie is a new HelloVerifyRequest, not a handshake.
    server.receive(hello_datagram(bytes(32), b"\x00" * 16), CLIENT, 0.0)
    assert server.statistics().handshakes == 0


def cookie_for(server: DtlsServer, random_bytes: bytes, address: Address) -> bytes:
    (reply,) = datagrams(server.receive(hello_datagram(random_bytes), address, 0.0))
    return reply[13 + 12 + 3 :]


def test_half_open_handshakes_are_bounded_per_host_and_in_total() -> None:
    server = make_server(max_handshakes=20, max_handshakes_per_host=4)
    rng = random.Random(2)
    for host in range(10):
        for port in range(10):
            address: Address = (f"127.0.0.{host + 1}", 2000 + port)
            hello_random = rng.randbytes(32)
            cookie = cookie_for(server, hello_random, address)
            server.receive(hello_datagram(hello_random, cookie, 1), address, 0.0)
    stats = server.statistics()
    # the first host takes 10 (the per-host bound holds once the table is half full: behind a
    # carrier-grade NAT many devices share one address), the next ones 4 each, then it is full
    assert stats.handshakes == 20
    assert stats.handshakes_refused == 80
    assert sorted(server._per_host.values(), reverse=True) == [10, 4, 4, 2]
    # Their deadline frees every place.
    while (when := server.get_timer()) is not None:
        server.handle_timer(when)
    assert server.statistics().handshakes == 0 and server._per_host == {}
    # And a real client gets in again.
    assert len(established(our_handshake(server, DtlsClient(SERVER, IDENTITY, KEY)))) == 2


def test_cookie_secret_rotation_accepts_the_previous_secret_only() -> None:
    server = make_server(cookie_lifetime=100.0)
    server.receive(b"", CLIENT, 0.0)  # starts the rotation clock
    hello_random = bytes(range(32))
    cookie = cookie_for(server, hello_random, CLIENT)
    server.receive(b"", CLIENT, 150.0)  # one rotation: the old secret still counts
    server.receive(hello_datagram(hello_random, cookie, 1), CLIENT, 150.0)
    assert server.statistics().handshakes == 1
    other = bytes(32)
    stale = cookie_for(server, other, ("127.0.0.2", 1))
    server.receive(b"", CLIENT, 260.0)
    server.receive(b"", CLIENT, 370.0)  # two rotations: gone
    events = server.receive(hello_datagram(other, stale, 1), ("127.0.0.2", 1), 370.0)
    assert datagrams(events)[0][13] == HandshakeType.HELLO_VERIFY_REQUEST
    # And a cookie is bound to the address it was given to.
    events = server.receive(hello_datagram(hello_random, cookie, 1), ("127.0.0.3", 1), 370.0)
    assert datagrams(events)[0][13] == HandshakeType.HELLO_VERIFY_REQUEST


def test_fragments_that_never_complete_are_bounded_and_expire() -> None:
    server = make_server(handshake_timeout=10.0)
    client = DtlsClient(SERVER, IDENTITY, KEY)
    hello = datagrams(client.connect(0.0))[0]
    hello2 = datagrams(client.receive(datagrams(server.receive(hello, CLIENT, 0.0))[0], 0.0))[0]
    server.receive(hello2, CLIENT, 0.0)
    # A ClientKeyExchange announced as 4000 bytes, of which only byte 0 ever arrives...
    head = bytes((HandshakeType.CLIENT_KEY_EXCHANGE,)) + (4000).to_bytes(3, "big") + b"\x00\x02"
    fragment = head + b"\x00\x00\x00" + b"\x00\x00\x01" + b"\x00"
    for seq in range(2, 200):
        server.receive(plaintext_record(ContentType.HANDSHAKE, 0, seq, fragment), CLIENT, 1.0)
    hs = server._handshakes[CLIENT]
    assert hs.reassembly is not None and len(hs.reassembly.buffer) == 4000
    # ... and a message beyond the bound is refused outright.
    huge = bytes((HandshakeType.CLIENT_KEY_EXCHANGE,)) + (1 << 23).to_bytes(3, "big") + b"\x00\x02"
    hs.reassembly = None
    dropped = server.statistics().records_dropped
    server.receive(
        plaintext_record(ContentType.HANDSHAKE, 0, 300, huge + bytes(3) + b"\x00\x00\x01\x00"),
        CLIENT,
        1.0,
    )
    assert server.statistics().records_dropped == dropped + 1
    events = server.handle_timer(10.0)
    assert any(isinstance(e, HandshakeFailed) for e in events)
    assert server.statistics().handshakes == 0


def test_fragmented_client_hello_before_the_cookie_is_dropped() -> None:
    server = make_server()
    body = client_hello(bytes(32), b"", [], 0xFEFD)
    half = len(body) // 2
    head = bytes((HandshakeType.CLIENT_HELLO,)) + len(body).to_bytes(3, "big") + b"\x00\x00"
    first = head + b"\x00\x00\x00" + half.to_bytes(3, "big") + body[:half]
    assert server.receive(plaintext_record(ContentType.HANDSHAKE, 0, 0, first), CLIENT, 0) == []
    assert server.statistics().records_dropped == 1 and server.statistics().handshakes == 0


def test_no_common_suite_is_refused_after_the_cookie() -> None:
    server = make_server()
    body = bytearray(client_hello(bytes(32), b"", [], 0xFEFD))
    body[2 + 32 + 1 + 1 + 2 : 2 + 32 + 1 + 1 + 4] = b"\x00\x2f"  # TLS_RSA_WITH_AES_128_CBC_SHA

    def send(body: bytes, seq: int) -> list[bytes]:
        message = handshake_message(HandshakeType.CLIENT_HELLO, seq, body)
        record = plaintext_record(ContentType.HANDSHAKE, 0, seq, message)
        return datagrams(server.receive(record, CLIENT, 0.0))

    (verify,) = send(bytes(body), 0)
    cookie = verify[13 + 12 + 3 :]
    with_cookie = bytes(body[:35]) + bytes((len(cookie),)) + cookie + bytes(body[36:])
    (refusal,) = send(with_cookie, 1)
    assert alerts(refusal) == [b"\x02\x28"]  # handshake_failure
    assert server.statistics().handshakes == 0


def recorded_handshake() -> list[bytes]:
    """Every datagram our client sends in one handshake plus some application data."""
    server = make_server(random_bytes=random.Random(3).randbytes)
    client = DtlsClient(
        SERVER, IDENTITY, KEY, connection_id=b"", random_bytes=random.Random(4).randbytes
    )
    sent: list[bytes] = []
    pending = datagrams(client.connect(0.0))
    while pending:
        sent += pending
        replies: list[bytes] = []
        for data in pending:
            for reply in datagrams(server.receive(data, CLIENT, 0.0)):
                replies += datagrams(client.receive(reply, 0.0))
        pending = replies
    sent.append(client.send(b"coap"))
    return sent


RECORDED = recorded_handshake()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(RECORDED) - 1), st.integers(0, 2000), st.integers(0, 255)),
        max_size=6,
    ),
    st.integers(0, len(RECORDED)),
    st.sampled_from(["flip", "cut", "dup", "swap"]),
)
def test_mutated_handshakes_never_raise(
    mutations: list[tuple[int, int, int]], cut: int, mode: str
) -> None:
    server = make_server(random_bytes=random.Random(3).randbytes)
    datagrams_in = [bytearray(d) for d in RECORDED]
    for index, offset, value in mutations:
        target = datagrams_in[index]
        if mode == "flip" and target:
            target[offset % len(target)] = value
        elif mode == "cut":
            del target[offset % (len(target) + 1) :]
        elif mode == "dup":
            datagrams_in.insert(index, bytearray(target))
        else:
            datagrams_in.reverse()
    now = 0.0
    for data in datagrams_in[:cut] + datagrams_in:
        server.receive(bytes(data), CLIENT, now)
        now += 0.5
        server.handle_timer(now)
    stats = server.statistics()
    assert stats.handshakes <= 1 and stats.sessions <= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_datagrams_never_raise(data: bytes) -> None:
    server, client = established_pair()
    server.receive(data, CLIENT, 1.0)
    server.receive(b"\x16\xfe\xfd" + data, CLIENT, 1.0)
    client.receive(data, 1.0)
    assert server.session_at(CLIENT) is not None


def test_session_established_only_once_per_handshake() -> None:
    server = make_server()
    events = our_handshake(server, DtlsClient(SERVER, IDENTITY, KEY))
    assert sum(isinstance(e, SessionEstablished) for e in events) == 2  # one per side
