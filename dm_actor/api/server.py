"""The HTTP port: an h11 loop per connection, REST dispatch, long polls and WebSockets.

One task per TCP connection reads requests with h11 (keep-alive), authenticates them, and
answers. Every phase of a request is bounded (docs/operations.md, "Limits"): the request head
must be complete within `head_timeout` and `max_header` bytes (431), the body within
`body_timeout` and `max_body` bytes (413), and the response must be written within
`send_timeout`. At `max_connections`, a new connection sheds the oldest one that has not yet
sent a complete request head (or an idle keep-alive one, or one still uploading the body of an
unauthenticated request), so a slow client cannot lock out one that sends a complete request.
`GET /v2/notification/pull` waits in that task; `GET /v2/notification/websocket-connect` is
handed to trio-websocket's public `wrap_server_stream` through a `ReplayStream` that gives it
the upgrade request h11 already consumed. Malformed HTTP gets a 4xx and the connection closes;
a handler's failure gets 500; the server keeps serving. The application logic lives in
`routes.py`. In cluster mode (`cluster=`), a request about another node's device or channel
is answered there, and the device list by every node (`proxy.py`, `ClusterRouter`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import select
import socket
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote

import h11
import msgspec
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from dm_actor.api.auth import is_admin
from dm_actor.api.channels import (
    CALLBACK,
    LONG_POLLING,
    WEB_SOCKET,
    Channel,
    NotificationHub,
    Session,
)
from dm_actor.api.console import Console
from dm_actor.api.cors import Cors
from dm_actor.api.handover import FrameStream, PullReceipt
from dm_actor.api.metrics import OPERATIONS, ROUTE, Observability, route_of
from dm_actor.api.proxy import (
    CLUSTER_HEADER,
    FORBIDDEN_INTERNAL,
    NO_OWNER,
    PREVIOUS_PULL_HEADER,
    ClusterRouter,
    EventRelay,
    Forged,
    Route,
    unavailable,
)
from dm_actor.api.replay import ReplayStream
from dm_actor.api.routes import (
    ADMIN_ONLY,
    BAD_METHOD,
    JSON,
    NO_CONTENT,
    NOT_AN_ACCESS_KEY,
    NOT_FOUND_ROUTE,
    Api,
    Request,
    Response,
    error_v3,
    text,
)
from dm_actor.api.schemas import Serialization
from dm_actor.api.webhook import WebhookOptions, parse_target
from dm_actor.logformat import LOG_CONTEXT, RequestLog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.address import Address
    from dm_actor.api.auth import ApiKeys
    from dm_actor.cluster.view import ClusterView
    from dm_actor.config import ApiSettings
    from dm_actor.store.base import ChannelRecord

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_RECEIVE_SIZE = 65536
_PULL = ["v2", "notification", "pull"]
_WEBSOCKET_CONNECT = ["v2", "notification", "websocket-connect"]
_ADMIN_EVENTS = ["admin", "events"]  # the administrators' event tap (console.py)
UNAUTHORIZED = text(401, "Authentication failure.")
UNAUTHORIZED_V3 = error_v3(401, "invalid_auth", "Authentication failure.")
CHANNEL_DELETED = text(410, "CHANNEL_DELETED")
#: how an `ErrorResponse` body ends before its request's id is put in (`_send`)
_NO_REQUEST_ID = b'"request_id":""}'
#: the upgrade's headers wsproto decodes, and how (`_undecodable`)
_WSPROTO_CODECS = {
    b"host": "idna",
    b"connection": "ascii",
    b"sec-websocket-protocol": "ascii",
    b"sec-websocket-extensions": "ascii",
}
INTERNAL_ERROR = text(500, "Internal server error.")
#: a request other than a health check on a connection of the reserve (`_reserve`)
BUSY = (503, [(b"content-type", b"text/plain"), (b"retry-after", b"1")],
        b"Connection limit reached: try again.")  # fmt: skip
_RESERVE = 8  # connections beyond `max_connections` for health checks
_RESERVE_AGE = 0.1  # s: a reserve place without a request head yet may then be given away
_RESERVE_TIMEOUT = 2.0  # s: for the request head of a connection in the reserve
INTERNAL_ERROR_V3 = error_v3(500, "internal_server_error", "Internal server error.")


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """Limits and timers of the HTTP port (seconds, bytes)."""

    max_body: int = 1 << 20
    max_header: int = 16 * 1024
    long_poll_timeout: float = 30.0
    ping_interval: float = 30.0
    idle_timeout: float = 600.0  # a keep-alive connection with no request is closed
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    max_connections: int = 1024  # served at once (beyond, waiting heads are shed; see run)
    head_timeout: float = 10.0  # a request head must be complete within this (whole head)
    body_timeout: float = 30.0  # ... and its body within this after the head
    send_timeout: float = 30.0  # a response must be written within this
    max_connections_per_address: int = 0  # 0: no limit (behind a proxy all share one)
    max_presubscriptions: int = 1024  # per application
    metrics_public: bool = False  # /metrics without an administrator key
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (cors.py)
    webhook: WebhookOptions = field(default_factory=WebhookOptions)

    @classmethod
    def from_settings(cls, api: ApiSettings) -> HttpOptions:
        """The options that the `[api]` settings set (the rest keep their defaults)."""
        return cls(
            max_connections=api.max_connections,
            head_timeout=api.head_timeout,
            body_timeout=api.body_timeout,
            send_timeout=api.send_timeout,
            max_connections_per_address=api.max_connections_per_address,
            max_presubscriptions=api.max_presubscriptions,
            metrics_public=api.metrics_public,
            cors_origins=tuple(api.cors_origins),
        )


class _Place:
    """A connection of the reserve waiting for its request head: since when, its socket,
    and whether it waits for bytes with none to read (`_reserve_place` may then give it
    away: nothing arrived, or only part of a head, which a health check sends whole)."""

    __slots__ = ("fd", "silent", "since")

    def __init__(self, since: float, fd: int) -> None:
        self.since = since
        self.fd = fd
        self.silent = True


def _readable(fd: int) -> bool:
    """Whether the socket `fd` has bytes (or its end) waiting to be read, without waiting."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Slot:
    """One served connection: its peer's address, the cancel scope that sheds it, and the
    requests without a valid key it sent."""

    __slots__ = ("address", "anonymous", "scope", "shed")

    def __init__(self, address: str) -> None:
        self.address = address
        self.scope: trio.CancelScope | None = None
        self.shed = False
        self.anonymous = 0


