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
