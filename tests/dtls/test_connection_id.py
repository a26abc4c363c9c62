"""RFC 9146 Connection IDs: a device whose NAT binding changes keeps its session; the server
finds it by CID and moves its address only once a record authenticates."""

from __future__ import annotations

from dm_actor.dtls import (
    DtlsClient,
    DtlsServer,
    SessionAddressChanged,
    SessionClosed,
)
from dm_actor.dtls.record import ContentType, split_records
from tests.dtls.peers import CLIENT, IDENTITY, KEY, SERVER, app_data, our_handshake

MOVED = ("127.0.0.77", 51000)


def cid_pair(cid: bytes = b"") -> tuple[DtlsServer, DtlsClient]:
    keys = {IDENTITY: KEY}
    server = DtlsServer(keys.get, cid_length=6)
    client = DtlsClient(SERVER, IDENTITY, KEY, connection_id=cid)
    our_handshake(server, client)
    assert client.session is not None
    return server, client


def test_records_carry_the_cid_and_the_tls12_cid_type() -> None:
    server, client = cid_pair()
    session = server.session_at(CLIENT)
    assert session is not None and len(session.cid) == 6
    data = client.send(b"hello")
    (record,), _ = split_records(data, 6)
    assert record.type == ContentType.TLS12_CID and record.cid == session.cid
    # The server -> client direction uses the client's (empty) CID: the classic format.
    (down,), _ = split_records(server.send(session, b"x"), 0)
    assert down.type == ContentType.APPLICATION_DATA


def test_address_change_keeps_the_session_and_reports_it() -> None:
    server, client = cid_pair()
    session = server.session_at(CLIENT)
    assert session is not None
    events = server.receive(client.send(b"from the new binding"), MOVED, 5.0)
    assert [type(e) for e in events] == [SessionAddressChanged, type(events[1])]
    moved = events[0]
    assert isinstance(moved, SessionAddressChanged)
    assert moved.session is session and moved.old_address == CLIENT
    assert app_data(events) == [b"from the new binding"]
    assert session.address == MOVED
    assert server.session_at(MOVED) is session and server.session_at(CLIENT) is None
    # Later records from the new address are plain application data; answers go there.
    assert app_data(server.receive(client.send(b"again"), MOVED, 6.0)) == [b"again"]
    assert app_data(client.receive(server.send(session, b"down"), 6.0)) == [b"down"]
    assert server.statistics().sessions == 1


def test_forged_or_replayed_cid_records_do_not_move_the_session() -> None:
    server, client = cid_pair()
    session = server.session_at(CLIENT)
    assert session is not None
    older = client.send(b"older")
    newer = client.send(b"newer")
    assert app_data(server.receive(newer, CLIENT, 1.0)) == [b"newer"]
    # A late, older record from elsewhere authenticates but is not the newest: no move.
    events = server.receive(older, MOVED, 2.0)
    assert app_data(events) == [b"older"] and session.address == CLIENT
    # A replay from elsewhere: dropped, no move.
    assert server.receive(newer, MOVED, 3.0) == [] and session.address == CLIENT
    # A forged record with the right CID but a bad tag: dropped, no move.
    forged = bytearray(client.send(b"forged"))
    forged[-1] ^= 0xFF
    assert server.receive(bytes(forged), MOVED, 4.0) == [] and session.address == CLIENT
    assert server.statistics().records_dropped == 2


def test_cid_record_from_an_address_a_session_without_cid_holds_does_not_move_or_end_it() -> None:
    """The session at that address is found by its address alone: a (spoofable) source
    address must not end it. The CID session's data is delivered; it stays where it was
    until a record comes from a free address."""
    keys = {IDENTITY: KEY}
    server = DtlsServer(keys.get)
    mover = DtlsClient(SERVER, IDENTITY, KEY, connection_id=b"")
    our_handshake(server, mover)
    holder = DtlsClient(SERVER, IDENTITY, KEY)
    our_handshake(server, holder, address=MOVED)
    there = server.session_at(MOVED)
    assert mover.session is not None and there is not None
    events = server.receive(mover.send(b"moved"), MOVED, 1.0)
    assert app_data(events) == [b"moved"]
    assert not [e for e in events if isinstance(e, (SessionClosed, SessionAddressChanged))]
    assert server.session_at(MOVED) is there and not there.closed
    assert app_data(server.receive(holder.send(b"still"), MOVED, 2.0)) == [b"still"]
    assert server.statistics().sessions == 2


def test_client_cid_is_used_by_the_server() -> None:
    server, client = cid_pair(cid=b"\xaa\xbb\xcc")
    session = server.session_at(CLIENT)
    assert session is not None
    (down,), _ = split_records(server.send(session, b"to the cid"), 3)
    assert down.type == ContentType.TLS12_CID and down.cid == b"\xaa\xbb\xcc"
    assert app_data(client.receive(server.send(session, b"again"), 1.0)) == [b"again"]
    closing = client.close()
    assert closing is not None
    assert [type(e) for e in server.receive(closing, CLIENT, 2.0)] == [SessionClosed]
    assert server.statistics().sessions == 0 and server._by_cid == {}
