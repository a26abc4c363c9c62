"""Handshakes and application data both ways: python-mbedtls (Mbed TLS 2.28, an independent
implementation) and our own client against `DtlsServer`, all in memory; flight timers in
explicit time (RFC 6347 §4.2.4)."""

from __future__ import annotations

import pytest

pytest.importorskip("mbedtls")

from dm_actor.dtls import (
    ApplicationData,
    DatagramToSend,
    DtlsClient,
    DtlsServer,
    HandshakeFailed,
    LocalProtocolError,
    SessionClosed,
    SessionEstablished,
)
from dm_actor.dtls.messages import HandshakeType
from dm_actor.dtls.record import ContentType, split_records
from tests.dtls.mbed import MbedClient, mbed_handshake
from tests.dtls.peers import (
    CLIENT,
    IDENTITY,
    KEY,
    SERVER,
    app_data,
    contents,
    datagrams,
    established,
    our_handshake,
)


def make_server(**kwargs: object) -> DtlsServer:
    keys = {IDENTITY: KEY}
    return DtlsServer(keys.get, **kwargs)  # type: ignore[arg-type]


def test_mbedtls_client_handshake_and_application_data_both_ways() -> None:
    server = make_server()
    client = MbedClient()
    events = mbed_handshake(server, client)
    assert client.established and client.error is None
    (done,) = established(events)
    session = done.session
    assert session.identity == IDENTITY and session.address == CLIENT and session.cid == b""
    assert server.statistics().hello_verify_requests == 1
    # The server's final flight reached the client; now CoAP-sized data both ways.
    up = client.write(b"\x40\x01\x12\x34coap")
    assert app_data(server.receive(up, CLIENT, 1.0)) == [b"\x40\x01\x12\x34coap"]
    down = server.send(session, b"\x60\x45\x12\x34answer")
    assert client.read(down) == b"\x60\x45\x12\x34answer"
    for i in range(100):
        payload = bytes([i]) * (i * 10)
        assert client.read(server.send(session, payload)) == payload
        assert app_data(server.receive(client.write(payload + b"!"), CLIENT, 2.0)) == [
            payload + b"!"
        ]
    stats = server.statistics()
    assert stats.sessions == 1 and stats.handshakes == 0 and stats.records_dropped == 0


def test_mbedtls_client_close_notify_ends_the_session() -> None:
    server = make_server()
    client = MbedClient()
    (done,) = established(mbed_handshake(server, client))
    client.buffer.shutdown()
    events = server.receive(client.outgoing(), CLIENT, 1.0)
    assert [type(e) for e in events] == [SessionClosed]
    assert server.session_at(CLIENT) is None and done.session.closed
    with pytest.raises(LocalProtocolError):
        server.send(done.session, b"late")


def test_our_client_with_and_without_connection_id() -> None:
    for cid in (None, b"", b"\x01\x02\x03"):
        server = make_server()
        client = DtlsClient(SERVER, IDENTITY, KEY, connection_id=cid)
        events = our_handshake(server, client)
        assert len(established(events)) == 2
        session = server.session_at(CLIENT)
        assert session is not None and client.session is not None
        assert bool(session.cid) == (cid is not None)
        assert client.session.cid == (cid or b"")
        assert app_data(server.receive(client.send(b"up"), CLIENT, 1.0)) == [b"up"]
        assert app_data(client.receive(server.send(session, b"down"), 1.0)) == [b"down"]
        closing = server.close(session)
        assert closing is not None and server.close(session) is None
        assert [type(e) for e in client.receive(closing, 1.0)] == [SessionClosed]


def test_our_client_without_extended_master_secret() -> None:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, KEY, extended_master_secret=False)
    assert len(established(our_handshake(server, client))) == 2
    session = server.session_at(CLIENT)
    assert session is not None
    assert app_data(client.receive(server.send(session, b"x"), 0.0)) == [b"x"]


def test_server_flight_is_retransmitted_with_doubling_timer_then_abandoned() -> None:
    server = make_server(handshake_timeout=20.0)
    client = DtlsClient(SERVER, IDENTITY, KEY)
    hello = datagrams(client.connect(0.0))[0]
    verify = datagrams(server.receive(hello, CLIENT, 0.0))[0]
    hello2 = datagrams(client.receive(verify, 0.0))[0]
    flight = datagrams(server.receive(hello2, CLIENT, 0.0))[0]
    # The flight is "lost": the server resends it at 1, 3, 7, 15 s (1 s doubling), gives up at 20.
    times = []
    now = 0.0
    while (when := server.get_timer()) is not None:
        now = when
        events = server.handle_timer(now)
        if datagrams(events):
            (resent,) = datagrams(events)
            assert contents(resent) == contents(flight) and resent != flight  # new record numbers
            times.append(now)
        else:
            assert [type(e) for e in events] == [HandshakeFailed]
    assert times == [1.0, 3.0, 7.0, 15.0] and now == 20.0
    stats = server.statistics()
    assert stats.handshakes == 0 and stats.retransmissions == 4 and stats.handshakes_failed == 1