#: the refusals of the HTTP port that `statistics()` counts, and how the log names them
_REFUSALS = {
    "connections_shed": "connections shed to make room (no complete request head yet)",
    "head_timeouts": "request heads not complete in time",
    "body_timeouts": "request bodies not complete in time",
    "send_timeouts": "responses the client did not read in time",
    "refused_per_address": "connections over the per-address limit",
    "server_errors": "requests that failed with 500",
    "accept_errors": "accepts that failed for want of descriptors or memory (0.1 s pause each)",
    "cors_refused": "CORS preflights from origins not allowed (403)",
}
_ANONYMOUS_PER_CONNECTION = 10  # requests without a valid key answered on one connection
_LINGER_ANONYMOUS = 64 * 1024  # bytes read after the last of them (`_linger`)
_ACCEPT_BURST = 64  # connections accepted a scheduler pass, at most, beyond the first
_LOG_INTERVAL = 60.0  # refusals are logged as one summary line per interval at most


#: accept() errors that mean "out of resources for now" (trio's serve_listeners pauses too)
_ACCEPT_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpStatistics:
    """What `HttpServer.statistics()` returns: counters since the server started (trio's
    `statistics()` style: a frozen snapshot, not a live dict)."""

    connections: int  # connections served, in all
    served: int  # ... being served now
    requests: int  # requests answered
    bad_requests: int  # requests refused as malformed (400, 413, 431, ...)
    connections_shed: int  # the refusals of `_REFUSALS`, each as the log names it
    head_timeouts: int
    body_timeouts: int
    send_timeouts: int
    refused_per_address: int
    server_errors: int
    accept_errors: int
    cors_refused: int
    websockets_too_slow: int  # WebSockets closed with 1001 for a slow client


