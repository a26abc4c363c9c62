"""Drivers for the DTLS tests: python-mbedtls as an independent in-process client (its DTLS
client over memory buffers), and pumps between our server and a client, all in memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mbedtls import tls
from mbedtls.exceptions import TLSError

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


class MbedClient:
    """Mbed TLS 2.28's DTLS 1.2 client, PSK, TLS-PSK-WITH-AES-128-CCM-8 only."""

    def __init__(self, identity: str = IDENTITY.decode(), key: bytes = KEY) -> None:
        conf = tls.DTLSConfiguration(
            pre_shared_key=(identity, key),
            ciphers=("TLS-PSK-WITH-AES-128-CCM-8",),
            lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
            highest_supported_version=tls.DTLSVersion.DTLSv1_2,
            validate_certificates=False,
        )
        self.buffer = tls.ClientContext(conf).wrap_buffers(None)
        self.error: Exception | None = None

    def outgoing(self) -> bytes:
        data = self.buffer.peek_outgoing(65536)
        self.buffer.consume_outgoing(len(data))
        return data

    def step(self) -> bytes:
        """Advance the handshake as far as it goes; what it wants to send."""
        out = b""
        for _ in range(16):
            try:
                self.buffer.do_handshake()
            except tls.WantReadError:
                return out + self.outgoing()
            except tls.WantWriteError:
                pass
            except TLSError as error:
                self.error = error
                return out + self.outgoing()
            out += self.outgoing()
            if self.established:
                break
        return out

    @property
    def established(self) -> bool:
        return self.buffer._handshake_state.name == "HANDSHAKE_OVER"

    def write(self, data: bytes) -> bytes:
        self.buffer.write(data)
        return self.outgoing()

    def read(self, datagram: bytes) -> bytes:
        self.buffer.receive_from_network(datagram)
        try:
            return self.buffer.read(4096)
        except tls.WantReadError:
            return b""


def datagrams(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, DatagramToSend)]


def mbed_handshake(
    server: DtlsServer, client: MbedClient, address: Address = CLIENT, now: float = 0.0
) -> list[Event]:
    """Run the handshake in memory until it ends; every server event, in order."""
    seen: list[Event] = []
    out = client.step()
    for _ in range(10):
        if not out:
            break
        events = server.receive(out, address, now)
        seen += events
        for data in datagrams(events):
            client.buffer.receive_from_network(data)
        out = client.step()
        if client.established or client.error is not None:
            break
    return seen


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
