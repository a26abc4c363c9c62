"""Test helpers: a tiny keep-alive HTTP/1.1 client on h11, and a server with the API on top.

The client is a real client over loopback TCP; it reconnects once when the server closed an
idle keep-alive connection, as HTTP clients do.
"""

from __future__ import annotations

import json as jsonlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from dm_actor.api.auth import ApiKeys
from dm_actor.api.server import HttpOptions, serve_http
from tests.actors.support import Server, start_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.address import Address
    from dm_actor.config import Settings
    from dm_actor.store.base import Store

KEY_A = "ak_test_a"
KEY_B = "ak_test_b"
KEYS = ApiKeys([KEY_A, KEY_B])
WEBSOCKET_PATH = "/v2/notification/websocket-connect"


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass
class HttpClient:
    addr: Address
    key: str | None = KEY_A
    connections: int = 0
    _stream: trio.SocketStream | None = None
    _conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def request(
        self,
        method: str,
        target: str,
        *,
        json: object = None,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        key: str | None = "",
    ) -> Reply:
        if json is not None:
            body = jsonlib.dumps(json).encode()
        all_headers = [("host", "dm-actor"), ("content-length", str(len(body)))]
        key = self.key if key == "" else key
        if key is not None:
            all_headers.append(("authorization", f"Bearer {key}"))
        all_headers += headers or []
        for attempt in range(2):
            if self._stream is None:
                self._stream = await trio.open_tcp_stream(*self.addr[:2])
                self._conn = h11.Connection(h11.CLIENT)
                self.connections += 1
            reply = await self._exchange(method, target, all_headers, body)
            if reply is not None:
                return reply
            await self.aclose()
            assert attempt == 0, "the server closed the connection twice"
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Reply | None:
        conn, stream = self._conn, self._stream
        assert stream is not None
        data = conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += conn.send(h11.Data(data=body))
        data += conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            return None
        response = None
        chunks = []
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if response is None:  # closed before answering: a stale keep-alive
                    return None
                raise
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive_some(65536))
                except trio.BrokenResourceError:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.ConnectionClosed) and response is None:
                return None
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        assert response is not None
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            await self.aclose()
        else:
            conn.start_next_cycle()
        return Reply(response.status_code, dict(response.headers), b"".join(chunks))


@asynccontextmanager
async def websocket(
    api: Api | Address,
    subprotocols: list[str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client on the channel's socket (of `api` or at an HTTP address). It
    owns its TCP stream and closes it (trio-websocket's client leaves it open when the server
    closes first)."""
    addr = api.addr if isinstance(api, Api) else api
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, "127.0.0.1", WEBSOCKET_PATH, subprotocols=subprotocols,
            extra_headers=headers,
        )  # fmt: skip
        try:
            yield ws
        finally:
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()


async def next_message(ws: WebSocketConnection) -> dict[str, list[Any]]:
    message: dict[str, list[Any]] = jsonlib.loads(await ws.get_message())
    return message


async def close_code(ws: WebSocketConnection) -> int:
    """Read until the server closes the socket; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        reason = exc.reason
    assert reason is not None
    return int(reason.code)


async def raw_exchange(addr: Address, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes: what it answered."""
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream:
        await stream.send_all(data)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
        return out


@dataclass
class Api:
    server: Server
    addr: Address

    @property
    def sup(self) -> Supervisor:
        return self.server.sup

    def client(self, key: str | None = KEY_A) -> HttpClient:
        return HttpClient(self.addr, key)


async def start_api(
    nursery: trio.Nursery,
    settings: Settings | None = None,
    options: HttpOptions | None = None,
    keys: ApiKeys = KEYS,
    store: Store | None = None,
) -> Api:
    server = await start_server(nursery, settings, store)
    addr = await nursery.start(serve_http, server.sup, "127.0.0.1", 0, keys, options)
    return Api(server, addr)
