"""The HTTP port: an h11 loop per connection, REST dispatch, long polls and WebSockets.

One task per TCP connection reads requests with h11 (keep-alive; headers bounded by h11's
`max_incomplete_event_size`, bodies by `max_body`: 413), authenticates them, and answers.
`GET /v2/notification/pull` waits in that task; `GET /v2/notification/websocket-connect` is
handed to trio-websocket's public `wrap_server_stream` through a `ReplayStream` that gives it
the upgrade request h11 already consumed. Malformed HTTP gets a 4xx and the connection closes;
the server keeps serving. The application logic lives in `routes.py`.
"""

from __future__ import annotations

import errno
import logging
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

from dm_actor.api.channels import (
    CALLBACK,
    LONG_POLLING,
    WEB_SOCKET,
    Channel,
    NotificationHub,
    Session,
)
from dm_actor.api.replay import ReplayStream
from dm_actor.api.routes import JSON, NO_CONTENT, Api, Request, Response, text
from dm_actor.api.schemas import Serialization
from dm_actor.api.webhook import WebhookOptions, parse_target

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dm_actor.actors.device import Address
    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.api.auth import ApiKeys
    from dm_actor.store.base import ChannelRecord

log = logging.getLogger(__name__)

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_RECEIVE_SIZE = 65536
_PULL = ["v2", "notification", "pull"]
_WEBSOCKET_CONNECT = ["v2", "notification", "websocket-connect"]
UNAUTHORIZED = text(401, "Authentication failure.")


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
    max_connections: int = 1024  # served at once; more wait in the kernel's accept queue
    crowded_idle_timeout: float = 5.0  # ... and while they do, idle connections get this long
    webhook: WebhookOptions = field(default_factory=WebhookOptions)