class HttpServer:
    """The HTTP side of the server: REST handlers, the hub, and the per-connection loop."""

    def __init__(
        self,
        sup: Supervisor,
        api_keys: ApiKeys,
        options: HttpOptions | None = None,
        channels: Sequence[ChannelRecord] = (),
        cluster: ClusterView | None = None,
    ) -> None:
        self.keys = api_keys
        self.options = options or HttpOptions()
        self.hub = NotificationHub(
            sup.events,
            wall_clock=partial(_wall_clock, sup),
            on_delivered=sup.events_delivered,
            on_handed=sup.commands.events_handed,
            on_acknowledged=sup.commands.events_acknowledged,
            keep=sup.keep_event,
            store=sup.store,
        )
        self.api = Api.create(sup, self.hub, self.options.webhook)
        self.api.max_presubscriptions = self.options.max_presubscriptions
        # the operator's console: /console/ assets, /admin/ routes, the event tap
        self.console = Console(self.api, ping_interval=self.options.ping_interval)
        self.console.install(self.hub)
        self.api.admin = self.console.dispatch
        self.restored = list(channels)
        # /metrics, /healthz, /readyz (metrics.py), and the reserve of connections taken
        # beyond `max_connections` for them when no connection can be shed (`_reserve`)
        self.ops = Observability(self, public=self.options.metrics_public)
        self.reserved = 0
        self._reserve_waiting: dict[trio.CancelScope, _Place] = {}  # no request head yet
        self.reserve_refused = 0
        self.cors = Cors(self.options.cors_origins)
        # per connection, the request being answered: its number (`request_id`) and the
        # CORS headers of its answer (for an allowed origin)
        self._current: dict[trio.SocketStream, tuple[int, list[tuple[bytes, bytes]]]] = {}
        # request ids: a random prefix per process, then a count (`request_id`)
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._counts = {"connections": 0, "requests": 0, "bad_requests": 0}
        self._counts.update(dict.fromkeys(_REFUSALS, 0))
        self._counts["websockets_too_slow"] = 0
        self.served = 0  # connections being served
        # sheddable connections (no complete request head yet, idle keep-alive, or uploading
        # the body of an unauthenticated request), oldest first
        self._sheddable: dict[_Slot, None] = {}
        self._leaving = 0  # shed, not yet closed
        self._room = trio.Event()  # set when a slot frees or a connection becomes sheddable
        self._per_address: dict[str, int] = {}
        self._anonymous: dict[trio.SocketStream, _Slot] = {}  # unauthenticated upgrades
        self._unlogged: dict[str, int] = {}
        self._logged_at = -_LOG_INTERVAL
        # stopping (`stop_accepting`): no new connection, each answer closes its connection
        self.stopping = False
        self._accepting: list[trio.CancelScope] = []
        self._answering = 0  # requests dispatched whose answer is not yet sent
        self._answered = trio.Event()  # set when `_answering` drops to 0
        # cluster mode (proxy.py): requests for another node's device or channel are answered
        # there; `relay` (relay.py, attached by the node) takes POST /internal/events
        self.router: ClusterRouter | None = None
        if cluster is not None:
            o = self.options
            self.router = ClusterRouter(
                cluster, partial(_wall_clock, sup), long_poll=o.long_poll_timeout,
                ping_interval=o.ping_interval, handshake_timeout=o.handshake_timeout,
            )  # fmt: skip
        self.relay: EventRelay | None = None
        # cluster mode: the last long-poll response relayed to each application's client
        # (its arrival is told to the home node with the next poll: `_previous_pull`)
        self._relayed_pulls: dict[str, PullReceipt] = {}

    def stop_accepting(self) -> None:
        """Stop taking connections (the listeners close) and close each connection after
        its next answer; `answered()` then waits for the answers in progress."""
        self.stopping = True
        for scope in self._accepting:
            scope.cancel()

    async def answered(self) -> None:
        """Return once no request is being answered (a 202 waiting for the store is)."""
        while self._answering:
            self._answered = trio.Event()
            await self._answered.wait()

    def statistics(self) -> HttpStatistics:
        """The HTTP port's counters since it started, and the connections served now."""
        c = self._counts
        return HttpStatistics(
            connections=c["connections"],
            served=self.served,
            requests=c["requests"],
            bad_requests=c["bad_requests"],
            connections_shed=c["connections_shed"],
            head_timeouts=c["head_timeouts"],
            body_timeouts=c["body_timeouts"],
            send_timeouts=c["send_timeouts"],
            refused_per_address=c["refused_per_address"],
            server_errors=c["server_errors"],
            accept_errors=c["accept_errors"],
            cors_refused=c["cors_refused"],
            websockets_too_slow=c["websockets_too_slow"],
        )

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[Address]) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            async with trio.open_nursery() as nursery:
                # the stored channels are open before the hub reads the events owed to them
                await nursery.start(partial(self.hub.run, before=self._restore_channels))
                nursery.start_soon(self.ops.measure_lag)
                address = listeners[0].socket.getsockname()
                log.info("HTTP listening on http://%s:%d", *address[:2])
                task_status.started(address)
                for listener in listeners:
                    nursery.start_soon(self._accept, listener, nursery)
        finally:
            if self.router is not None:
                self.router.pool.close()
            for receipt in self._relayed_pulls.values():
                receipt.close()
            self._relayed_pulls.clear()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept connections. At `max_connections`, the oldest sheddable connection is
        closed to make room; when none is sheddable, new connections wait in the kernel's
        (bounded) accept queue, so a connection flood costs no task.

        After each accept, up to `_ACCEPT_BURST` more that are already queued are taken
        without waiting for the next scheduler pass (trio's accept takes one a pass): under
        a flood of reconnecting slow clients a complete request queued behind them must not
        wait hundreds of passes."""
        raw = socket.socket(fileno=os.dup(listener.socket.fileno()))
        raw.setblocking(False)
        with raw, trio.CancelScope() as accepting:
            self._accepting.append(accepting)
            if self.stopping:
                accepting.cancel()
            async with listener:
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # out of descriptors or memory: wait, as trio
                        if exc.errno not in _ACCEPT_CAPACITY_ERRORS:
                            raise
                        self._refused("accept_errors")  # (one line a minute, not ten a second)
                        await trio.sleep(0.1)
                        continue
                    await self._admit(stream, nursery)
                    for _ in range(_ACCEPT_BURST):
                        try:
                            sock, _ = raw.accept()
                        except OSError:  # none queued (or out of descriptors: see above)
                            break
                        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
                        await self._admit(stream, nursery)

    async def _admit(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        """Serve `stream` once there is room (shedding a connection if need be)."""
        address = _address(stream)
        per_address = self.options.max_connections_per_address
        if per_address and self._per_address.get(address, 0) >= per_address:
            self._refused("refused_per_address")
            await trio.aclose_forcefully(stream)
            return
        try:
            # connections being shed are gone already (their tasks end in the next pass)
            while self.served - self._leaving >= self.options.max_connections:
                if not self._shed():
                    if self._reserve_place():  # for a health check, if that is what it is
                        self.reserved += 1
                        nursery.start_soon(self._reserve, stream)
                        return
                    self._room = trio.Event()
                    with trio.move_on_after(_RESERVE_AGE):  # (a reserve place may age)
                        await self._room.wait()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        self.served += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        nursery.start_soon(self._serve, stream, _Slot(address))

    def _shed(self) -> bool:
        """Close the oldest sheddable connection; False when there is none."""
        if not self._sheddable:
            return False
        slot = next(iter(self._sheddable))
        del self._sheddable[slot]
        slot.shed = True
        assert slot.scope is not None
        slot.scope.cancel()
        self._leaving += 1
        return True

    def _reserve_place(self) -> bool:
        """Whether a connection may go in the reserve now: a place is free, or one without
        a request head is given away (closed): the oldest that is silent (waiting for bytes,
        none to read: a flood of silent or one-byte connections churns through the reserve
        at once, and a health check, which sends its request whole as it connects, keeps its
        place), or else the oldest that has had `_RESERVE_AGE`."""
        if self.reserved < _RESERVE:
            return True
        now = trio.current_time()
        for scope, place in self._reserve_waiting.items():
            if (place.silent and not _readable(place.fd)) or now - place.since >= _RESERVE_AGE:
                del self._reserve_waiting[scope]
                scope.cancel()
                return True
        return False

    async def _reserve(self, stream: trio.SocketStream) -> None:
        """A connection taken beyond `max_connections` when none could be shed: a health
        check (or /metrics) is answered, any other request gets 503 and the close. Bounded:
        `_RESERVE` places (a place waiting for its request head is given to a newer
        connection while it is silent, or after `_RESERVE_AGE`: `_reserve_place`), the head
        within `_RESERVE_TIMEOUT` and 8 KiB."""
        try:
            async with stream:
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
                with trio.move_on_after(_RESERVE_TIMEOUT) as scope:
                    place = _Place(trio.current_time(), stream.socket.fileno())
                    self._reserve_waiting[scope] = place
                    self._room.set()  # (a connection waiting for a place may take this one)
                    try:
                        while (event := conn.next_event()) is h11.NEED_DATA:
                            place.silent = True  # (nothing to read: it may be given away)
                            await trio.lowlevel.wait_readable(stream.socket)
                            place.silent = False  # (bytes to read: kept until `_RESERVE_AGE`)
                            conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                    finally:
                        self._reserve_waiting.pop(scope, None)
                    if not isinstance(event, h11.Request):
                        return
                    path = event.target.decode("ascii", "replace").partition("?")[0]
                    route = route_of(path.split("/")[1:])
                    ROUTE.set(route)
                    if route in OPERATIONS:
                        auth = next((v for n, v in event.headers if n == b"authorization"), None)
                        app = self.keys.from_authorization(auth)
                        response = await self.ops.answer(event.method, route, app)
                    else:
                        self.reserve_refused += 1
                        response = BUSY
                    await self._send(conn, stream, response, close=True, linger=False)
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError):  # fmt: skip
            pass  # a malformed head, a client gone or too slow: closed
        except Exception:  # one connection's failure never stops the server
            log.exception("HTTP connection from %s (connection reserve) failed", _peer(stream))
        finally:
            self.reserved -= 1
            self._room.set()

    def _refused(self, kind: str) -> None:
        """Count a refusal; log the refusals as one line per `_LOG_INTERVAL` at most."""
        self._counts[kind] += 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = trio.current_time()
        if now - self._logged_at >= _LOG_INTERVAL:
            self._logged_at = now
            counts = ", ".join(f"{n} {_REFUSALS[k]}" for k, n in self._unlogged.items())
            log.warning("HTTP refusals (at most one such line a minute): %s", counts)
            self._unlogged.clear()

    async def _serve(self, stream: trio.SocketStream, slot: _Slot) -> None:
        try:
            await self.connection(stream, slot)
        finally:
            self._sheddable.pop(slot, None)
            self.served -= 1
            if slot.shed:
                self._leaving -= 1
            left = self._per_address[slot.address] - 1
            if left:
                self._per_address[slot.address] = left
            else:
                del self._per_address[slot.address]
            self._room.set()

    def _restore_channels(self) -> None:
        """Reopen the channels the store kept, with the events owed to them; a callback
        resumes delivering at once."""
        for record in self.restored:
            try:
                serialization = msgspec.json.decode(
                    record.serialization or "{}", type=Serialization
                )
                if record.mechanism == CALLBACK and record.url is not None:
                    target = parse_target(record.url, record.headers)
                    self.api.webhooks.start(record.owner, target, serialization)
                elif record.mechanism in (WEB_SOCKET, LONG_POLLING):
                    self.hub.open(record.owner, record.mechanism, serialization)
            except (msgspec.ValidationError, ValueError) as exc:
                log.warning("stored channel of %s not restored: %s", record.owner, exc)
        self.restored = []
        # the events the restart owes, into those channels (not through the stream's bound)
        sup = self.api.sup
        owed, sup.owed_events = sup.owed_events, []
        self.hub.restore(owed)

    # -- one connection -------------------------------------------------------------------

    async def connection(self, stream: trio.SocketStream, slot: _Slot | None = None) -> None:
        """Serve requests on one connection until it closes, breaks, or is shed."""
        self._counts["connections"] += 1
        slot = slot or _Slot(_address(stream))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.options.max_header)
        try:
            async with stream:
                fresh = True
                while await self._request(conn, stream, slot, fresh=fresh):
                    conn.start_next_cycle()
                    fresh = False
        except trio.TooSlowError:  # the client did not read our response in time
            self._refused("send_timeouts")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:  # one connection's failure never stops the server
            log.exception("HTTP connection from %s failed", _peer(stream))
        finally:
            self._current.pop(stream, None)

    def _sheddable_from(self, slot: _Slot, scope: trio.CancelScope) -> None:
        slot.scope = scope
        self._sheddable[slot] = None
        self._room.set()

    def _was_shed(self, slot: _Slot, scope: trio.CancelScope) -> bool:
        """After a sheddable phase (its scope exited): whether it ended because the
        connection was shed (one shed just as its phase completed is kept: it is served)."""
        if not slot.shed:
            return False
        if scope.cancelled_caught:
            self._refused("connections_shed")
            return True
        slot.shed = False
        self._leaving -= 1
        self._room.set()
        return False

    async def _head(
        self, conn: h11.Connection, stream: trio.SocketStream, slot: _Slot, *, fresh: bool
    ) -> h11.Request | None:
        """The next request's head; None when the connection is to close (the client closed
        it, it was shed, or its head was not complete in time: 408).

        The head must be complete `head_timeout` after the connection opened, or on a kept-
        alive connection after its first byte (before it, the connection is idle: closed
        after `idle_timeout`). Raises h11.RemoteProtocolError for malformed HTTP."""
        options = self.options
        received = len(conn.trailing_data[0])  # pipelined bytes already here
        started = fresh or received > 0
        timeout = options.head_timeout if started else options.idle_timeout
        with trio.move_on_after(timeout) as scope:
            self._sheddable_from(slot, scope)
            try:
                while (event := conn.next_event()) is h11.NEED_DATA:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if not started:
                        started = True
                        scope.deadline = trio.current_time() + options.head_timeout
                    received += len(data)
                    conn.receive_data(data)
            finally:
                self._sheddable.pop(slot, None)
        if self._was_shed(slot, scope):
            return None
        if scope.cancelled_caught:
            if started:
                self._refused("head_timeouts")
                if received:
                    await self._refuse(
                        conn, stream, text(408, "Request head not complete in time.")
                    )
            return None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed: the client is done
        if received - len(conn.trailing_data[0]) > options.max_header:
            # h11 bounds only a head that arrives in parts; this one came whole
            self._counts["bad_requests"] += 1
            response = text(431, "Malformed HTTP request: request head too large")
            await self._send(conn, stream, response, close=True, slot=slot)
            return None
        return event

    async def _body(
        self, conn: h11.Connection, stream: trio.SocketStream, slot: _Slot, *, sheddable: bool
    ) -> bytes | None:
        """The request's body; None when the connection is to close (answered 413 or 408, or
        shed: an unauthenticated request's body is `sheddable`, and not kept: it will be
        refused). Raises h11.RemoteProtocolError for malformed HTTP."""
        options = self.options
        body = bytearray()
        size = 0
        part: object = None
        parts = 0  # h11 costs ~5 us a part: 1 MiB in 1-byte chunks took seconds of CPU
        with trio.move_on_after(options.body_timeout) as scope:
            if sheddable:
                self._sheddable_from(slot, scope)
            try:
                while size <= options.max_body and parts <= _parts_allowed(size):
                    part = conn.next_event()
                    if part is h11.NEED_DATA:
                        if conn.they_are_waiting_for_100_continue:
                            go_on = h11.InformationalResponse(status_code=100, headers=[])
                            await stream.send_all(conn.send(go_on))
                        conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                    elif type(part) is h11.Data:
                        size += len(part.data)
                        parts += 1
                        if not sheddable:
                            body += part.data
                    else:
                        break  # EndOfMessage, or ConnectionClosed mid-body
            finally:
                self._sheddable.pop(slot, None)
        if self._was_shed(slot, scope):
            return None
        if type(part) is h11.EndOfMessage:
            return bytes(body)
        if isinstance(part, h11.ConnectionClosed):
            return None
        if scope.cancelled_caught:
            self._refused("body_timeouts")
            await self._refuse(conn, stream, text(408, "Request body not complete in time."))
            return None
        if size > options.max_body:
            response = text(413, "Request body too large.")
        else:
            self._counts["bad_requests"] += 1
            response = text(400, "Malformed HTTP request: body in too many small parts")
        await self._send(conn, stream, response, close=True, slot=slot)
        return None

    async def _refuse(
        self, conn: h11.Connection, stream: trio.SocketStream, response: Response
    ) -> None:
        """Answer a timed-out request and close at once (briefly: the client is slow)."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with trio.move_on_after(1.0):
                await self._send(conn, stream, response, close=True, linger=False)

    async def _request(
        self, conn: h11.Connection, stream: trio.SocketStream, slot: _Slot, *, fresh: bool
    ) -> bool:
        """Read and answer one request; False when the connection must close."""
        options = self.options
        self._current.pop(stream, None)  # (a refusal before the head has no request id)
        ROUTE.set("-")  # (no route yet: a malformed head, a timeout)
        LOG_CONTEXT.set(None)
        try:
            event = await self._head(conn, stream, slot, fresh=fresh)
            if event is None:
                return False
            number = next(self._ids)
            LOG_CONTEXT.set(RequestLog(event.target, self.request_id(number)))  # (for the log)
            auth = upgrade = content_type = origin = None
            authorizations = length = 0
            chunked = preflight = False
            for name, value in event.headers:
                if name == b"authorization":
                    auth = value
                    authorizations += 1
                elif name == b"origin":
                    origin = value if origin is None else b""  # two: none allowed
                elif name == b"access-control-request-method":
                    preflight = True
                elif name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = True
                elif name == b"upgrade":
                    upgrade = value
                elif name == b"content-type":
                    content_type = value
            self._current[stream] = (number, self.cors.headers(origin) if self.cors else [])
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP request %s from %s: %s %s", self.request_id(number),
                          _peer(stream), event.method.decode(), _shown(event.target))  # fmt: skip
            refusal = None
            if authorizations > 1:
                refusal = "more than one Authorization header"
            elif chunked and any(n == b"content-length" for n, _ in event.headers):
                refusal = "both Content-Length and Transfer-Encoding"  # request smuggling
            if refusal is not None:
                self._counts["bad_requests"] += 1
                response = text(400, f"Malformed HTTP request: {refusal}")
                await self._send(conn, stream, response, close=True, slot=slot)
                return False
            if length > options.max_body:
                await self._send(
                    conn, stream, text(413, "Request body too large."), close=True, slot=slot
                )
                return False
            app = self.keys.from_authorization(auth)
            internal = forged = False  # a valid internal header: served here, not routed
            if self.router is not None:
                try:
                    internal = self.router.check(event.method, event.target, event.headers)
                except Forged:
                    forged = True
            if app is None and not internal and conn.they_are_waiting_for_100_continue:
                # refused before its body is sent (RFC 9110 10.1.1): then the connection closes
                await self._send(conn, stream, _unauthorized(event), close=True, slot=slot)
                return False
            # an unauthenticated upload may be shed like a slow head (the WebSocket upgrade
            # may still carry its key in a subprotocol, but it has no body)
            body = await self._body(conn, stream, slot, sheddable=app is None and not internal)
            if body is None:
                return False
            if internal:  # (its MAC signs its body too: checked now that it is read)
                assert self.router is not None
                try:
                    self.router.confirm(event.method, event.target, event.headers, body)
                except Forged:
                    internal, forged = False, True
        except h11.RemoteProtocolError as exc:
            self._counts["bad_requests"] += 1
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                response = text(status, f"Malformed HTTP request: {exc}")
                await self._send(conn, stream, response, close=True, slot=slot)
            return False
        self._counts["requests"] += 1
        path, _, query = event.target.decode("ascii").partition("?")
        segments = path.split("/")[1:]
        for i, seg in enumerate(segments):
            if "%" in seg:
                segments[i] = unquote(seg)
        route = route_of(segments)
        ROUTE.set(route)
        if self.router is not None and (forged or segments[:1] == ["internal"]):
            return await self._internal(conn, stream, slot, event, body, internal)
        if route in OPERATIONS:  # no application key needed (/metrics checks its own)
            response = await self.ops.answer(event.method, route, app)
            if app is not None:
                await self._send(conn, stream, response, close=self.stopping)
                return conn.our_state is h11.DONE and not self.stopping
            # without a valid key, the connection may be shed while its answer waits for the
            # client to read it (as a 401's): a client that does not read holds no slot; a
            # keyless /metrics (401) counts as a request without a valid key, and the 10th
            # closes (what the client pipelines after it is read up to `_LINGER_ANONYMOUS`)
            if response[0] == 401:
                slot.anonymous += 1
            close = self.stopping or slot.anonymous >= _ANONYMOUS_PER_CONNECTION
            await self._send(conn, stream, response, close=close, linger=False, slot=slot)
            if close:
                await self._linger(stream, slot, budget=_LINGER_ANONYMOUS)
            return not close and conn.our_state is h11.DONE
        if preflight and origin is not None and event.method == b"OPTIONS":
            return await self._preflight(conn, stream, slot, origin)
        if segments[:1] == ["console"]:  # the console's page: no key (console.py)
            if_none_match = next((v for n, v in event.headers if n == b"if-none-match"), None)
            response = self.console.static(event.method, segments, if_none_match)
            keyless = slot if app is None else None  # (sheddable while its send is blocked)
            await self._send(conn, stream, response, close=self.stopping, slot=keyless)
            return conn.our_state is h11.DONE and not self.stopping
        tap = segments == _ADMIN_EVENTS
        if (tap or segments == _WEBSOCKET_CONNECT) and event.method == b"GET":
            if app is not None:
                return await self._websocket_connect(
                    conn, stream, event, upgrade, auth, tap, internal
                )
            # its key may be in a subprotocol; until then its refusals may be shed
            self._anonymous[stream] = slot
            try:
                go_on = await self._websocket_connect(
                    conn, stream, event, upgrade, auth, tap, internal
                )
            finally:
                del self._anonymous[stream]
            slot.anonymous += 1
            return go_on and slot.anonymous < _ANONYMOUS_PER_CONNECTION
        if app is None:
            # a client without a key gets a few answers a connection, then must reconnect:
            # pipelined 401s (one a few us) cost it as little as us otherwise
            slot.anonymous += 1
            close = slot.anonymous >= _ANONYMOUS_PER_CONNECTION
            await self._send(conn, stream, _unauthorized(event), close=close, slot=slot)
            return not close and conn.our_state is h11.DONE
        req = Request(event.method, segments, _query(query), body, app, content_type)
        router = self.router
        where = (
            None if router is None
            else router.remote_internal(req) if internal
            else router.remote(req)
        )  # fmt: skip
        if segments == _PULL and event.method == b"GET" and where is None:
            if req.admin:  # an administrator key owns no channel
                await self._send(conn, stream, NOT_AN_ACCESS_KEY)
                return conn.our_state is h11.DONE
            told = _told(event.headers) if internal else None
            return await self._long_poll(conn, stream, app, told)
        self._answering += 1
        try:
            try:
                if where is None:
                    response = await self.api.dispatch(req)
                else:  # answered by another node, or by every node (proxy.py)
                    router = self.router
                    assert router is not None
                    headers: Sequence[tuple[bytes, bytes]] = event.headers
                    if segments == _PULL:  # (whether our client got the previous response)
                        headers = [(n, v) for n, v in headers if n != PREVIOUS_PULL_HEADER]
                        headers.append((PREVIOUS_PULL_HEADER, self._previous_pull(app)))
                    answer = partial(router.answer, where, req, event.target, headers,
                                     self.api.dispatch)  # fmt: skip
                    if segments != _PULL:
                        response = await answer()
                    elif (polled := await self._unless_hung_up(stream, answer)) is None:
                        return False  # (the home node saw the internal connection close)
                    else:
                        response = polled
                        if polled[0] == 200:  # (its arrival is told with the next poll)
                            self._relayed_pulls[app] = PullReceipt(stream.socket)
            except Exception:  # a handler's bug: answered, counted, logged (once a minute)
                self._server_error(event, number)
                response = INTERNAL_ERROR_V3 if segments[:1] == ["v3"] else INTERNAL_ERROR
            await self._send(conn, stream, response, close=self.stopping)
        finally:
            self._answering -= 1
            if not self._answering:
                self._answered.set()
        return conn.our_state is h11.DONE and not self.stopping

    async def _internal(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        slot: _Slot,
        event: h11.Request,
        body: bytes,
        internal: bool,
    ) -> bool:
        """Cluster mode: a request with a forged internal header, or one under `/internal/`
        (valid internal header only: else 403, counted). `POST /internal/events` hands its
        body to `relay` (404 while none is attached)."""
        assert self.router is not None
        if not internal:
            if CLUSTER_HEADER not in dict(event.headers):  # (a forged one is counted)
                self.router.statistics["internal_refused"] += 1
            slot.anonymous += 1
            close = slot.anonymous >= _ANONYMOUS_PER_CONNECTION
            await self._send(conn, stream, FORBIDDEN_INTERNAL, close=close, slot=slot)
            return not close and conn.our_state is h11.DONE
        path = event.target.partition(b"?")[0]
        if path != b"/internal/events" or self.relay is None:
            response = NOT_FOUND_ROUTE
        elif event.method != b"POST":
            response = BAD_METHOD
        else:
            self._answering += 1
            try:
                response = (await self.relay.receive(body), [], b"")
            finally:
                self._answering -= 1
                if not self._answering:
                    self._answered.set()
        await self._send(conn, stream, response, close=self.stopping)
        return conn.our_state is h11.DONE and not self.stopping

    def _server_error(self, event: h11.Request, number: int) -> None:
        first = self._unlogged.get("server_errors", 0) == 0
        self._refused("server_errors")
        if first:
            log.exception("HTTP request %s failed: %s %s", self.request_id(number),
                          event.method.decode(), _shown(event.target))  # fmt: skip

    def request_id(self, number: int) -> str:
        """The id of request `number` (32 hex digits, like Pelion's): a random prefix drawn
        when the server starts, then the number, so ids are unique across restarts too."""
        return f"{self._id_prefix}{number:016x}"

    async def _preflight(
        self, conn: h11.Connection, stream: trio.SocketStream, slot: _Slot, origin: bytes
    ) -> bool:
        """A CORS preflight (no key needed): 204 with the CORS headers for an allowed
        origin; 403 for any other, counted like a request without a key."""
        number, _ = self._current[stream]
        self._current[stream] = (number, [])  # (the answer has its own CORS headers)
        response = self.cors.preflight(origin)
        if response[0] < 300:  # (no key: sheddable while a client that does not read blocks it)
            await self._send(conn, stream, response, close=self.stopping, slot=slot)
            return conn.our_state is h11.DONE and not self.stopping
        self._refused("cors_refused")
        slot.anonymous += 1
        close = slot.anonymous >= _ANONYMOUS_PER_CONNECTION
        await self._send(conn, stream, response, close=close, slot=slot)
        return not close and conn.our_state is h11.DONE

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        response: Response,
        *,
        close: bool = False,
        linger: bool = True,
        slot: _Slot | None = None,
    ) -> None:
        """Send `response` within `send_timeout` (else trio.TooSlowError); with `close`, the
        connection is to close: it lingers first. With its `slot` (a refusal, an answer to
        a request without a valid key) the connection may be shed meanwhile (then
        trio.BrokenResourceError): a client that does not read its refusals holds no slot."""
        status, headers, body = response
        self.ops.count(status)
        current = self._current.get(stream)
        if current is not None:
            number, cors = current
            if cors:
                headers = [*headers, *cors]
            if status >= 400 and body.endswith(_NO_REQUEST_ID):  # an ErrorResponse
                body = b'%s%s"}' % (body[:-2], self.request_id(number).encode())
        if slot is None and status >= 400:
            slot = self._anonymous.get(stream)
        if status != 204:
            headers = [*headers, (b"content-length", b"%d" % len(body))]
        if close:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=_REASONS.get(status, b"")))  # fmt: skip
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        with trio.fail_after(self.options.send_timeout):
            if slot is None:
                await stream.send_all(data)
            else:
                with trio.CancelScope() as scope:
                    self._sheddable_from(slot, scope)
                    try:
                        await stream.send_all(data)
                    finally:
                        self._sheddable.pop(slot, None)
                if self._was_shed(slot, scope):
                    raise trio.BrokenResourceError("shed")
        if close and linger:
            await self._linger(stream, slot)

    async def _linger(
        self, stream: trio.SocketStream, slot: _Slot | None = None, budget: int | None = None
    ) -> None:
        """Before closing on an error, read what the client still sends (briefly): closing
        with unread data would reset the connection and lose the error response. Beyond
        `budget` bytes (16 `max_body` by default) nothing more is read: the connection is
        kept, unread, until `close_timeout` (or shed, with its `slot`)."""
        with trio.move_on_after(self.options.close_timeout) as scope:
            if slot is not None:
                self._sheddable_from(slot, scope)
            try:
                await stream.send_eof()
                left = 16 * self.options.max_body if budget is None else budget
                while left > 0 and (data := await stream.receive_some(_RECEIVE_SIZE)):
                    left -= len(data)
                if left <= 0:  # a client that keeps sending: it waits for the close
                    await trio.sleep_forever()
            finally:
                if slot is not None:
                    self._sheddable.pop(slot, None)
        if slot is not None:
            self._was_shed(slot, scope)

    # -- long poll ------------------------------------------------------------------------

    def _previous_pull(self, app: str) -> bytes:
        """Whether the last long-poll response this node relayed to `app`'s client reached
        it (`PullReceipt`, as the home node would judge its own connection); the receipts of
        other applications whose connection closed meanwhile take their verdict now."""
        receipts = self._relayed_pulls
        receipt = receipts.pop(app, None)
        lost = receipt is not None and receipt.lost()
        if receipt is not None:
            receipt.close()
        for other in [a for a, r in receipts.items() if r.check()]:
            del receipts[other]  # (its socket was closed: keep no duplicate of it)
        return b"lost" if lost else b"arrived"

    async def _long_poll(
        self, conn: h11.Connection, stream: trio.SocketStream, app: str, told: bool | None = None
    ) -> bool:
        """`GET /v2/notification/pull`: one message (200), or 204 after the timeout.

        Hand-over (Pelion's pull has no acknowledgement): the events of a 200 are held, and
        stored like the events waiting, until the application polls again, which
        acknowledges them, or deletes the channel. A response known not to have arrived (its
        connection was reset before the client read it, or the client's TCP never
        acknowledged it: `PullReceipt`) is sent again by that next poll. A poll relayed by
        another node (cluster mode) says whether that node's client got the previous response
        (`told`: True when lost): its internal connection says nothing about that.
        """
        hub = self.hub
        channel = hub.channels.get(app)
        if channel is None:
            channel = hub.open(app, LONG_POLLING)
        elif channel.mechanism != LONG_POLLING:
            response = text(400, "Another type of notification channel already exists.")
            await self._send(conn, stream, response)
            return conn.our_state is h11.DONE
        if channel.polling:
            await self._send(conn, stream, text(409, "A long poll is already pending."))
            return conn.our_state is h11.DONE
        if told is not None and isinstance(channel.receipt, ToldReceipt):
            channel.receipt.verdict = told
        if hub.settle(channel):  # this poll acknowledges the previous response
            log.info("long poll of %s: the previous response did not arrive; sent again", app)
        channel.poll(pending=True)
        try:
            if not channel.events and not await self._wait_or_hang_up(channel, stream):
                return False
            if channel.closed:  # deleted while this poll waited: a later poll makes a new one
                await self._send(conn, stream, CHANNEL_DELETED)
                return conn.our_state is h11.DONE
            if not channel.events:
                await self._send(conn, stream, NO_CONTENT)
                return conn.our_state is h11.DONE
            message, batch = channel.take()
            try:
                await self._send(conn, stream, (200, JSON, message))
            except BaseException:
                channel.unread(batch)
                raise
            hub.hold(channel, batch, PullReceipt(stream.socket) if told is None else ToldReceipt())
            return conn.our_state is h11.DONE
        finally:
            channel.poll(pending=False)

    async def _unless_hung_up(
        self, stream: trio.SocketStream, answer: Callable[[], Awaitable[Response]]
    ) -> Response | None:
        """A long poll relayed to the channel's home node: its answer, or None when the
        client hung up meanwhile (the internal request is then abandoned and its connection
        closed, so the home node's poll ends without taking events, as for a client of its
        own that hangs up)."""
        result = None

        async def watch(scope: trio.CancelScope) -> None:
            try:
                peek = await stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if peek:
                await trio.sleep_forever()  # a pipelined request: the client is still there
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            result = await answer()
            nursery.cancel_scope.cancel()
        return result

    async def _wait_or_hang_up(self, channel: Channel, stream: trio.SocketStream) -> bool:
        """Wait for events until the poll timeout; False if the client hung up meanwhile."""
        hung_up = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal hung_up
            try:
                peek = await stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if peek:
                await trio.sleep_forever()  # a pipelined request: the client is still there
            hung_up = True
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            with trio.move_on_after(self.options.long_poll_timeout):
                await channel.wait()
            nursery.cancel_scope.cancel()
        return not hung_up

    # -- WebSocket ------------------------------------------------------------------------

    async def _websocket_connect(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        event: h11.Request,
        upgrade: bytes | None,
        auth: bytes | None,
        tap: bool = False,
        internal: bool = False,
    ) -> bool:
        """Authenticate the upgrade, hand it to trio-websocket, then serve the channel (or,
        with `tap`, an administrator's event tap: `Console.serve_tap`). In cluster mode, a
        channel homed on another node is relayed there (`_relay`).

        trio-websocket writes through a `FrameStream`, so that a message abandoned half-way
        (a client too slow to take it) never cuts a frame and a close frame can follow it.
        Returns True when the upgrade was refused over HTTP and the connection may go on.
        """
        protocols: list[str] = []
        key = version = connection = False
        for name, value in event.headers:
            if name == b"sec-websocket-protocol":
                protocols += [p.strip() for p in value.decode("latin-1").split(",")]
            elif name == b"connection":
                connection = connection or b"upgrade" in _tokens(value)
            elif name == b"sec-websocket-key":
                key = True
            elif name == b"sec-websocket-version":
                version = value == b"13"
        app = self.keys.from_subprotocols(protocols) or self.keys.from_authorization(auth)
        refusal = None
        if upgrade is None or upgrade.lower() != b"websocket":
            refusal = text(426, "Upgrade to websocket required.")
        elif app is not None and not connection:
            refusal = text(400, "Connection: Upgrade is required.")
        elif app is not None and (malformed := _undecodable(event)) is not None:
            self._counts["bad_requests"] += 1  # (wsproto would raise, not answer)
            refusal = text(400, f"Malformed WebSocket upgrade: {malformed} header")
        elif app is not None and not (key and version):
            refusal = text(400, "Sec-WebSocket-Key and Sec-WebSocket-Version 13 are required.")
        elif app is not None and is_admin(app) and not tap:
            refusal = NOT_AN_ACCESS_KEY  # an administrator key owns no channel
        elif app is not None and tap and not is_admin(app):
            refusal = ADMIN_ONLY
        if refusal is not None or app is None:
            await self._send(conn, stream, refusal or UNAUTHORIZED)
            return conn.our_state is h11.DONE
        if self.router is not None and not internal and not tap:
            where = self.router.home(app)
            if where is not None:
                return await self._relay(conn, stream, event, protocols, where)
        prefix = _request_bytes(event) + conn.trailing_data[0]
        frames = FrameStream(ReplayStream(stream, prefix), stream.socket)
        async with trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_after(self.options.handshake_timeout):
                request = await wrap_server_stream(nursery, frames)
                ws = await request.accept(subprotocol=self._subprotocol(protocols))
            if ws is not None and tap:
                await self.console.serve_tap(ws)
            elif ws is not None:
                await self._websocket(ws, app, nursery, frames)
            nursery.cancel_scope.cancel()
        if ws is not None and frames.lingering:
            await frames.linger(4 * self.options.ping_interval)
        return False

    async def _relay(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        event: h11.Request,
        protocols: list[str],
        where: Route,
    ) -> bool:
        """A WebSocket whose channel is homed on another node: opened there first (its
        refusal, or 503 when it cannot be reached, is the client's answer), then the client's
        upgrade is accepted with the subprotocol the home node chose and messages are piped
        both ways; a close on either side is passed on with its code."""
        router = self.router
        assert router is not None
        if where.node is None:
            await self._send(conn, stream, unavailable(NO_OWNER))
            return conn.our_state is h11.DONE
        async with router.websocket(where.node, event.target, event.headers, protocols) as home:
            if not isinstance(home, WebSocketConnection):
                await self._send(conn, stream, home)
                return conn.our_state is h11.DONE
            prefix = _request_bytes(event) + conn.trailing_data[0]
            frames = FrameStream(ReplayStream(stream, prefix), stream.socket)
            async with trio.open_nursery() as nursery:
                ws = None
                with trio.move_on_after(self.options.handshake_timeout):
                    request = await wrap_server_stream(nursery, frames)
                    ws = await request.accept(subprotocol=home.subprotocol)
                if ws is not None:
                    code, reason = await router.pipe(ws, home)
                    if code == 1001 and reason is not None and reason.startswith("Too slow"):
                        self._counts["websockets_too_slow"] += 1
                    await self._close(ws, code, reason, frames)
                nursery.cancel_scope.cancel()
            if ws is not None and frames.lingering:
                await frames.linger(4 * self.options.ping_interval)
        return False

    def _subprotocol(self, offered: list[str]) -> str | None:
        """The subprotocol the handshake selects: `wss` when offered, else the offered
        `pelion_<key>` that names a valid key (RFC 6455 4.2.2: the selected value must be
        one the client offered, and browsers and Node's `ws` fail a handshake that selects
        none of a non-empty offer); None when nothing usable was offered."""
        if "wss" in offered:
            return "wss"
        for protocol in offered:
            if self.keys.from_subprotocols((protocol,)) is not None:
                return protocol  # the client's own key, back on its own connection only
        return None

    async def _websocket(
        self, ws: WebSocketConnection, app: str, nursery: trio.Nursery, frames: FrameStream
    ) -> None:
        """Send the channel's messages, one at a time, until the channel or the socket ends.

        Hand-over: an event is forgotten once the frame holding it is written to the
        socket (the kernel took it). A client that does not take a message within
        `ping_interval` (the kernel's buffers stay full), or answers no ping within it, is
        closed with 1001 and a reason: the message being sent goes back to the channel,
        whose status is "disconnected" from that moment.
        """
        channel = self.hub.channels.get(app)
        if channel is None or channel.mechanism != WEB_SOCKET:
            await self._close(ws, 1011, "No channel: PUT /v2/notification/websocket first.")
            return
        limit = self.options.ping_interval
        session = Session(patience=limit)
        channel.attach(session)
        nursery.start_soon(self._drain, ws, session, channel)
        nursery.start_soon(self._ping, ws, session, channel)
        try:
            with session.scope:  # `Session.abort` cancels a send in progress
                while True:
                    await channel.wait(session)
                    if session.close_code is not None or channel.closed:
                        break
                    message, batch = channel.take()
                    try:
                        with trio.fail_after(limit):
                            await ws.send_message(message.decode())
                    except ConnectionClosed:
                        channel.unread(batch)
                        break
                    except trio.TooSlowError:
                        channel.unread(batch)
                        session.stop(1001, f"Too slow: a message not taken within {limit:g} s.")
                        break
                    except BaseException:
                        channel.unread(batch)
                        raise
                    self.hub.delivered(channel, batch)
        finally:
            channel.detach(session)
        if session.reason is not None and session.reason.startswith("Too slow"):
            self._too_slow(app, session.reason)
        await self._close(ws, session.close_code or 1000, session.reason, frames)

    async def _drain(self, ws: WebSocketConnection, session: Session, channel: Channel) -> None:
        """Read (and ignore) what the client sends, to notice when it closes."""
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            session.abort(1000)
            channel.wake()

    async def _ping(self, ws: WebSocketConnection, session: Session, channel: Channel) -> None:
        """Ping every `ping_interval`; a client that does not answer in time is closed (1001,
        with the reason), and a message being sent to it is abandoned."""
        interval = self.options.ping_interval
        try:
            while True:
                await trio.sleep(interval)
                with trio.move_on_after(interval) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    session.abort(1001, f"Too slow: no pong within {interval:g} s.")
                    break
        except ConnectionClosed:
            session.abort(1001)
        channel.wake()

    def _too_slow(self, app: str, reason: str) -> None:
        """Log (once per socket) and count a WebSocket closed because its client is too slow."""
        log.info("WebSocket of %s closed (1001): %s", app, reason)
        self._counts["websockets_too_slow"] += 1

    async def _close(
        self,
        ws: WebSocketConnection,
        code: int,
        reason: str | None = None,
        frames: FrameStream | None = None,
    ) -> None:
        """Close with `code` and `reason`, within `close_timeout`; while the client takes
        the rest of a frame begun (and then the close frame), the deadline moves on with each
        write, for at most `ping_interval` in all (the kernel then sends what it holds)."""
        timeout = self.options.close_timeout
        cap = trio.current_time() + max(timeout, self.options.ping_interval)
        with trio.move_on_after(timeout) as scope:
            if frames is not None:

                def progress() -> None:
                    scope.deadline = min(cap, trio.current_time() + timeout)

                frames.on_progress = progress
                if code != 1000:  # a slow client: the close frame waits behind its backlog
                    frames.make_room()
                    frames.lingering = True
            await ws.aclose(code, reason)
        if frames is not None:
            frames.on_progress = None


