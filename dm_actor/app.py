"""The composition root: builds every service from `Settings` and runs them in one nursery.

The supervisor (device actors, registrar, sweeps) is wired to the CoAP transports here: the UDP
endpoint and the TCP listener call the supervisor's synchronous callbacks, and the supervisor
sends through the endpoint. This is the only module that wires layers together; it holds no
global state.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor.actors.supervisor import Supervisor
from dm_actor.api import ApiKeys, HttpOptions, load_api_keys
from dm_actor.api.auth import KEY_FILE
from dm_actor.api.server import HttpServer
from dm_actor.dtls import DtlsServer
from dm_actor.store.sqlite import SqliteStore
from dm_actor.transport.dtls import DtlsTransport
from dm_actor.transport.tcp import TcpListener, default_max_connections
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from dm_actor.actors.events import EventStream
    from dm_actor.address import Address
    from dm_actor.api.relay import EventRelay
    from dm_actor.config import Settings
    from dm_actor.node import ClusterNode
    from dm_actor.store.base import ChannelRecord, EventRecord, Snapshot, Store
    from dm_actor.store.postgres import PostgresStore
    from dm_actor.transport.link import ClusterLink

log = logging.getLogger(__name__)

STORE_FILE = "dm-actor.sqlite3"


class StartupError(Exception):
    """The server could not start: a port could not be opened, the API key file could not
    be written. The message names what (which port of which protocol, which file) and why."""


@asynccontextmanager
async def _starting(what: str) -> AsyncIterator[None]:
    """Turn an `OSError` (bare or in a group) raised while starting `what` into one
    `StartupError` naming it."""
    try:
        yield
    except* OSError as group:
        first = _first_leaf(group)
        reason = getattr(first, "strerror", None) or str(first)
        raise StartupError(f"{what}: {reason}") from first


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


#: In cluster mode node n numbers its durable events n modulo this (`Commands.seq_stride`).
SEQ_STRIDE = 1024


async def _join_cluster(settings: Settings) -> ClusterNode:
    """Join the cluster `[cluster]` names: its tables created if it is the first node."""
    from dm_actor.node import ClusterNode
    from dm_actor.store.coordinator import Coordinator  # (psycopg only when asked for)

    c = settings.cluster
    server = settings.server
    http = c.advertise_http or f"{server.host}:{server.http_port}"
    secret = c.secret or os.environ.get("DM_ACTOR_CLUSTER_SECRET", "")
    coordinator = await trio.to_thread.run_sync(
        partial(
            Coordinator,
            server.dsn,
            c.node,
            slots=c.slots,
            ttl=c.lease_ttl,
            http=http,
            link=c.link,
            coap=f"{server.host}:{server.coap_port}",
        )
    )
    number = await trio.to_thread.run_sync(coordinator.join)
    node = ClusterNode(
        c.node, slot_count=c.slots, secret=secret.encode(), ttl=c.lease_ttl,
        coordinator=coordinator,
    )  # fmt: skip
    node.number = number
    return node


def _relay(
    node: ClusterNode, http_server: HttpServer, store: PostgresStore, api_keys: ApiKeys
) -> EventRelay:
    """The relay of events between this node and the applications' home nodes."""
    from dm_actor.api.relay import EventRelay, http_sender

    router = http_server.router
    assert router is not None, "HttpServer(cluster=...) makes one"

    async def load_events(owners: frozenset[str]) -> list[EventRecord]:
        return await trio.to_thread.run_sync(store.load_events, owners)

    async def load_channels() -> list[ChannelRecord]:
        return await trio.to_thread.run_sync(store.load_channels)

    return EventRelay(
        node,
        http_server.hub,
        http_sender(node, router.pool.request, router.sign),
        load_events=load_events,
        load_channels=load_channels,
        apps=api_keys.applications,
        webhooks=http_server.api.webhooks,
        max_body=http_server.options.max_body,
    )


def _cluster_wide(snapshot: Snapshot | None) -> Snapshot | None:
    """What every node of a cluster loads at start: all but the devices (loaded by slot as
    the node takes them) and the events owed to channels (loaded by the home node)."""
    if snapshot is None:
        return None
    return msgspec.structs.replace(
        snapshot, registrations=[], commands=[], subscriptions={}, next_mids={}, events=[]
    )


