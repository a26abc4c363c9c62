"""Cluster mode's HTTP between nodes: any node serves the API, the node that owns a device's
slot answers for that device (so 202/409/429/404 stay exact), and the node that owns an
application's home slot serves its notification channel (docs/api.md, "Cluster mode").

- `route` decides where a request is answered: here (`LOCAL`), on another node (`Route`
  with the node's name), nowhere for now (`NOBODY`: its slot has no owner: 503), gathered
  from every live node (`GATHER`: the device list), or applied here and on every other
  live node (`EVERY`: pre-subscriptions).
- `PeerPool` is the internal HTTP/1.1 client: h11 over Trio, a bounded pool of keep-alive
  connections per peer, every exchange bounded by a timeout.
- Internal requests carry `X-DM-Cluster: <hex HMAC-SHA-256>` over the method, the target
  and the time in `X-DM-Cluster-Time`, keyed by the cluster's secret (`sign`, `verify`):
  the receiver serves them locally (never proxies them again: no loops). A request with a
  forged, missing-time or old MAC is refused 403 and counted.
- `ClusterRouter` puts those together for `HttpServer`: `check` (the internal header),
  `remote` and `answer` (a request answered elsewhere), `websocket` and `pipe` (a
  WebSocket relayed to the application's home node).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

import h11
import msgspec
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import LocalProtocolError

from dm_actor.api.routes import Request, error_v3, json
from dm_actor.api.schemas import DeviceData, DeviceList
from dm_actor.cluster.slots import home_slot, slot_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from dm_actor.api.routes import Headers, Response
    from dm_actor.cluster.view import ClusterView, HostPort

log = logging.getLogger(__name__)

#: the header of an internal request: hex HMAC-SHA-256 (`sign`)
CLUSTER_HEADER = b"x-dm-cluster"
#: ... and the wall-clock time it was signed at (seconds, 3 decimals)
CLUSTER_TIME_HEADER = b"x-dm-cluster-time"
#: an internal request signed longer ago (or later) than this is refused (s)
MAX_SKEW = 30.0
#: after a 503 of the proxy, the client may retry after this (s)
RETRY_AFTER = b"1"
#: a peer's answer beyond this is refused (the peer is then treated as unreachable)
MAX_RESPONSE = 64 << 20
_RECEIVE = 65536

#: request headers never passed on (hop-by-hop, or set by the proxy)
_NOT_FORWARDED = frozenset((
    b"host", b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te",
    b"trailer", b"upgrade", b"expect", b"origin", b"proxy-connection", CLUSTER_HEADER,
    CLUSTER_TIME_HEADER, b"access-control-request-method", b"access-control-request-headers",
))  # fmt: skip
#: A relayed long poll tells the home node whether the relaying node's client got the
#: previous response (`lost` or `arrived`): the home node cannot see that connection.
PREVIOUS_PULL_HEADER = b"x-dm-previous-pull"
#: response headers never passed back (hop-by-hop, or set by this node's `_send`)
_NOT_RETURNED = frozenset((
    b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"trailer",
))  # fmt: skip


def sign(secret: bytes, method: bytes, target: bytes, stamp: bytes, body: bytes = b"") -> bytes:
    """The MAC of an internal request (hex): HMAC-SHA-256 over method, target, time and the
    body's SHA-256 (a captured header signs no other body: the issue-17 attacker posted its
    own events with one)."""
    digest = hashlib.sha256(body).hexdigest().encode()
    message = b"%s\n%s\n%s\n%s" % (method, target, stamp, digest)
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode()


def internal_headers(
    secret: bytes, method: bytes, target: bytes, now: float, body: bytes = b""
) -> Headers:
    """The headers that make a request with `body` internal, signed at wall-clock `now`."""
    stamp = b"%.3f" % now
    mac = sign(secret, method, target, stamp, body)
    return [(CLUSTER_HEADER, mac), (CLUSTER_TIME_HEADER, stamp)]


def verify(
    secret: bytes,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    now: float,
    body: bytes | None = None,
) -> bool | None:
    """None when the request carries no internal header; True for a valid one (signed within
    `MAX_SKEW` of `now` with `secret`, over `body`); False for any other (forged, old,
    malformed, two). With `body` None only the time is checked (before the body is read:
    `ClusterRouter.check`; the MAC is checked with the body, `ClusterRouter.confirm`)."""
    macs = [v for n, v in headers if n == CLUSTER_HEADER]
    stamps = [v for n, v in headers if n == CLUSTER_TIME_HEADER]
    if not macs and not stamps:
        return None
    if len(macs) != 1 or len(stamps) != 1 or not secret:
        return False
    try:
        at = float(stamps[0])
    except ValueError:
        return False
    if not abs(now - at) <= MAX_SKEW:  # (NaN too)
        return False
    if body is None:
        return True
    return hmac.compare_digest(sign(secret, method, target, stamps[0], body), macs[0].strip())


# -- where a request is answered ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request is answered: `kind` is one of the constants below; `node` names the
    node of `OWNER`."""

    kind: str
    node: str | None = None