class ToldReceipt:
    """The receipt of a long-poll response relayed by another node: lost or not as the next
    relayed poll tells (`x-dm-previous-pull`); arrived when a poll of our own comes next."""

    __slots__ = ("verdict",)

    def __init__(self) -> None:
        self.verdict = False

    def lost(self) -> bool:
        return self.verdict

    def check(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _told(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A relayed poll's word on the previous response: True when it was lost."""
    return any(n == PREVIOUS_PULL_HEADER and v == b"lost" for n, v in headers)


def _peer(stream: trio.SocketStream) -> object:
    try:
        return stream.socket.getpeername()
    except OSError:
        return "?"


def _wall_clock(sup: Supervisor) -> float:
    """Now, by the supervisor's injected wall clock: Trio time plus its `wall_offset` (the
    offset is read at each call: it is set when the supervisor starts)."""
    return trio.current_time() + sup.wall_offset


def _parts_allowed(size: int) -> int:
    """The parts (chunks, or reads of a trickled body) a body of `size` bytes may arrive
    in: 1024, plus one per 256 bytes."""
    return 1024 + size // 256


def _address(stream: trio.SocketStream) -> str:
    """The client's IP address (the key of `max_connections_per_address`)."""
    peer = _peer(stream)
    return str(peer[0]) if isinstance(peer, tuple) else "?"


def _query(query: str) -> dict[str, str]:
    """The query string's parameters (the last of a repeated name wins; bad escapes are
    replaced, not refused: each route validates the values it reads; `max_header` bounds
    their number). A blank value is kept: `id__in=` is a filter (an empty selection), not
    an absent one; a route refuses a blank value it cannot use (`limit=`: 400)."""
    return dict(parse_qsl(query, keep_blank_values=True)) if query else {}


def _unauthorized(event: h11.Request) -> Response:
    """The 401 for `event`: Pelion's JSON `ErrorResponse` on `/v3`, else plain text."""
    path = event.target.partition(b"?")[0]
    return UNAUTHORIZED_V3 if path == b"/v3" or path.startswith(b"/v3/") else UNAUTHORIZED


def _tokens(value: bytes) -> list[bytes]:
    """The lowercased tokens of a comma-separated header value (`Connection: keep-alive,
    Upgrade`)."""
    return [t.strip().lower() for t in value.split(b",")]


def _undecodable(event: h11.Request) -> str | None:
    """The name of a header of a WebSocket upgrade that wsproto cannot decode (it raises
    UnicodeError, not a protocol error, for a `Host` that is not IDNA or a non-ASCII
    `Connection`, `Sec-WebSocket-Protocol` or `Sec-WebSocket-Extensions`), or None."""
    for name, value in event.headers:
        codec = _WSPROTO_CODECS.get(name)
        if codec is not None:
            try:
                value.decode(codec)
            except UnicodeError:
                return name.decode()
    return None


def _shown(target: bytes) -> str:
    """A request target for the log (h11 lets only visible ASCII through), at most 200
    characters."""
    shown = target.decode("ascii", "replace")
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _request_bytes(event: h11.Request) -> bytes:
    """The request line and headers of `event`, as the client sent them (names' case kept),
    but `Connection` field lines merged into one where the first was (RFC 9110 5.3: the
    same list; wsproto reads only the last line, the server's own check reads them all)."""
    lines = [b"%s %s HTTP/1.1" % (event.method, event.target)]
    raw = event.headers.raw_items()
    merged = b", ".join(value for name, value in raw if name.lower() == b"connection")
    done = False
    for name, value in raw:
        if name.lower() == b"connection":
            if done:
                continue
            value, done = merged, True
        lines.append(b"%s: %s" % (name, value))
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def serve_http(
    supervisor: Supervisor,
    host: str,
    port: int,
    api_keys: ApiKeys,
    options: HttpOptions | None = None,
    channels: Sequence[ChannelRecord] = (),
    *,
    cluster: ClusterView | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API, the notification channels and the WebSocket on one port.

    Start it with `address = await nursery.start(serve_http, sup, host, port, keys)`; it runs
    until cancelled. It is the only reader of `supervisor.events`.
    """
    server = HttpServer(supervisor, api_keys, options, channels, cluster)
    await server.run(host, port, task_status=task_status)
