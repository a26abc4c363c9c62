"""What every part of cluster mode reads about the cluster: which node owns a slot, where a
node is reached, and this node's name and secret (`ClusterView`).

The running node's view (`dm_actor.cluster.node`) follows the lease table the coordinator
reads every renewal; `StaticView` is a fixed table for tests and tools. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

#: A host and port: `("127.0.0.2", 7683)`.
HostPort = tuple[str, int]


class ClusterView(Protocol):
    """The cluster as this node last saw it."""

    #: this node's name
    node: str
    #: the number of slots endpoint names hash into (`dm_actor.cluster.slots`)
    slot_count: int
    #: the shared secret of the internal link and of internal HTTP calls
    secret: bytes

    def owner(self, slot: int) -> str | None:
        """The node holding `slot`'s lease, None while nobody does (a failover's gap)."""
        ...

    def mine(self, slot: int) -> bool:
        """Whether this node serves `slot` now (holds its lease, within its local
        deadline, and is not handing it over)."""
        ...

    def http_address(self, node: str) -> HostPort | None:
        """Where `node`'s HTTP API is reached; None for an unknown node."""
        ...

    def link_address(self, node: str) -> HostPort | None:
        """Where `node`'s internal UDP link is reached; None for an unknown node."""
        ...

    def live_nodes(self) -> Sequence[str]:
        """The nodes whose heartbeat is recent, this one included, sorted."""
        ...

    def coap_address(self, node: str) -> str | None:
        """The CoAP address `node`'s devices talk to (`host:port` as configured); nodes
        with the same one (SO_REUSEPORT, a VIP) answer from the same source address."""
        ...


@dataclass
class StaticView:
    """A `ClusterView` over a fixed table (tests, tools): `owners[slot]` is the slot's node."""

    node: str
    slot_count: int
    owners: dict[int, str]
    http: dict[str, HostPort] = field(default_factory=dict)
    links: dict[str, HostPort] = field(default_factory=dict)
    secret: bytes = b"test-secret"
    coap: dict[str, str] = field(default_factory=dict)

    def owner(self, slot: int) -> str | None:
        return self.owners.get(slot)

    def mine(self, slot: int) -> bool:
        return self.owners.get(slot) == self.node

    def http_address(self, node: str) -> HostPort | None:
        return self.http.get(node)

    def link_address(self, node: str) -> HostPort | None:
        return self.links.get(node)

    def live_nodes(self) -> Sequence[str]:
        return sorted({*self.owners.values(), self.node})

    def coap_address(self, node: str) -> str | None:
        return self.coap.get(node)