LOCAL = Route("local")
NOBODY = Route("nobody")  # the slot has no owner now: 503
GATHER = Route("gather")  # the device list: every live node's part, merged
EVERY = Route("every")  # applied here, then on every other live node
OWNER = "owner"

#: /admin/{what}/{device-id}... routes that name a device (console.py)
_ADMIN_DEVICE = frozenset(("devices", "device-requests", "subscriptions"))


def route(view: ClusterView, method: bytes, segments: Sequence[str], app: str) -> Route:
    """Where the request of `app` for `segments` (percent-decoded) is answered.

    Device-scoped (the owner of the device's slot): `/v2/device-requests/{id}`,
    `/v2/subscriptions/{id}[/{path}]`, `/v2/endpoints/{id}`, `/v3/devices/{id}`,
    `/admin/devices|device-requests|subscriptions/{id}...`. Channel-scoped (the owner of the
    application's home slot): `/v2/notification/*`, `/admin/async-responses/{id}`. The device
    list `GET /v3/devices`: GATHER. Pre-subscriptions `PUT|DELETE /v2/subscriptions`: EVERY.
    Anything else (health, metrics, credentials, the console, the overview): LOCAL.
    """
    n = len(segments)
    first = segments[0] if n else ""
    second = segments[1] if n > 1 else ""
    third = segments[2] if n > 2 else ""
    device: str | None = None
    if first == "v2":
        if second in ("device-requests", "endpoints") and n == 3 and third:
            device = third
        elif second == "subscriptions":
            if third:
                device = third
            elif n <= 3 and method in (b"PUT", b"DELETE"):
                return EVERY
        elif second == "notification":
            return _at(view, home_slot(app, view.slot_count))
    elif first == "v3" and second == "devices":
        rest = [s for s in segments[2:] if s]
        if len(rest) == 1:
            device = rest[0]
        elif not rest and method == b"GET":
            return GATHER
    elif first == "admin" and n >= 3 and third:
        if second in _ADMIN_DEVICE:
            device = third
        elif second == "async-responses":
            return _at(view, home_slot(app, view.slot_count))
    if device is None:
        return LOCAL
    return _at(view, slot_of(device, view.slot_count))


def home_route(view: ClusterView, app: str) -> Route:
    """Where `app`'s notification channel is served."""
    return _at(view, home_slot(app, view.slot_count))


def _at(view: ClusterView, slot: int) -> Route:
    owner = view.owner(slot)
    if owner is None:
        return NOBODY
    if owner == view.node:  # (ours, but past our deadline or being handed over: wait)
        return LOCAL if view.mine(slot) else NOBODY
    return Route(OWNER, owner)


# -- the internal HTTP client -------------------------------------------------------------


class PeerUnreachable(Exception):
    """A peer could not be reached, or did not answer in time or in HTTP."""


class _Stale(Exception):
    """A kept-alive connection the peer had closed before it read the request."""


class _Connection:
    __slots__ = ("conn", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)


