"""Drivers for the DTLS tests: pumps between our server and a client, all in memory (the
python-mbedtls client is in `tests/dtls/mbed.py`: no wheels past Python 3.12)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.dtls import (
    ApplicationData,
    DatagramToSend,
    DtlsClient,
    DtlsServer,
    Event,
    SessionEstablished,
)
from dm_actor.dtls.record import split_records

if TYPE_CHECKING:
    from dm_actor.address import Address

CLIENT: Address = ("127.0.0.1", 40000)
SERVER: Address = ("127.0.0.1", 5684)
IDENTITY = b"device-1"
KEY = bytes(range(16))


def datagrams(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, DatagramToSend)]


def our_handshake(
    server: DtlsServer, client: DtlsClient, address: Address = CLIENT, now: float = 0.0
) -> list[Event]:
    """Our client against our server, in memory; every event of both sides, in order."""
    seen: list[Event] = []
    pending = datagrams(client.connect(now))
    for _ in range(10):
        if not pending:
            break
        replies: list[bytes] = []
        for data in pending:
            events = server.receive(data, address, now)
            seen += events
            for reply in datagrams(events):
                client_events = client.receive(reply, now)
                seen += client_events
                replies += datagrams(client_events)
        pending = replies
    return seen


def contents(datagram: bytes) -> list[tuple[int, int, bytes]]:
    """(type, epoch, fragment) of each record: a flight's content whatever its record numbers
    (protected fragments differ by their nonce; compare only their type and epoch)."""
    records, _ = split_records(datagram, 0)
    return [(r.type, r.epoch, r.fragment if r.epoch == 0 else b"") for r in records]


def established(events: list[Event]) -> list[SessionEstablished]:
    return [e for e in events if isinstance(e, SessionEstablished)]


def app_data(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, ApplicationData)]
