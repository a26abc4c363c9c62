"""What `DtlsServer` and `DtlsClient` hand back: frozen events, in the order they happened.

Pure: no I/O. The caller sends every `DatagramToSend` and acts on the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.dtls.session import Session


@dataclass(frozen=True, slots=True)
class DatagramToSend:
    """A datagram the caller must send to `address` (a flight, a HelloVerifyRequest, an alert)."""

    address: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """A handshake completed: `session.identity` is authenticated by its PSK.

    `replaced` is the earlier session of the same address that this one ends (the peer lost
    its state and shook hands again), already removed from the server.
    """

    session: Session
    replaced: Session | None = None


@dataclass(frozen=True, slots=True)
class ApplicationData:
    """Decrypted application data (a CoAP message) that arrived on `session`."""

    session: Session
    data: bytes


@dataclass(frozen=True, slots=True)
class SessionAddressChanged:
    """A record with `session`'s Connection ID authenticated from a new address (RFC 9146):
    `session.address` is now the new one; the upper layer rebinds from `old_address`."""

    session: Session
    old_address: Address


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """`session` ended: the peer's close_notify or fatal alert (`reason` says which)."""

    session: Session
    reason: str


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A handshake from `address` was abandoned (`reason`: unknown identity, bad key,
    timeout, no common suite...). `identity` is set once the ClientKeyExchange named one."""

    address: Address
    reason: str
    identity: bytes | None = None


Event = (
    DatagramToSend
    | SessionEstablished
    | ApplicationData
    | SessionAddressChanged
    | SessionClosed
    | HandshakeFailed
)