class PeerPool:
    """Keep-alive HTTP/1.1 connections to peer nodes: at most `max_per_peer` exchanges at
    once per peer (more wait, within their timeout), at most `idle_per_peer` idle
    connections kept per peer. A request on a kept connection the peer had closed is sent
    once more on a new one."""

    def __init__(
        self, *, connect_timeout: float = 3.0, max_per_peer: int = 128, idle_per_peer: int = 16
    ) -> None:
        self.connect_timeout = connect_timeout
        self.max_per_peer = max_per_peer
        self.idle_per_peer = idle_per_peer
        self._idle: dict[HostPort, deque[_Connection]] = {}
        self._limits: dict[HostPort, trio.CapacityLimiter] = {}
        self.connections = 0  # opened, in all

    async def request(
        self,
        address: HostPort,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes,
        within: float,
    ) -> Response:
        """Send one request to `address`, return its answer; PeerUnreachable when the peer
        cannot be reached or does not answer `within` seconds."""
        limit = self._limits.get(address)
        if limit is None:
            limit = self._limits[address] = trio.CapacityLimiter(self.max_per_peer)
        host = b"%s:%d" % (address[0].encode(), address[1])
        head = [(b"host", host), *headers, (b"content-length", b"%d" % len(body))]
        try:
            with trio.fail_after(within):
                async with limit:
                    for attempt in range(2):
                        idle = self._idle.get(address)
                        reused = bool(idle) and attempt == 0
                        c = idle.pop() if idle and reused else await self._connect(address)
                        try:
                            response, keep = await _exchange(c, method, target, head, body)
                        except _Stale:
                            await trio.aclose_forcefully(c.stream)
                            if reused:  # (the peer closed it, or restarted: the others too)
                                while idle:
                                    idle.pop().stream.socket.close()
                                continue
                            raise PeerUnreachable("connection closed before an answer") from None
                        except BaseException:
                            await trio.aclose_forcefully(c.stream)
                            raise
                        self._release(address, c, keep)
                        return response
        except trio.TooSlowError:
            raise PeerUnreachable(f"no answer within {within:g} s") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
                ValueError) as exc:  # fmt: skip
            raise PeerUnreachable(str(exc) or type(exc).__name__) from None
        raise PeerUnreachable("connection closed before an answer")

    async def _connect(self, address: HostPort) -> _Connection:
        with trio.fail_after(self.connect_timeout):
            stream = await trio.open_tcp_stream(*address)
        self.connections += 1
        return _Connection(stream)

    def _release(self, address: HostPort, c: _Connection, keep: bool) -> None:
        idle = self._idle.setdefault(address, deque())
        if keep and len(idle) < self.idle_per_peer:
            c.conn.start_next_cycle()
            idle.append(c)
        else:
            c.stream.socket.close()

    def close(self) -> None:
        """Close every idle connection (the server stops)."""
        for idle in self._idle.values():
            while idle:
                idle.pop().stream.socket.close()


async def _exchange(
    c: _Connection, method: bytes, target: bytes, headers: Headers, body: bytes
) -> tuple[Response, bool]:
    """One request and its answer on `c`; whether `c` may be kept for another."""
    conn, stream = c.conn, c.stream
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    if body:
        data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        raise _Stale from None
    response: h11.Response | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if response is None and not conn.trailing_data[0]:
                raise _Stale from None
            raise
        if event is h11.NEED_DATA:
            try:
                conn.receive_data(await stream.receive_some(_RECEIVE))
            except trio.BrokenResourceError:
                conn.receive_data(b"")
            continue
        if isinstance(event, h11.ConnectionClosed):
            if response is None:
                raise _Stale
            raise PeerUnreachable("connection closed mid-answer")
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_RESPONSE:
                raise PeerUnreachable("answer too large")
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
    assert response is not None
    keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE
    headers_back = [(n, v) for n, v in response.headers if n not in _NOT_RETURNED]
    return (response.status_code, headers_back, b"".join(chunks)), keep


# -- the router -----------------------------------------------------------------------------


def unavailable(message: str) -> Response:
    """503 with Retry-After and Pelion's JSON `ErrorResponse`."""
    status, headers, body = error_v3(503, "service_unavailable", message)
    return status, [*headers, (b"retry-after", RETRY_AFTER)], body


NO_OWNER = "No node serves this device or channel now (a failover): try again."
_decode_page = msgspec.json.Decoder(DeviceList).decode
#: the statistics `ClusterRouter.statistics` counts
STATISTICS = (
    "proxied",  # requests answered by another node
    "gathered",  # device lists gathered from every live node
    "broadcast",  # pre-subscription writes sent to every other live node
    "unreachable",  # 503s: a peer not reached or not answering in time, or no owner
    "internal_refused",  # requests with a forged, old or malformed internal header (403)
    "websockets_relayed",  # WebSockets relayed to the home node
)


