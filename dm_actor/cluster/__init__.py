"""Cluster mode's pure core (issue 17): several dm-actor nodes on one PostgreSQL database.

Endpoint names hash into fixed slots (`slots`); the lease book decides which slots this node
serves and until when (`leases`); the routing rule reads a datagram's slot from the ids the
server issued (`route`); the internal link's frames are encoded and authenticated by `wire`;
`view` is what the other parts read about the cluster. No I/O here: the adapters are
`dm_actor.store.coordinator` (leases in PostgreSQL), `dm_actor.transport.link` (forwarded
datagrams), `dm_actor.api.proxy` and `dm_actor.api.relay` (HTTP calls and events between
nodes), composed by `dm_actor.node` (docs/architecture.md, "Cluster layer").
"""
