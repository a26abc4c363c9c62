"""CoAP over TCP (RFC 8323): accept connections and run the signalling of each.

`TcpListener` accepts connections; per connection it sends our CSM first, requires the peer's
CSM as its first message (else Abort and close), answers Ping with Pong, closes after a
Release or an Abort, and hands every other non-empty message to a synchronous callback
together with its `TcpConnection`. A connection's writes go through a bounded queue drained by
one writer task, so a sender never interleaves frames and never queues without limit.

Nothing read is dropped (TCP has no retransmission): when the callback's receiver is full it
says so, and the connection's reader waits for room before it hands on that message and the
rest; it waits too while `send_queue_size` frames wait to be written (a peer that does not
read its answers). Meanwhile it reads nothing more, so what a connection holds stays bounded
(the decoder's last read and partial frame; the peer's writes wait in TCP's window), and the
answers to what it read fit in the send queue's slack (`SEND_QUEUE_HARD_FACTOR`). Only that
connection waits: the others and the server go on.

Bounded against idle and hostile peers (docs/operations.md, "Limits"):

- at most `max_connections` connections are open at once (`default_max_connections` derives
  it from the descriptor limit, keeping a reserve for HTTP, the store and the UDP socket); at
  the cap the oldest connection still in its handshake is shed with an Abort, and if there is
  none the new connection gets our CSM, a Release with Hold-Off, and is closed;
- a connection is in its handshake until it is bound (the `is_bound` callback: a registered
  device's, once its Register or Update was accepted); it must send its CSM and be bound
  within `handshake_timeout` seconds of opening, else it gets an Abort and is closed (an LwM2M
  client's Register or Update follows its CSM at once). Requests that were refused (4.04,
  4.00, 5.03) do not end the handshake: such connections are the first shed at the cap;
- a failing `accept` (out of descriptors: EMFILE, ENFILE; out of memory) pauses the listener
  for `ACCEPT_PAUSE` seconds instead of spinning, and is logged at most once per
  `LOG_INTERVAL`, never with a traceback;
- TCP keep-alive (`KEEPALIVE_IDLE`...) closes a connection whose peer vanished silently;
- an exception escaping a connection's handling ends that connection only (logged with its
  traceback, at most once per `LOG_INTERVAL`).

`TcpListener.statistics()` counts each of these.

Framing and the signalling messages come from `dm_actor.coap.framing_tcp`. This module never
interprets requests or responses: routing and answering them is the caller's job.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import sys
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import trio

from dm_actor.coap import trace
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.framing_tcp import (
    BASE_CSM,
    MAX_MESSAGE_SIZE,
    BadCsmOption,
    Csm,
    StreamDecoder,
    abort,
    check_signalling,
    csm,
    encode,
    parse_csm,
    pong,
    release,
)
from dm_actor.coap.numbers import Code, SignallingOption

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dm_actor.address import Address
    from dm_actor.coap.message import Message

log = logging.getLogger(__name__)
T = TypeVar("T")

_CSM = Code.CSM.value
_PING = Code.PING.value
_PONG = Code.PONG.value
_RELEASE = Code.RELEASE.value
_ABORT = Code.ABORT.value
_CUSTODY = SignallingOption.CUSTODY.value
_RECEIVE_SIZE = 65536

#: Seconds the listener waits after a failed `accept` (no descriptor or memory left).
ACCEPT_PAUSE = 0.1
#: Seconds between two log lines about the same kind of trouble (accept errors, refusals...).
LOG_INTERVAL = 10.0
#: Seconds a client refused at the cap is asked to wait before connecting again (Hold-Off).
REFUSAL_HOLD_OFF = 30
#: Descriptors kept besides HTTP's connections: stdio, the event loop's, the UDP socket, the
#: listeners, the store's files (database, WAL, shared memory, lock), a connection being
#: refused or shed, and a margin for the rest (logging, the API key file).
FIXED_RESERVE = 64
#: The default cap never goes above this: each connection costs tasks and buffers (~20 KB).
DEFAULT_CAP_LIMIT = 10_000
#: How far the cap may be overshot while shed connections finish closing.
_SHED_SLACK = 16
#: TCP keep-alive on every connection: a peer that vanished without a FIN or RST (a device
#: switched off, a NAT mapping dropped) is closed after about KEEPIDLE + KEEPCNT * KEEPINTVL
#: seconds of silence (14 min), so a registered device's dead connection frees its descriptor.
KEEPALIVE_IDLE = 600
KEEPALIVE_INTERVAL = 60
KEEPALIVE_COUNT = 4
#: Frames queued without waiting (`send_nowait`) may reach this many times a connection's
#: send queue size before they are refused: the answers to what was already read (a mailbox's
#: worth, answers the store released together) are not dropped, while the reader stops
#: reading, and `send` waits, at the size itself.
SEND_QUEUE_HARD_FACTOR = 16


def default_max_connections(nofile: int, http_connections: int) -> int:
    """The default cap on CoAP/TCP connections for a descriptor limit (RLIMIT_NOFILE).

    What `nofile` leaves after `FIXED_RESERVE` is shared: HTTP keeps `http_connections` (at
    most half of it) and TCP gets the rest, at most `DEFAULT_CAP_LIMIT` and at least 1.
    """
    available = nofile - FIXED_RESERVE
    http = min(http_connections, available // 2)
    return max(1, min(DEFAULT_CAP_LIMIT, available - http))


@dataclass(frozen=True, slots=True)
class TcpStatistics:
    """Counters of one `TcpListener` since it started."""

    accepted: int
    """Connections accepted (refused ones included)."""
    open: int
    """Connections open now."""
    refused: int
    """Connections refused at the cap: CSM, Release with Hold-Off, close."""
    shed: int
    """Connections still in their handshake closed (Abort) to make room at the cap."""
    handshake_timeouts: int
    """Connections closed (Abort) for want of a CSM or a first request in time."""
    accept_errors: int
    """`accept` failures (EMFILE, ENFILE, ENOMEM, ENOBUFS...), each followed by a pause."""
    errors: int
    """Connections ended by an unexpected exception in their handling."""
    receiver_waits: int
    """Times a connection's reader waited for its receiver to have room (nothing dropped)."""


