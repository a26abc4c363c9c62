"""The one declaration of a peer's socket address, for every layer.

A module of its own at the bottom of the import layers (below `coap`): the transports produce
addresses, the actors and the pure device machine key devices by them, the API reports its
listening address, and none of them must import another's module for the type. Pure: typing
only.
"""

from __future__ import annotations

#: A socket address as `recvfrom` and `getpeername` return it: (host, port) for IPv4,
#: (host, port, flowinfo, scope_id) for IPv6.
Address = tuple[str, int] | tuple[str, int, int, int]

#: The host part of a DTLS session's address (`session_address`): not an IP address, so no
#: datagram of plain CoAP can ever come from one.
SESSION_HOST = "dtls"


def session_address(number: int) -> tuple[str, int]:
    """The address by which the layers above DTLS know session `number` of the coaps socket.

    A device secured by DTLS is keyed by its session, not by its socket address: the session
    outlives a change of the peer's address (RFC 9146 Connection ID), and a datagram that did
    not authenticate on the session never reaches the device. The upper layers need nothing
    new for it: they route, bind and send by an `Address` as for plain UDP, and the transport
    maps the session address to the session (docs/architecture.md, "The DTLS layer").
    """
    return (SESSION_HOST, number)


def is_session(addr: Address) -> bool:
    """Whether `addr` names a DTLS session (see `session_address`)."""
    return addr[0] == SESSION_HOST