#: accept() errors that mean "out of resources for now" (trio's serve_listeners pauses too)
_ACCEPT_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class HttpServer:
    """The HTTP side of the server: REST handlers, the hub, and the per-connection loop."""

    def __init__(
        self,
        sup: Supervisor,
        api_keys: ApiKeys,
        options: HttpOptions | None = None,
        channels: Sequence[ChannelRecord] = (),
    ) -> None:
        self.keys = api_keys
        self.options = options or HttpOptions()
        self.hub = NotificationHub(
            sup.events, on_delivered=sup.events_delivered, keep=sup.keep_event, store=sup.store
        )
        self.api = Api.create(sup, self.hub, self.options.webhook)
        self.restored = list(channels)
        self.statistics = {"connections": 0, "requests": 0, "bad_requests": 0}
        self._reading: set[trio.CancelScope] = set()  # connections waiting for client bytes
        self._slots: trio.Semaphore | None = None  # free connection slots, once running

    async def run(self, host: str, port: int, *, task_status: trio.TaskStatus[Address]) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            # the stored channels are open before the hub reads the events owed to them
            await nursery.start(partial(self.hub.run, before=self._restore_channels))
            address = listeners[0].socket.getsockname()
            log.info("HTTP listening on http://%s:%d", *address[:2])
            task_status.started(address)
            slots = self._slots = trio.Semaphore(self.options.max_connections)
            for listener in listeners:
                nursery.start_soon(self._accept, listener, slots, nursery)

    async def _accept(
        self, listener: trio.SocketListener, slots: trio.Semaphore, nursery: trio.Nursery
    ) -> None:
        """Accept while fewer than `max_connections` are served: beyond, new connections
        wait in the kernel's (bounded) accept queue, so a connection flood costs no task."""
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of descriptors or memory: wait, as trio does
                    if exc.errno not in _ACCEPT_CAPACITY_ERRORS:
                        raise
                    log.error("HTTP accept failed (%s): pausing 0.1 s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                if not slots.value:
                    self._crowded()
                try:
                    await slots.acquire()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                nursery.start_soon(self._serve, stream, slots)

    def _idle_timeout(self) -> float:
        slots = self._slots
        if slots is not None and not slots.value and slots.statistics().tasks_waiting:
            return self.options.crowded_idle_timeout
        return self.options.idle_timeout

    def _crowded(self) -> None:
        """Every slot is taken: idle keep-alive connections (and slow uploads) get
        `crowded_idle_timeout` to send something, so idle sockets cannot lock others out."""
        deadline = trio.current_time() + self.options.crowded_idle_timeout
        for scope in self._reading:
            scope.deadline = min(scope.deadline, deadline)

    async def _serve(self, stream: trio.SocketStream, slots: trio.Semaphore) -> None:
        try:
            await self.connection(stream)
        finally:
            slots.release()

    def _restore_channels(self) -> None:
        """Reopen the channels the store kept; a callback resumes delivering at once."""
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

    # -- one connection -------------------------------------------------------------------

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve requests on one connection until it closes or breaks."""
        self.statistics["connections"] += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.options.max_header)
        try:
            async with stream:
                while await self._request(conn, stream):
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away or idled out
        except Exception:  # one connection's failure never stops the server
            log.exception("HTTP connection from %s failed", _peer(stream))

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            with trio.fail_after(self._idle_timeout()) as scope:
                self._reading.add(scope)
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                finally:
                    self._reading.discard(scope)
            conn.receive_data(data)

    async def _request(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        """Read and answer one request; False when the connection must close."""
        options = self.options
        try:
            event = await self._next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return False  # ConnectionClosed: the client is done
            auth = upgrade = None
            length = 0
            for name, value in event.headers:
                if name == b"authorization":
                    auth = value
                elif name == b"content-length":
                    length = int(value)
                elif name == b"upgrade":
                    upgrade = value
            if length > options.max_body:
                await self._send(conn, stream, text(413, "Request body too large."), close=True)
                return False
            body = b""
            while True:
                part = await self._next_event(conn, stream)
                if type(part) is h11.Data:
                    body += part.data
                    if len(body) > options.max_body:
                        response = text(413, "Request body too large.")
                        await self._send(conn, stream, response, close=True)
                        return False
                elif type(part) is h11.EndOfMessage:
                    break
                else:
                    return False
        except h11.RemoteProtocolError as exc:
            self.statistics["bad_requests"] += 1
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint
                response = text(status, f"Malformed HTTP request: {exc}")
                await self._send(conn, stream, response, close=True)
            return False
        self.statistics["requests"] += 1
        path, _, query = event.target.decode("ascii").partition("?")
        segments = path.split("/")[1:]
        for i, seg in enumerate(segments):
            if "%" in seg:
                segments[i] = unquote(seg)
        if segments == _WEBSOCKET_CONNECT and event.method == b"GET":
            return await self._websocket_connect(conn, stream, event, upgrade, auth)
        app = self.keys.from_authorization(auth)
        if app is None:
            await self._send(conn, stream, UNAUTHORIZED)
            return conn.our_state is h11.DONE
        req = Request(event.method, segments, dict(parse_qsl(query)), body, app)
        if segments == _PULL and event.method == b"GET":
            return await self._long_poll(conn, stream, app)
        await self._send(conn, stream, await self.api.dispatch(req))
        return conn.our_state is h11.DONE

    async def _send(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        response: Response,
        *,
        close: bool = False,
    ) -> None:
        status, headers, body = response
        if status != 204:
            headers = [*headers, (b"content-length", b"%d" % len(body))]
        if close:
            headers.append((b"connection", b"close"))
        data = conn.send(h11.Response(status_code=status, headers=headers,
                                      reason=_REASONS.get(status, b"")))  # fmt: skip
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        if close:
            await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Before closing on an error, read what the client still sends (briefly): closing
        with unread data would reset the connection and lose the error response."""
        with trio.move_on_after(self.options.close_timeout):
            await stream.send_eof()
            left = 16 * self.options.max_body
            while left > 0 and (data := await stream.receive_some(_RECEIVE_SIZE)):
                left -= len(data)

    # -- long poll ------------------------------------------------------------------------

    async def _long_poll(self, conn: h11.Connection, stream: trio.SocketStream, app: str) -> bool:
        """`GET /v2/notification/pull`: one message (200), or 204 after the timeout."""
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
        channel.poll(pending=True)
        try:
            if not channel.events and not await self._wait_or_hang_up(channel, stream):
                return False
            if not channel.events:
                await self._send(conn, stream, NO_CONTENT)
                return conn.our_state is h11.DONE
            message, batch = channel.take()
            try:
                await self._send(conn, stream, (200, JSON, message))
            except BaseException:
                channel.unread(batch)
                raise
            self.hub.delivered(channel, batch)
            return conn.our_state is h11.DONE
        finally:
            channel.poll(pending=False)

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
    ) -> bool:
        """Authenticate the upgrade, hand it to trio-websocket, then serve the channel.

        Returns True when the upgrade was refused over HTTP and the connection may go on.
        """
        protocols: list[str] = []
        key = version = False
        for name, value in event.headers:
            if name == b"sec-websocket-protocol":
                protocols += [p.strip() for p in value.decode("latin-1").split(",")]
            elif name == b"sec-websocket-key":
                key = True
            elif name == b"sec-websocket-version":
                version = value == b"13"
        app = self.keys.from_subprotocols(protocols) or self.keys.from_authorization(auth)
        refusal = None
        if upgrade is None or upgrade.lower() != b"websocket":
            refusal = text(426, "Upgrade to websocket required.")
        elif app is not None and not (key and version):
            refusal = text(400, "Sec-WebSocket-Key and Sec-WebSocket-Version 13 are required.")
        if refusal is not None or app is None:
            await self._send(conn, stream, refusal or UNAUTHORIZED)
            return conn.our_state is h11.DONE
        prefix = _request_bytes(event) + conn.trailing_data[0]
        async with trio.open_nursery() as nursery:
            ws = None
            with trio.move_on_after(self.options.handshake_timeout):
                request = await wrap_server_stream(nursery, ReplayStream(stream, prefix))
                ws = await request.accept(subprotocol="wss" if "wss" in protocols else None)
            if ws is not None:
                await self._websocket(ws, app, nursery)
            nursery.cancel_scope.cancel()
        return False

    async def _websocket(self, ws: WebSocketConnection, app: str, nursery: trio.Nursery) -> None:
        channel = self.hub.channels.get(app)
        if channel is None or channel.mechanism != WEB_SOCKET:
            await self._close(ws, 1011, "No channel: PUT /v2/notification/websocket first.")
            return
        session = Session()
        channel.attach(session)
        nursery.start_soon(self._drain, ws, session, channel)
        nursery.start_soon(self._ping, ws, session, channel)
        try:
            while True:
                await channel.wait(session)
                if session.close_code is not None or channel.closed:
                    break
                message, batch = channel.take()
                try:
                    await ws.send_message(message.decode())
                except ConnectionClosed:
                    channel.unread(batch)
                    break
                self.hub.delivered(channel, batch)
        finally:
            channel.detach(session)
        await self._close(ws, session.close_code or 1000)

    async def _drain(self, ws: WebSocketConnection, session: Session, channel: Channel) -> None:
        """Read (and ignore) what the client sends, to notice when it closes."""
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            if session.close_code is None:
                session.close_code = 1000
            channel.wake()

    async def _ping(self, ws: WebSocketConnection, session: Session, channel: Channel) -> None:
        """Ping every `ping_interval`; a client that does not answer in time is dropped."""
        interval = self.options.ping_interval
        try:
            while True:
                await trio.sleep(interval)
                with trio.move_on_after(interval) as scope:
                    await ws.ping()
                if scope.cancelled_caught:
                    log.info("WebSocket of %s: no pong within %.0f s", channel.app, interval)
                    break
        except ConnectionClosed:
            pass
        if session.close_code is None:
            session.close_code = 1001
        channel.wake()

    async def _close(self, ws: WebSocketConnection, code: int, reason: str | None = None) -> None:
        with trio.move_on_after(self.options.close_timeout):
            await ws.aclose(code, reason)


def _peer(stream: trio.SocketStream) -> object:
    try:
        return stream.socket.getpeername()
    except OSError:
        return "?"


def _request_bytes(event: h11.Request) -> bytes:
    """The request line and headers of `event`, as the client sent them (names' case kept)."""
    lines = [b"%s %s HTTP/1.1" % (event.method, event.target)]
    lines += [b"%s: %s" % (name, value) for name, value in event.headers.raw_items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def serve_http(
    supervisor: Supervisor,
    host: str,
    port: int,
    api_keys: ApiKeys,
    options: HttpOptions | None = None,
    channels: Sequence[ChannelRecord] = (),
    *,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the REST API, the notification channels and the WebSocket on one port.

    Start it with `address = await nursery.start(serve_http, sup, host, port, keys)`; it runs
    until cancelled. It is the only reader of `supervisor.events`.
    """
    server = HttpServer(supervisor, api_keys, options, channels)
    await server.run(host, port, task_status=task_status)