def test_timer_caps_at_max_retransmit() -> None:
    server = make_server(handshake_timeout=1000.0, max_retransmit=60.0)
    client = DtlsClient(SERVER, IDENTITY, KEY)
    hello = datagrams(client.connect(0.0))[0]
    hello2 = datagrams(client.receive(datagrams(server.receive(hello, CLIENT, 0.0))[0], 0.0))[0]
    server.receive(hello2, CLIENT, 0.0)
    gaps, last = [], 0.0
    for _ in range(9):
        when = server.get_timer()
        assert when is not None
        server.handle_timer(when)
        gaps.append(when - last)
        last = when
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_lost_final_flight_is_resent_when_the_client_repeats_its_flight() -> None:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, KEY)
    hello = datagrams(client.connect(0.0))[0]
    hello2 = datagrams(client.receive(datagrams(server.receive(hello, CLIENT, 0.0))[0], 0.0))[0]
    flight4 = datagrams(server.receive(hello2, CLIENT, 0.0))[0]
    flight5 = datagrams(client.receive(flight4, 0.0))[0]
    events = server.receive(flight5, CLIENT, 0.0)
    final = datagrams(events)[0]
    assert established(events)
    # Our Finished is lost; the client's timer repeats its flight (new record numbers).
    repeat = datagrams(client.handle_timer(1.0))[0]
    assert repeat != flight5
    again = server.receive(repeat, CLIENT, 1.0)
    (final_again,) = datagrams(again)
    assert contents(final_again) == contents(final) and not established(again)
    assert established(client.receive(final_again, 1.0))
    assert client.session is not None and client.get_timer() is None


def test_client_repeats_its_flight_when_the_server_repeats_its_own() -> None:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, KEY)
    hello = datagrams(client.connect(0.0))[0]
    hello2 = datagrams(client.receive(datagrams(server.receive(hello, CLIENT, 0.0))[0], 0.0))[0]
    flight4 = datagrams(server.receive(hello2, CLIENT, 0.0))[0]
    (flight5,) = datagrams(client.receive(flight4, 0.0))
    # flight5 is lost; the server's timer repeats flight 4, and the client answers with flight 5.
    (repeat4,) = datagrams(server.handle_timer(1.0))
    (repeat5,) = datagrams(client.receive(repeat4, 1.0))
    assert contents(repeat5)[:2] == contents(flight5)[:2] and repeat5 != flight5
    events = server.receive(repeat5, CLIENT, 1.0)
    assert established(events)
    assert established(client.receive(datagrams(events)[0], 1.0))


def test_client_retransmits_its_hello_and_gives_up_at_the_deadline() -> None:
    client = DtlsClient(SERVER, IDENTITY, KEY, handshake_timeout=10.0)
    first = datagrams(client.connect(0.0))[0]
    resent = []
    while (when := client.get_timer()) is not None:
        events = client.handle_timer(when)
        resent += [(when, d) for d in datagrams(events)]
        if any(isinstance(e, HandshakeFailed) for e in events):
            break
    assert [w for w, _ in resent] == [1.0, 3.0, 7.0]
    assert all(contents(d) == contents(first) and d != first for _, d in resent)


def test_new_handshake_from_the_same_address_replaces_the_session() -> None:
    server = make_server()
    first = DtlsClient(SERVER, IDENTITY, KEY)
    (old, _) = established(our_handshake(server, first))
    # The device rebooted and lost its state: a fresh handshake from the same address.
    second = DtlsClient(SERVER, IDENTITY, KEY)
    events = our_handshake(server, second)
    new = [e for e in established(events) if e.replaced is not None]
    assert len(new) == 1 and new[0].replaced is old.session and old.session.closed
    assert server.session_at(CLIENT) is new[0].session
    assert server.statistics().sessions == 1
    # The old session's records no longer authenticate.
    assert first.session is not None
    assert app_data(server.receive(first.send(b"stale"), CLIENT, 1.0)) == []


def test_renegotiation_is_refused_with_a_warning() -> None:
    server = make_server()
    client = DtlsClient(SERVER, IDENTITY, KEY)
    our_handshake(server, client)
    assert client.session is not None
    from dm_actor.dtls.messages import client_hello, handshake_message

    hello = handshake_message(
        HandshakeType.CLIENT_HELLO, 9, client_hello(bytes(32), b"", [], 0xFEFD)
    )
    events = server.receive(client.session.seal(ContentType.HANDSHAKE, hello), CLIENT, 1.0)
    (reply,) = datagrams(events)
    (record,), _ = split_records(reply, 0)
    assert client.session is not None
    assert client.session.open(record) == (ContentType.ALERT, b"\x01\x64")  # no_renegotiation
    assert server.session_at(CLIENT) is not None  # still up
    assert app_data(server.receive(client.send(b"still"), CLIENT, 1.0)) == [b"still"]


def test_events_are_typed_and_addressed() -> None:
    server = make_server()
    events = our_handshake(server, DtlsClient(SERVER, IDENTITY, KEY))
    for event in events:
        assert isinstance(event, DatagramToSend | SessionEstablished | ApplicationData)
