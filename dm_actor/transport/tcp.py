"""CoAP over TCP (RFC 8323): accept connections and run the signalling of each.

`TcpListener` accepts connections; per connection it sends our CSM first, requires the peer's
CSM as its first message (else Abort and close), answers Ping with Pong, closes after a
Release or an Abort, and hands every other non-empty message to a synchronous callback
together with its `TcpConnection`. A connection's writes go through a bounded queue drained by
one writer task, so a sender never interleaves frames and never queues without limit.

Framing and the signalling messages come from `dm_actor.coap.framing_tcp`. This module never
interprets requests or responses: routing and answering them is the caller's job.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import trio

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
)
from dm_actor.coap.numbers import Code, SignallingOption

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.coap.message import Message
    from dm_actor.transport.udp import Address

log = logging.getLogger(__name__)

_CSM = Code.CSM.value
_PING = Code.PING.value
_PONG = Code.PONG.value
_RELEASE = Code.RELEASE.value
_ABORT = Code.ABORT.value
_CUSTODY = SignallingOption.CUSTODY.value
_RECEIVE_SIZE = 65536


class TcpConnection:
    """One accepted connection: the peer, its CSM, and a bounded queue of frames to write.

    Attributes:
        peer: the peer's socket address.
        csm: the peer's capabilities (Max-Message-Size, block-wise), None until its CSM came.
    """

    __slots__ = ("_closing", "_has_data", "_has_room", "_limit", "_queue", "_scope", "csm", "peer")

    def __init__(self, peer: Address, send_queue_size: int) -> None:
        self.peer = peer
        self.csm: Csm | None = None
        self._queue: deque[bytes] = deque()
        self._limit = send_queue_size
        self._has_data = trio.lowlevel.ParkingLot()
        self._has_room = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._closing = False

    @property
    def closed(self) -> bool:
        """True once the connection is closing: nothing more can be sent."""
        return self._closing

    def send_nowait(self, msg: Message) -> None:
        """Queue a message to be written (its `mtype` and `mid` are not sent).

        Raises:
            trio.WouldBlock: the send queue is full (the peer reads slower than we write).
            trio.ClosedResourceError: the connection is closing.
            ValueError: the message cannot be framed.
        """
        self.send_frame_nowait(encode(msg))

    def send_frame_nowait(self, frame: bytes) -> None:
        """Queue an already framed message (`framing_tcp.encode`), as `send_nowait` does."""
        if self._closing:
            raise trio.ClosedResourceError("the connection is closing")
        if len(self._queue) >= self._limit:
            raise trio.WouldBlock
        self._queue.append(frame)
        self._has_data.unpark()

    async def send(self, msg: Message) -> None:
        """Queue a message, waiting while the send queue is full.

        Raises:
            trio.ClosedResourceError: the connection is closing.
            ValueError: the message cannot be framed.
        """
        await trio.lowlevel.checkpoint()
        while len(self._queue) >= self._limit and not self._closing:
            await self._has_room.park()
        self.send_nowait(msg)

    def close(self, timeout: float = 5.0) -> None:
        """Close after writing what is queued, giving up on the writes after `timeout` s."""
        if not self._closing:
            self._closing = True
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout)
            self._has_data.unpark_all()
            self._has_room.unpark_all()

    def abort(self, diagnostic: str, bad_csm_option: int | None = None) -> None:
        """Send an Abort (even past the queue limit) and close."""
        if not self._closing:
            self._queue.append(encode(abort(diagnostic, bad_csm_option)))
            self.close()

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
            block; reply with `conn.send_nowait()`.
        on_closed: called as `on_closed(conn)` once, when a connection has ended.
        max_message_size: the largest frame accepted, announced in our CSM.
        send_queue_size: frames that may wait to be written per connection.
        close_timeout: seconds to finish writing queued frames when a connection closes.
    """

    __slots__ = (
        "_close_timeout",
        "_csm",
        "_host",
        "_max_message_size",
        "_on_closed",
        "_on_message",
        "_port",
        "_send_queue_size",
    )

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Callable[[TcpConnection, Message], None],
        on_closed: Callable[[TcpConnection], None],
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        send_queue_size: int = 64,
        close_timeout: float = 5.0,
    ) -> None:
        self._host = host
        self._port = port
        self._on_message = on_message
        self._on_closed = on_closed
        self._max_message_size = max_message_size
        self._send_queue_size = send_queue_size
        self._close_timeout = close_timeout
        self._csm = csm(max_message_size)

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound address, then serve connections until cancelled.

        Start it with `addr = await nursery.start(listener.run)`.
        """
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        task_status.started(listeners[0].socket.getsockname())
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = TcpConnection(stream.socket.getpeername(), self._send_queue_size)
        conn.send_nowait(self._csm)
        log.debug("TCP connection from %s", conn.peer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop, conn, stream)
                await conn._write_loop(stream)
                nursery.cancel_scope.cancel()
        finally:
            try:
                self._on_closed(conn)
            finally:
                await stream.aclose()

    async def _read_loop(self, conn: TcpConnection, stream: trio.SocketStream) -> None:
        decoder = StreamDecoder(self._max_message_size)
        try:
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return
                decoder.receive_data(data)
                while (msg := decoder.next_message()) is not None:
                    if not self._dispatch(conn, msg):
                        return
        except BadCsmOption as exc:
            conn.abort(str(exc), exc.option)
        except DecodeError as exc:
            conn.abort(str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            conn.close(self._close_timeout)

    def _dispatch(self, conn: TcpConnection, msg: Message) -> bool:
        """Handle one message; False when the connection is closing."""
        c = msg.code
        if conn.csm is None:
            if c != _CSM:
                conn.abort("CSM expected as the first message")
                return False
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
            self._on_message(conn, msg)
        return not conn.closed