class ClusterRouter:
    """Routing of the HTTP API in cluster mode (one per `HttpServer`).

    Args:
        view: the cluster as this node sees it.
        wall: the wall clock (seconds since the epoch) that signs and checks internal calls.
        timeout: for a proxied request's answer (s); a long poll gets `long_poll` more.
        long_poll: the HTTP port's long-poll timeout (s).
        ping_interval: a relayed WebSocket's client must take a message within this (s).
    """

    def __init__(
        self,
        view: ClusterView,
        wall: Callable[[], float],
        *,
        timeout: float = 60.0,
        long_poll: float = 30.0,
        ping_interval: float = 30.0,
        handshake_timeout: float = 10.0,
        pool: PeerPool | None = None,
    ) -> None:
        self.view = view
        self.wall = wall
        self.timeout = timeout
        self.long_poll = long_poll
        self.ping_interval = ping_interval
        self.handshake_timeout = handshake_timeout
        self.pool = pool or PeerPool()
        self.statistics = dict.fromkeys(STATISTICS, 0)
        self._logged: set[str] = set()

    # -- the internal header

    def check(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether the request says it is internal (its MAC is checked with its body:
        `confirm`); False when it carries no internal header. Raises `Forged` when its
        header is malformed or old (answer 403)."""
        verdict = verify(self.view.secret, method, target, headers, self.wall())
        if verdict is False:
            self._forged()
        return bool(verdict)

    def confirm(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """A request that said it is internal, its body read: raises `Forged` unless its MAC
        signs this method, target, time and body."""
        if not verify(self.view.secret, method, target, headers, self.wall(), body):
            self._forged()

    def _forged(self) -> NoReturn:
        self.statistics["internal_refused"] += 1
        self._log_once("forged", "an internal request with a forged or old MAC refused")
        raise Forged

    def sign(self, method: bytes, target: bytes, body: bytes = b"") -> Headers:
        """The internal headers of a request with `body` this node sends now."""
        return internal_headers(self.view.secret, method, target, self.wall(), body)

    # -- proxied requests

    def remote(self, req: Request) -> Route | None:
        """Where `req` is answered when not here; None for here."""
        r = route(self.view, req.method, req.segments, req.app)
        return None if r is LOCAL else r

    def remote_internal(self, req: Request) -> Route | None:
        """Where a request another node sent here is answered: here (None), unless it is
        about a device or a channel whose slot this node does not serve (yet: a handover's
        receiver before it loaded the slot; or any more): NOBODY, a 503 the caller retries,
        never a 404 for a device that is only moving."""
        r = route(self.view, req.method, req.segments, req.app)
        return None if r is LOCAL or r is GATHER or r is EVERY else NOBODY

    def home(self, app: str) -> Route | None:
        """Where `app`'s channel is served when not here; None for here."""
        r = home_route(self.view, app)
        return None if r is LOCAL else r

    async def answer(
        self,
        where: Route,
        req: Request,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        local: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        """The answer to `req` (routed to `where`, not LOCAL): from its owner, gathered, or
        applied everywhere; `local` answers it on this node."""
        if where is NOBODY:
            self.statistics["unreachable"] += 1
            return unavailable(NO_OWNER)
        forwarded = [(n, v) for n, v in headers if n.lower() not in _NOT_FORWARDED]
        if where is GATHER:
            return await self._gather(req, target, forwarded, local)
        if where is EVERY:
            return await self._everywhere(req, target, forwarded, local)
        assert where.node is not None
        timeout = self.timeout
        if req.segments == ["v2", "notification", "pull"]:
            timeout += self.long_poll
        response = await self._forward(where.node, req, target, forwarded, timeout)
        if response is not None:
            self.statistics["proxied"] += 1
            return response
        return unavailable(f"Node {where.node} could not be reached: try again.")

    async def _forward(
        self,
        node: str,
        req: Request,
        target: bytes,
        headers: Headers,
        within: float | None = None,
    ) -> Response | None:
        """`req` answered by `node`; None when it could not be (logged once, counted)."""
        address = self.view.http_address(node)
        if address is None:
            self.statistics["unreachable"] += 1
            self._log_once(node, f"node {node} has no known HTTP address")
            return None
        signed = [*headers, *self.sign(req.method, target, req.body)]
        try:
            response = await self.pool.request(
                address, req.method, target, signed, req.body, within or self.timeout
            )
        except PeerUnreachable as exc:
            self.statistics["unreachable"] += 1
            self._log_once(node, f"node {node} at {address[0]}:{address[1]} unreachable: {exc}")
            return None
        self._logged.discard(node)  # (its next trouble is logged again)
        return response

    async def _gather(
        self,
        req: Request,
        target: bytes,
        headers: Headers,
        local: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        """`GET /v3/devices`: this node's page first (its 400s are the answer), then every
        other live node's, all at once; merged by id in the order asked, `limit` kept,
        `total_count` summed. Any peer not answering: 503 (a list missing a node's devices
        would be silently wrong)."""
        mine = await local(req)
        if mine[0] != 200:
            return mine
        others = [n for n in self.view.live_nodes() if n != self.view.node]
        answers: dict[str, Response | None] = {}

        async def ask(node: str) -> None:
            answers[node] = await self._forward(node, req, target, headers)

        async with trio.open_nursery() as nursery:
            for node in others:
                nursery.start_soon(ask, node)
        pages = [_decode_page(mine[2])]
        for node in others:
            answer = answers[node]
            if answer is None:
                return unavailable(f"Node {node} could not be reached: try again.")
            if answer[0] != 200:
                return answer
            try:
                pages.append(_decode_page(answer[2]))
            except (msgspec.ValidationError, msgspec.DecodeError):
                return unavailable(f"Node {node} answered a list that is not one.")
        self.statistics["gathered"] += 1
        first = pages[0]
        seen: dict[str, DeviceData] = {}
        for page in pages:
            for device in page.data:
                seen.setdefault(device.id, device)
        ordered = sorted(seen, reverse=first.order == "DESC")
        kept = ordered[: first.limit]
        return json(
            200,
            DeviceList(
                limit=first.limit,
                order=first.order,
                has_more=len(ordered) > first.limit or any(p.has_more for p in pages),
                total_count=sum(p.total_count for p in pages),
                after=first.after,
                data=[seen[i] for i in kept],
            ),
        )

    async def _everywhere(
        self,
        req: Request,
        target: bytes,
        headers: Headers,
        local: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        """A pre-subscription write: applied here; once it succeeded, sent to every other
        live node at once. A node that did not take it: 503 (the write is idempotent: the
        client's retry applies it everywhere)."""
        mine = await local(req)
        if mine[0] >= 300:
            return mine
        others = [n for n in self.view.live_nodes() if n != self.view.node]
        failed: list[str] = []

        async def send(node: str) -> None:
            answer = await self._forward(node, req, target, headers)
            if answer is None or answer[0] >= 300:
                failed.append(node)

        async with trio.open_nursery() as nursery:
            for node in others:
                nursery.start_soon(send, node)
        self.statistics["broadcast"] += 1
        if failed:
            names = ", ".join(sorted(failed))
            return unavailable(f"Applied here, not on node(s) {names}: send it again.")
        return mine

    async def send_events(self, node: str, body: bytes) -> int:
        """`POST /internal/events` with `body` to `node` (the `send` of relay.py's
        EventRelay): the status it answered. Raises PeerUnreachable (also for a node with no
        known HTTP address)."""
        address = self.view.http_address(node)
        if address is None:
            raise PeerUnreachable(f"node {node} has no known HTTP address")
        target = b"/internal/events"
        headers = [(b"content-type", b"application/json"), *self.sign(b"POST", target, body)]
        status, _, _ = await self.pool.request(
            address, b"POST", target, headers, body, self.timeout
        )
        return status

    # -- WebSockets

    @asynccontextmanager
    async def websocket(
        self,
        node: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        protocols: list[str],
    ) -> AsyncIterator[WebSocketConnection | Response]:
        """A WebSocket to `node` (the application's home) for the client's upgrade; or the
        answer to give the client instead: the home node's refusal, or 503."""
        address = self.view.http_address(node)
        if address is None:
            self.statistics["unreachable"] += 1
            yield unavailable(f"Node {node} could not be reached: try again.")
            return
        extra = [(n, v) for n, v in headers if n.lower() == b"authorization"]
        extra += self.sign(b"GET", target)
        ws: WebSocketConnection | Response
        try:
            with trio.fail_after(self.handshake_timeout):
                stream = await trio.open_tcp_stream(*address)
        except (OSError, trio.TooSlowError) as exc:
            self.statistics["unreachable"] += 1
            self._log_once(node, f"node {node} unreachable for a WebSocket: {exc}")
            yield unavailable(f"Node {node} could not be reached: try again.")
            return
        async with stream, trio.open_nursery() as nursery:
            readers: trio.Nursery = await nursery.start(_guarded)
            try:
                with trio.fail_after(self.handshake_timeout):
                    ws = await wrap_client_stream(
                        readers, stream, f"{address[0]}:{address[1]}", target.decode("ascii"),
                        subprotocols=protocols or None, extra_headers=extra,
                        message_queue_size=1,
                    )  # fmt: skip
            except ConnectionRejected as exc:
                back = [(n, v) for n, v in exc.headers if n.lower() not in _NOT_RETURNED]
                ws = (exc.status_code, back, exc.body or b"")
            except (HandshakeError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                    ConnectionClosed) as exc:  # fmt: skip
                self.statistics["unreachable"] += 1
                self._log_once(node, f"node {node}: WebSocket handshake failed: {exc!r}")
                ws = unavailable(f"Node {node} could not be reached: try again.")
            try:
                yield ws
            finally:
                if isinstance(ws, WebSocketConnection):
                    with trio.move_on_after(self.handshake_timeout):
                        await ws.aclose()
                nursery.cancel_scope.cancel()

    async def pipe(
        self, client: WebSocketConnection, home: WebSocketConnection
    ) -> tuple[int, str | None]:
        """Relay messages both ways until one side closes; the close code and reason to give
        the other side. The client must take each message, and answer a ping sent every
        `ping_interval`, within `ping_interval` (else it is closed 1001 and the home socket
        too, as the home node would do): one message in flight at a time each way
        (trio-websocket's queue of 1)."""
        self.statistics["websockets_relayed"] += 1
        result: tuple[int, str | None] | None = None  # (the first side to decide it)
        limit = self.ping_interval

        async def down(scope: trio.CancelScope) -> None:  # home -> client
            nonlocal result
            try:
                while True:
                    message = await home.get_message()
                    try:
                        with trio.fail_after(limit):
                            await client.send_message(message)
                    except trio.TooSlowError:
                        reason = f"Too slow: a message not taken within {limit:g} s."
                        result = result or (1001, reason)
                        with trio.move_on_after(self.handshake_timeout):
                            await home.aclose(1001, reason)
                        break
            except ConnectionClosed as exc:
                if result is None and exc.reason is not None and exc.reason.code is not None:
                    result = (exc.reason.code, exc.reason.reason)
                if client.closed is not None and home.closed is None:
                    # the client went first: tell the home node the same
                    code = client.closed.code or 1000
                    with trio.move_on_after(self.handshake_timeout):
                        await home.aclose(code, client.closed.reason)
            scope.cancel()

        async def up(scope: trio.CancelScope) -> None:  # client -> home
            try:
                while True:
                    message = await client.get_message()
                    with trio.fail_after(limit):
                        await home.send_message(message)
            except (ConnectionClosed, trio.TooSlowError):
                pass
            if client.closed is not None and home.closed is None:
                code = client.closed.code or 1000
                with trio.move_on_after(self.handshake_timeout):
                    await home.aclose(code, client.closed.reason)
            scope.cancel()

        async def ping(scope: trio.CancelScope) -> None:  # a client gone silently
            nonlocal result
            try:
                while True:
                    await trio.sleep(limit)
                    with trio.move_on_after(limit) as waited:
                        await client.ping()
                    if waited.cancelled_caught:
                        reason = f"Too slow: no pong within {limit:g} s."
                        result = result or (1001, reason)
                        with trio.move_on_after(self.handshake_timeout):
                            await home.aclose(1001, reason)
                        break
            except ConnectionClosed:
                return  # (`down` or `up` ends the relay)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(down, nursery.cancel_scope)
            nursery.start_soon(up, nursery.cancel_scope)
            nursery.start_soon(ping, nursery.cancel_scope)
        if result is None:
            return 1000, None
        if result[0] in (1005, 1006):  # no status / abnormal: not codes one may send
            return 1011, "The channel's node went away."
        return result

    def _log_once(self, key: str, message: str) -> None:
        """Log a peer's trouble once until it answers again (`_logged` is bounded by the
        cluster's nodes)."""
        if key not in self._logged and len(self._logged) < 1024:
            self._logged.add(key)
            log.warning("cluster HTTP: %s", message)


async def _guarded(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """A nursery for trio-websocket's reader task of a relay's socket to the home node,
    whose failure ends that socket only: the reader answers the home node's ping even while
    our close is on its way, which wsproto refuses (LocalProtocolError); the relay then
    ends as for a closed socket."""
    try:
        async with trio.open_nursery() as readers:
            task_status.started(readers)
            await trio.sleep_forever()
    except* LocalProtocolError:
        log.debug("WebSocket relay: a ping crossed our close")


class Forged(Exception):
    """A request with an internal header that is not valid (answered 403)."""


class EventRelay(Protocol):
    """What `POST /internal/events` hands its body to (dm_actor/api/relay.py)."""

    async def receive(self, body: bytes) -> int:
        """Take a batch of events sent by another node; the HTTP status to answer."""
        ...


FORBIDDEN_INTERNAL = error_v3(403, "forbidden", "Internal cluster request refused.")