def _keepalive(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if sys.platform == "linux":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:  # the connection is already gone: its reader sees that
        pass


class _Throttled:
    """A log line at most once per `LOG_INTERVAL`; the next says how many were left out."""

    __slots__ = ("_level", "_next", "_skipped")

    def __init__(self, level: int) -> None:
        self._level = level
        self._next = -math.inf
        self._skipped = 0

    def __call__(self, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = trio.current_time()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            msg += " (%d more like it in the last %g s)"
            args = (*args, self._skipped, LOG_INTERVAL)
        self._next = now + LOG_INTERVAL
        self._skipped = 0
        log.log(self._level, msg, *args, exc_info=exc_info)


class TcpConnection:
    """One accepted connection: the peer, its CSM, and a bounded queue of frames to write.

    Attributes:
        peer: the peer's socket address.
        csm: the peer's capabilities (Max-Message-Size, block-wise), None until its CSM came.
    """

    __slots__ = (
        "_closing",
        "_deadline",
        "_hard_limit",
        "_has_data",
        "_has_room",
        "_limit",
        "_queue",
        "_scope",
        "_trace",
        "csm",
        "peer",
    )

    def __init__(self, peer: Address, send_queue_size: int) -> None:
        self.peer = peer
        self.csm: Csm | None = None
        self._queue: deque[bytes] = deque()
        self._limit = send_queue_size
        self._hard_limit = send_queue_size * SEND_QUEUE_HARD_FACTOR
        self._has_data = trio.lowlevel.ParkingLot()
        self._has_room = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        # when the handshake ends if the connection is not bound by then (set by the listener)
        self._deadline = math.inf
        self._closing = False
        # debug logging of each frame: read again with each chunk the read loop receives
        self._trace = log.isEnabledFor(logging.DEBUG)

    @property
    def max_message_size(self) -> int:
        """The largest frame the peer accepts: its CSM's Max-Message-Size (at least
        `framing_tcp.MIN_PEER_MESSAGE_SIZE`), 1152 bytes until its CSM came."""
        return (self.csm or BASE_CSM).max_message_size

    @property
    def closed(self) -> bool:
        """True once the connection is closing: nothing more can be sent."""
        return self._closing

    def send_nowait(self, msg: Message) -> None:
        """Queue a message to be written (its `mtype` and `mid` are not sent).

        Raises:
            trio.WouldBlock: the send queue is full: `SEND_QUEUE_HARD_FACTOR` times its size
                (the peer reads far slower than we write).
            trio.ClosedResourceError: the connection is closing.
            ValueError: the message cannot be framed.
        """
        self.send_frame_nowait(encode(msg))

    def send_frame_nowait(self, frame: bytes) -> None:
        """Queue an already framed message (`framing_tcp.encode`), as `send_nowait` does."""
        if self._closing:
            raise trio.ClosedResourceError("the connection is closing")
        if len(self._queue) >= self._hard_limit:
            raise trio.WouldBlock
        self._queue.append(frame)
        self._has_data.unpark()
        if self._trace:
            _trace_frame(frame, self.peer)

    async def send(self, msg: Message) -> None:
        """Queue a message, waiting while the send queue holds its size or more.

        Raises:
            trio.ClosedResourceError: the connection is closing.
            ValueError: the message cannot be framed.
        """
        await trio.lowlevel.checkpoint()
        await self._wait_room()
        self.send_nowait(msg)

    async def _wait_room(self) -> None:
        """Return when the send queue has room or the connection is closing."""
        while len(self._queue) >= self._limit and not self._closing:
            await self._has_room.park()

    def close(self, timeout: float = 5.0) -> None:
        """Close after writing what is queued, giving up on the writes after `timeout` s."""
        if not self._closing:
            self._closing = True
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout)
            self._has_data.unpark_all()
            self._has_room.unpark_all()

    def abort(
        self, diagnostic: str, bad_csm_option: int | None = None, timeout: float = 5.0
    ) -> None:
        """Send an Abort (even past the queue limit) and close (see `close`)."""
        if not self._closing:
            frame = encode(abort(diagnostic, bad_csm_option))
            self._queue.append(frame)
            if self._trace:
                _trace_frame(frame, self.peer)
            self.close(timeout)

    async def _write_loop(self, stream: trio.abc.SendStream) -> None:
        queue = self._queue
        with self._scope:
            while True:
                if queue:
                    data = b"".join(queue)
                    queue.clear()
                    self._has_room.unpark_all()
                    try:
                        await stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self.close()
                        return
                elif self._closing:
                    return
                else:
                    await self._has_data.park()


class TcpListener:
    """Accepts CoAP-over-TCP connections on (host, port).

    Args:
        host: the address to bind.
        port: the port to bind; 0 picks a free one (`run()` reports which).
        on_message: called as `on_message(conn, msg)` for each request or response (not for
            signalling or empty messages), from the connection's reader task. It must not
            block; reply with `conn.send_nowait()`. It returns None when it took the message;
            when its receiver is full it returns a function whose awaitable ends once there
            may be room: the reader awaits it and offers the same message again.
        on_closed: called as `on_closed(conn)` once, when a connection has ended.
        is_bound: `is_bound(conn)` says whether the connection is bound (a registered
            device's): only then does its handshake end (see the module's docstring). None:
            no connection is ever bound.
        max_message_size: the largest frame accepted, announced in our CSM.
        send_queue_size: frames that may wait to be written per connection.
        close_timeout: seconds to finish writing queued frames when a connection closes.
        max_connections: connections open at once (see the module's docstring).
        handshake_timeout: seconds a new connection has to send its CSM and first request.
    """

    __slots__ = (
        "_accept_errors",
        "_accepted",
        "_close_timeout",
        "_csm",
        "_errors",
        "_handshake_timeout",
        "_handshake_timeouts",
        "_handshaking",
        "_host",
        "_is_bound",
        "_log_accept_error",
        "_log_error",
        "_log_refused",
        "_log_shed",
        "_max_connections",
        "_max_message_size",
        "_on_closed",
        "_on_message",
        "_open",
        "_port",
        "_receiver_waits",
        "_refusal",
        "_refused",
        "_send_queue_size",
        "_shed",
    )

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Callable[[TcpConnection, Message], Callable[[], Awaitable[object]] | None],
        on_closed: Callable[[TcpConnection], None],
        *,
        is_bound: Callable[[TcpConnection], bool] | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        send_queue_size: int = 64,
        close_timeout: float = 5.0,
        max_connections: int = 1024,
        handshake_timeout: float = 10.0,
    ) -> None:
        self._host = host
        self._port = port
        self._on_message = on_message
        self._on_closed = on_closed
        self._is_bound = is_bound or _never
        self._max_message_size = max_message_size
        self._send_queue_size = send_queue_size
        self._close_timeout = close_timeout
        self._max_connections = max_connections
        self._handshake_timeout = handshake_timeout
        self._csm = csm(max_message_size)
        self._refusal = encode(self._csm) + encode(release(hold_off=REFUSAL_HOLD_OFF))
        # connections not yet seen bound, oldest first: the first to shed at the cap
        self._handshaking: dict[TcpConnection, None] = {}
        self._open = 0
        self._accepted = 0
        self._refused = 0
        self._shed = 0
        self._handshake_timeouts = 0
        self._accept_errors = 0
        self._errors = 0
        self._receiver_waits = 0
        self._log_accept_error = _Throttled(logging.WARNING)
        self._log_refused = _Throttled(logging.WARNING)
        self._log_shed = _Throttled(logging.WARNING)
        self._log_error = _Throttled(logging.ERROR)

    def statistics(self) -> TcpStatistics:
        return TcpStatistics(
            self._accepted,
            self._open,
            self._refused,
            self._shed,
            self._handshake_timeouts,
            self._accept_errors,
            self._errors,
            self._receiver_waits,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound address, then serve connections until cancelled.

        Start it with `addr = await nursery.start(listener.run)`.
        """
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(listeners[0].socket.getsockname())

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._accept_errors += 1
                    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                    self._log_accept_error(
                        "TCP accept failed: %s (%s); pausing %g s",
                        code,
                        os.strerror(exc.errno or 0),
                        ACCEPT_PAUSE,
                    )
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                self._accepted += 1
                if self._open >= self._max_connections and not self._shed_one():
                    self._refused += 1
                    self._log_refused(
                        "CoAP/TCP connection refused: %d connections open, the cap", self._open
                    )
                    await self._refuse(stream)
                    continue
                self._open += 1
                nursery.start_soon(self._serve, stream)

    def _shed_one(self) -> bool:
        """Abort the oldest connection still in its handshake (not bound); False when there
        is none, or when too many shed ones are still closing."""
        handshaking = self._handshaking
        if self._open >= self._max_connections + _SHED_SLACK:
            return False
        while handshaking:
            oldest = next(iter(handshaking))
            self._end_handshake(oldest)
            if self._is_bound(oldest):  # bound since we last looked (its Register admitted)
                continue
            oldest.abort("server busy", timeout=1.0)
            self._shed += 1
            self._log_shed(
                "CoAP/TCP connection from %s shed at the cap (%d open): not registered",
                oldest.peer,
                self._open,
            )
            return True
        return False

    def _end_handshake(self, conn: TcpConnection) -> None:
        self._handshaking.pop(conn, None)
        conn._deadline = math.inf

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Our CSM and a Release with Hold-Off (when the socket takes them at once), then close."""
        with (
            trio.move_on_after(0.05),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(self._refusal)
        await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            try:
                peer = stream.socket.getpeername()
            except OSError:  # reset before we looked: nothing to serve
                return
            _keepalive(stream.socket)
            conn = TcpConnection(peer, self._send_queue_size)
            conn._deadline = trio.current_time() + self._handshake_timeout
            self._handshaking[conn] = None
            conn.send_nowait(self._csm)
            log.debug("TCP connection from %s", conn.peer)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop, conn, stream)
                    await conn._write_loop(stream)
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # a bug met on this peer's input ends this connection only
                self._errors += 1
                self._log_error("CoAP/TCP connection from %s failed", conn.peer, exc_info=exc)
            finally:
                self._handshaking.pop(conn, None)
                try:
                    self._on_closed(conn)
                except Exception as exc:
                    self._errors += 1
                    self._log_error("closing CoAP/TCP connection from %s", conn.peer, exc_info=exc)
        finally:
            try:
                await trio.aclose_forcefully(stream)
            finally:
                self._open -= 1

    async def _read_loop(self, conn: TcpConnection, stream: trio.SocketStream) -> None:
        decoder = StreamDecoder(self._max_message_size)
        receive = partial(stream.receive_some, _RECEIVE_SIZE)
        try:
            while data := await self._in_handshake(conn, receive):
                decoder.receive_data(data)
                conn._trace = tracing = log.isEnabledFor(logging.DEBUG)
                while (msg := decoder.next_message()) is not None:
                    if tracing:
                        log.debug("CoAP %s", trace.describe(msg, "in", "tcp", conn.peer))
                    # back-pressure: nothing more is read from this connection while its
                    # answers cannot be queued (the peer does not read them) or its
                    # receiver is full (until the receiver has taken what it holds)
                    if len(conn._queue) >= conn._limit:
                        await self._in_handshake(conn, conn._wait_room)
                    while (wait_room := self._dispatch(conn, msg)) is not None:
                        self._receiver_waits += 1
                        await self._in_handshake(conn, wait_room)
                    if conn.closed:
                        return
        except _HandshakeOver:
            self._handshake_timeouts += 1
            self._end_handshake(conn)
            what = "CSM" if conn.csm is None else "registration"
            log.debug("TCP connection from %s: no %s in time", conn.peer, what)
            conn.abort(f"no {what} within {self._handshake_timeout:g} s", timeout=1.0)
        except BadCsmOption as exc:
            conn.abort(str(exc), exc.option)
        except DecodeError as exc:
            conn.abort(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            conn.close(self._close_timeout)

    async def _in_handshake(self, conn: TcpConnection, wait: Callable[[], Awaitable[T]]) -> T:
        """`await wait()`, within the connection's handshake deadline until it is bound.

        Raises:
            _HandshakeOver: the deadline passed and the connection is not bound.
            trio.ClosedResourceError: the connection was shed meanwhile.
        """
        while (deadline := conn._deadline) < math.inf:
            with trio.move_on_at(deadline):
                return await wait()
            if conn.closed:
                raise trio.ClosedResourceError
            if not self._is_bound(conn):
                raise _HandshakeOver
            self._end_handshake(conn)  # bound after its last message (its Register admitted)
        return await wait()

    def _dispatch(
        self, conn: TcpConnection, msg: Message
    ) -> Callable[[], Awaitable[object]] | None:
        """Handle one message; what to await before offering it again when the receiver
        is full, else None (see `conn.closed` for whether to go on)."""
        c = msg.code
        if conn.csm is None:
            if c != _CSM:
                conn.abort("CSM expected as the first message")
                return None
            conn.csm = parse_csm(msg, BASE_CSM)
        elif c >> 5 == 7:
            check_signalling(msg)
            if c == _PING:
                try:
                    conn.send_nowait(pong(msg.token, custody=msg.option(_CUSTODY) is not None))
                except trio.WouldBlock:
                    log.debug("Pong to %s dropped: send queue full", conn.peer)
            elif c == _CSM:
                conn.csm = parse_csm(msg, conn.csm)
            elif c == _RELEASE:
                conn.close(self._close_timeout)
            elif c == _ABORT:
                log.debug("Abort from %s: %r", conn.peer, msg.payload)
                conn.close(self._close_timeout)
            elif c != _PONG:
                log.debug("unknown signal %d from %s ignored", c, conn.peer)
        elif c:
            wait_room = self._on_message(conn, msg)
            if conn in self._handshaking and self._is_bound(conn):  # its Register or Update
                self._end_handshake(conn)
            return wait_room
        return None


class _HandshakeOver(Exception):
    """A connection's handshake deadline passed before it was bound."""


def _never(conn: TcpConnection) -> bool:
    return False


def _trace_frame(frame: bytes, peer: Address) -> None:
    """Log one frame we send at debug level (only called while debug is on)."""
    decoder = StreamDecoder(len(frame) + 16)
    try:
        decoder.receive_data(frame)
        msg = decoder.next_message()
    except DecodeError as exc:
        log.debug("CoAP %s", trace.undecodable(frame, "out", "tcp", peer, str(exc)))
        return
    if msg is not None:
        log.debug("CoAP %s", trace.describe(msg, "out", "tcp", peer))
