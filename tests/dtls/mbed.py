"""python-mbedtls (Mbed TLS 2.28) as an independent in-process DTLS 1.2 PSK client: its
client over memory buffers. Import it after `pytest.importorskip("mbedtls")`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mbedtls import tls
from mbedtls.exceptions import TLSError

from tests.dtls.peers import CLIENT, IDENTITY, KEY, datagrams

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.dtls import DtlsServer, Event


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
