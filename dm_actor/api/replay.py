"""A stream that first returns bytes already read from its transport, then reads on.

The HTTP loop reads a WebSocket upgrade request with h11; trio-websocket (through wsproto)
must parse that same request again. `ReplayStream` gives it those bytes first. It owns no
socket and never parses anything.
"""

from __future__ import annotations

import trio


class ReplayStream(trio.abc.HalfCloseableStream):
    """Wrap `stream` so that `receive_some` returns `prefix` before the stream's own data."""

    __slots__ = ("_closed", "_prefix", "_receiving", "stream")

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = memoryview(prefix)
        self._closed = False
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        prefix = self._prefix
        if not prefix:
            return await self.stream.receive_some(max_bytes)
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self._receiving = False
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        n = len(prefix) if max_bytes is None else min(max_bytes, len(prefix))
        self._prefix = prefix[n:]
        return bytes(prefix[:n])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = memoryview(b"")
        await self.stream.aclose()