@dataclass(frozen=True, slots=True)
class Listening:
    """Where `serve` listens (the ports are the real ones when the settings asked for 0),
    and the running supervisor (for embedding and tests)."""

    plain_udp: Address | None  # None: plain CoAP is off (`[security] plain_coap`)
    plain_tcp: Address | None
    supervisor: Supervisor
    http: Address | None = None
    api_keys: ApiKeys | None = None
    udp: UdpEndpoint | None = None  # for its statistics
    tcp: TcpListener | None = None
    coaps: Address | None = None  # the coaps:// (DTLS) socket
    dtls: DtlsTransport | None = None

    @property
    def coap_udp(self) -> Address:
        """The plain CoAP UDP socket's address (raises when plain CoAP is off)."""
        if self.plain_udp is None:
            raise RuntimeError("plain CoAP is off ([security] plain_coap = false)")
        return self.plain_udp

    @property
    def coap_tcp(self) -> Address:
        """The CoAP-over-TCP listener's address (raises when plain CoAP is off)."""
        if self.plain_tcp is None:
            raise RuntimeError("plain CoAP is off ([security] plain_coap = false)")
        return self.plain_tcp


async def freeze_long_lived(interval: float) -> None:
    """Every `interval` seconds, collect the young generations and freeze what survives.

    Registrations, actors and queued commands live for hours; the cyclic GC would otherwise
    scan all of them in every full collection (measured: 14 s at a million devices, and
    2-3x fewer registrations per second at 100k; docs/benchmarks.md). Frozen objects are
    still freed by reference counting when they are dropped; only reference cycles among
    them wait until `gc.unfreeze()`. Checked: 1000 devices that register and de-register with
    the GC disabled are all freed by reference counting.
    """
    while True:
        gc.collect(1)
        gc.freeze()
        await trio.sleep(interval)


