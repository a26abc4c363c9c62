"""What the channels' transports need to know when an event reached the application.

`FrameStream` is the stream trio-websocket writes its frames to: a write cut short by a
cancellation (a client that stopped reading, a missing pong) keeps its unsent tail and
writes it before anything else, so a frame is never cut and a close frame can always follow.
`PullReceipt` remembers the connection a long poll's response went out on, to tell at the
application's next poll whether that response is known not to have arrived (the connection
was reset before the client read it, or the client's TCP never acknowledged its bytes).
Linux gives both answers (TCP_INFO, SIOCOUTQ); elsewhere a response counts as arrived.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

_TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset (include/net/tcp_states.h)
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # == SIOCOUTQ: bytes not acknowledged by the peer


class FrameStream(trio.abc.HalfCloseableStream):
    """`stream` for reading; its socket `sock` for writing, whole frames only.

    Every `send_all` call is one frame (trio-websocket writes each frame with one call).
    A call cancelled part-way keeps the rest of its frame (at most one frame) in `_tail`;
    the next call writes that first. `on_progress` is called after each write the kernel
    took (a close in progress extends its deadline with it).
    """

    __slots__ = ("_closed", "_sending", "_tail", "lingering", "on_progress", "sock", "stream")

    def __init__(self, stream: trio.abc.HalfCloseableStream, sock: trio.socket.SocketType):
        self.stream = stream
        self.sock = sock
        self._tail = memoryview(b"")
        self._sending = False
        self._closed = False
        self.lingering = False  # the HTTP loop calls `linger` before it closes the socket
        self.on_progress: Callable[[], None] | None = None

    @property
    def pending(self) -> int:
        """Bytes of a frame begun and not yet written (a cancelled write left them)."""
        return len(self._tail)

    def make_room(self) -> None:
        """Before a close: raise the socket's kernel send buffer to the system's maximum
        (`net.core.wmem_max`, never lowering it), so that the rest of a frame begun and the
        close frame fit behind what the client has not read yet: the kernel then delivers
        them as the client reads, after this process gave up waiting."""
        sock = self.sock
        try:
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)  # (clamped)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < before:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, before // 2)
        except OSError:
            pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket is closed")
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending")
        self._sending = True
        try:
            if self._tail:
                await self._write()
            self._tail = memoryview(bytes(data))
            await self._write()
        finally:
            self._sending = False

    async def _write(self) -> None:
        sock = self.sock
        while self._tail:
            try:
                n = await sock.send(self._tail)  # cancel-atomic: sent, or cancelled unsent
            except OSError as exc:
                self._tail = memoryview(b"")
                raise trio.BrokenResourceError(str(exc)) from exc
            self._tail = self._tail[n:]
            if self.on_progress is not None:
                self.on_progress()

    async def wait_send_all_might_not_block(self) -> None:
        await self.sock.wait_writable()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        """trio-websocket is done with the connection: nothing more is written. The socket
        itself is closed by its owner (the HTTP loop), after `linger` if it wants."""
        self._tail = memoryview(b"")
        self._closed = True
        await trio.lowlevel.checkpoint()

    async def linger(self, seconds: float) -> None:
        """After a close frame that waits behind what the client has not read: send FIN
        after it, then read and drop what the client still sends (pongs, its close reply)
        until it closes, for at most `seconds`. Closing at once would reset the connection
        at the client's next pong, and the kernel would drop the close frame unsent."""
        sock = self.sock
        with trio.move_on_after(seconds):
            try:
                sock.shutdown(socket.SHUT_WR)
                while await sock.recv(65536):
                    pass
            except OSError:
                pass


class PullReceipt:
    """The connection a long poll's response was written to: a duplicate of its socket, so
    that its state can still be read when the HTTP loop closes its own descriptor (on the
    client's reset, say). `check` (the hub calls it every second) lets the duplicate go once
    the HTTP loop closed the connection, keeping the verdict: a duplicate kept longer would
    hold back the FIN of a connection the server closes."""

    __slots__ = ("_origin", "_sock", "_verdict")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._origin = sock
        self._verdict: bool | None = None
        self._sock: socket.socket | None
        try:
            self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:  # out of descriptors: the response counts as arrived
            self._sock = None

    def check(self) -> bool:
        """True once there is nothing more to watch: the HTTP loop closed the connection
        (the verdict is taken now) or there is no duplicate."""
        if self._sock is None:
            return True
        if self._origin.fileno() != -1:
            return False
        self._verdict = self._probe()
        self.close()
        return True

    def lost(self) -> bool:
        """True when the response is known not to have reached the client: the connection
        was reset (the client closed it with the response unread, or it was gone), or the
        client's TCP has not acknowledged all of it."""
        if self._verdict is not None:
            return self._verdict
        return self._probe()

    def _probe(self) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
            if state == _TCP_CLOSE:
                return True
            if _OUTQ is not None:
                unacknowledged: int = struct.unpack("i", fcntl.ioctl(sock, _OUTQ, b"\0" * 4))[0]
                return unacknowledged > 0
        except (OSError, AttributeError):
            pass
        return False

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