#: The soft descriptor limit is raised to the hard one, but not beyond this.
NOFILE_TARGET = 65536


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (as Go programs do at start: the
    soft default, often 1024, is for programs that use select()); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_TARGET if hard == resource.RLIM_INFINITY else min(hard, NOFILE_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return NOFILE_TARGET if soft == resource.RLIM_INFINITY else soft


def tcp_max_connections(settings: Settings, nofile: int) -> int:
    """The cap on CoAP/TCP connections: `[tcp] max_connections`, or when 0 derived from the
    descriptor limit `nofile` (`transport.tcp.default_max_connections`)."""
    derived = default_max_connections(nofile, settings.api.max_connections)
    if settings.tcp.max_connections:
        if settings.tcp.max_connections > derived:
            log.warning(
                "[tcp] max_connections %d is more than the descriptor limit %d leaves for"
                " CoAP/TCP (%d): idle connections may take the descriptors HTTP needs",
                settings.tcp.max_connections,
                nofile,
                derived,
            )
        return settings.tcp.max_connections
    return derived


async def stop(store: Store, http_server: HttpServer | None, grace: float) -> None:
    """The graceful part of a stop, at most `grace` seconds: no new HTTP connection; the
    store commits what it holds; the HTTP answers in progress go out (a 202 waiting for its
    commit included), each closing its connection; what they wrote commits too. Then the
    caller cancels everything (long polls, WebSockets, CoAP, the sweeps)."""
    if http_server is not None:
        http_server.stop_accepting()
    with trio.move_on_after(grace) as scope:
        await store.durable()
        if http_server is not None:
            await http_server.answered()
        await store.durable()
    if scope.cancelled_caught:
        log.warning(
            "stopping after graceful_timeout (%.1f s): %d writes not yet committed, HTTP "
            "answers still in progress are cut", grace, store.backlog(),
        )  # fmt: skip


async def serve(
    settings: Settings,
    *,
    store: Store | None = None,
    events: EventStream | None = None,
    wall_clock: Callable[[], float] = time.time,
    http: bool = True,
    api_keys: ApiKeys | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled, or until `shutdown_trigger()` returns: then stop
    gracefully (`stop`) and return.

    Start it with `listening = await nursery.start(serve, settings)` (or `trio.run`).
    `wall_clock` dates what the store keeps (tests pass one that follows virtual time).
    With `http=False` no HTTP port is opened and the caller reads `events` itself. Without
    `api_keys` they come from the settings, `DM_ACTOR_API_KEY` and the data directory.
    """
    host, port = settings.server.host, settings.server.coap_port
    sqlite: SqliteStore | None = None
    node: ClusterNode | None = None
    cluster_store: PostgresStore | None = None
    if settings.cluster.enabled:
        if store is not None:
            raise StartupError("cluster mode runs on its own PostgreSQL store ([server] dsn)")
        node = await _join_cluster(settings)
    if store is None and node is not None:
        from dm_actor.store.postgres import PostgresStore  # (psycopg only when asked for)

        store = sqlite = cluster_store = await trio.to_thread.run_sync(
            partial(
                PostgresStore,
                settings.server.dsn,
                commit_interval=settings.server.commit_interval,
                clock=wall_clock,
                event_budget=settings.server.event_disk_budget,
                slot_count=settings.cluster.slots,
                fencing=node.book,
            )
        )
    elif store is None and settings.server.store == "sqlite":
        path = Path(settings.server.data_dir) / STORE_FILE
        store = sqlite = await trio.to_thread.run_sync(
            partial(
                SqliteStore,
                path,
                commit_interval=settings.server.commit_interval,
                clock=wall_clock,
                event_budget=settings.server.event_disk_budget,
                disk_headroom=settings.server.disk_headroom,
            )
        )
    elif store is None and settings.server.store == "postgres":
        from dm_actor.store.postgres import PostgresStore  # (psycopg only when asked for)

        store = sqlite = await trio.to_thread.run_sync(
            partial(
                PostgresStore,
                settings.server.dsn,
                commit_interval=settings.server.commit_interval,
                clock=wall_clock,
                event_budget=settings.server.event_disk_budget,
            )
        )
    try:
        snapshot = None if store is None else await trio.to_thread.run_sync(store.load)
        sup = Supervisor(settings, store=store, events=events, wall_clock=wall_clock)
        udp = UdpEndpoint(host, port, sup.on_datagram, sup.on_unreachable)
        link: ClusterLink | None = None
        if node is not None:
            snapshot = _cluster_wide(snapshot)  # (devices: by the slots this node takes)
            assert cluster_store is not None
            node.attach(cluster_store, sup)
            sup.registry.cluster = node
            sup.commands.seq_stride, sup.commands.seq_residue = SEQ_STRIDE, node.number
            from dm_actor.transport.link import ClusterLink

            link = node.link = ClusterLink(
                node, sup.on_datagram, sup.on_unreachable,
                retry_after=settings.registration.retry_after,
            )  # fmt: skip
            link.may_send = node.may_send
            udp = UdpEndpoint(host, port, link.on_datagram, link.on_unreachable, reuse_port=True)
        nofile = raise_descriptor_limit()
        tcp_cap = tcp_max_connections(settings, nofile)
        tcp = TcpListener(
            host,
            port,
            sup.on_tcp_message,
            sup.on_tcp_closed,
            is_bound=lambda conn: conn in sup.by_conn,  # a registered device's
            max_connections=tcp_cap,
            handshake_timeout=settings.tcp.handshake_timeout,
        )
        sec = settings.security
        dtls = DtlsTransport(
            DtlsServer(
                sup.credentials.psk,
                connection_id=sec.connection_id,
                max_handshakes=sec.max_handshakes,
                max_handshakes_per_host=sec.max_handshakes_per_host,
                handshake_timeout=sec.handshake_timeout,
            ),
            sup.on_datagram,
            sup.on_unreachable,
            lambda addr, why: sup.registrar.refusals.refuse(None, None, addr, None, "alert", why),
            is_bound=lambda addr: addr in sup.by_addr,
        )
        coaps = UdpEndpoint(host, settings.coaps_port(), dtls.on_datagram, dtls.on_unreachable)
        async with trio.open_nursery() as nursery:
            if sqlite is not None:
                await nursery.start(sqlite.run)
            udp_addr = tcp_addr = None
            coaps_addr = None
            if settings.security.plain_coap:
                async with _starting(f"cannot listen on udp://{host}:{port} (CoAP)"):
                    udp_addr = await nursery.start(udp.run)
                sup.attach_udp(udp.send)
                if link is None:  # (cluster mode serves CoAP over UDP only)
                    async with _starting(f"cannot listen on tcp://{host}:{port} (CoAP over TCP)"):
                        tcp_addr = await nursery.start(tcp.run)
            if link is None:
                coaps_port = settings.coaps_port()
                where = f"udp://{host}:{coaps_port} (CoAP over DTLS)"
                async with _starting(f"cannot listen on {where}"):
                    coaps_addr = await nursery.start(coaps.run)
                dtls.attach(coaps.send)
                sup.attach_dtls(dtls.send, dtls.identity_of, dtls.release)
                sup.provisioning.revoked.append(dtls.revoked)
                nursery.start_soon(dtls.run_timer)
            else:
                link.attach(udp.send)
                from dm_actor.node import host_port

                link_host, link_port = host_port(settings.cluster.link)
                where = f"udp://{settings.cluster.link} (cluster link)"
                async with _starting(f"cannot listen on {where}"):
                    await nursery.start(link.run, link_host, link_port)
            await nursery.start(sup.run)
            if snapshot is not None:
                sup.restore(snapshot)
            if settings.server.gc_freeze_interval:
                # young collections less often: a Register allocates a few dozen objects that
                # live on; at (700, 10, 10) the collector was half the cost of a Register
                # during a storm of 100k (docs/benchmarks.md)
                gc.set_threshold(50_000, 50, 1000)
                nursery.start_soon(freeze_long_lived, settings.server.gc_freeze_interval)
            http_addr = None
            http_server = None
            if http:
                if api_keys is None:
                    key_file = Path(settings.server.data_dir) / KEY_FILE
                    async with _starting(f"cannot read or write the API key file {key_file}"):
                        api_keys = await trio.to_thread.run_sync(
                            load_api_keys,
                            settings.server.data_dir,
                            settings.api.keys,
                            os.environ,
                            settings.api.admin_keys,
                        )
                # (in cluster mode a channel is reopened by its home node: `EventRelay.adopt`)
                channels = [] if snapshot is None or node is not None else snapshot.channels
                options = HttpOptions.from_settings(settings.api)
                http_port = settings.server.http_port
                http_server = HttpServer(sup, api_keys, options, channels, cluster=node)
                if node is not None:
                    assert cluster_store is not None
                    node.relay = http_server.relay = _relay(
                        node, http_server, cluster_store, api_keys
                    )
                async with _starting(f"cannot listen on http://{host}:{http_port} (HTTP API)"):
                    http_addr = await nursery.start(http_server.run, host, http_port)
                if api_keys.generated:
                    log.warning(
                        "first start: generated the API key %s (kept in %s)",
                        api_keys.generated,
                        settings.server.data_dir,
                    )
            if node is not None:
                await nursery.start(node.run)  # (the first lease round: slots held, loaded)
                log.info("cluster node %s (number %d): %d of %d slots, link udp://%s",
                         node.node, node.number, len(node.book.held), node.slot_count,
                         settings.cluster.link)  # fmt: skip
            # /metrics reads the transports; /readyz: all bound (and, in cluster mode, leases
            # held and their devices loaded)
            if http_server is not None:
                http_server.ops.attach(udp, tcp, coaps, plain=settings.security.plain_coap)
            if link is not None and udp_addr is not None:
                log.info("CoAP listening on udp://%s:%d (shared with the cluster's nodes)",
                         *udp_addr[:2])  # fmt: skip
            elif udp_addr is not None and tcp_addr is not None:
                log.info(
                    "CoAP listening on udp://%s:%d and tcp://%s:%d", *udp_addr[:2], *tcp_addr[:2]
                )
                log.info("CoAP/TCP: at most %d connections (descriptor limit %d)", tcp_cap, nofile)
            else:
                log.info("plain CoAP is off: devices register over DTLS only")
            if coaps_addr is not None:
                log.info("CoAP over DTLS listening on coaps://%s:%d", *coaps_addr[:2])
            task_status.started(
                Listening(
                    udp_addr,
                    tcp_addr,
                    sup,
                    http_addr,
                    api_keys,
                    udp=udp,
                    tcp=tcp,
                    coaps=coaps_addr,
                    dtls=dtls,
                )
            )
            if shutdown_trigger is not None:
                await shutdown_trigger()
                await stop(sup.store, http_server, settings.server.graceful_timeout)
                if node is not None:
                    await node.leave()
                nursery.cancel_scope.cancel()
    finally:
        if sqlite is not None:
            sqlite.close()
