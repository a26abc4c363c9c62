"""The WebSocket upgrade as a strict client sees it (issue 14, items 6 and 8).

trio-websocket's client (wsproto) refuses a selected subprotocol that was not offered, but
accepts a 101 that selects none of a non-empty offer. Browsers (WHATWG WebSockets: "if
protocols is not empty and the response's Sec-WebSocket-Protocol is null, fail") and Node's
`ws` ("Server sent no subprotocol") fail such a handshake. `strict_handshake` is a raw-socket
client that checks the 101 the way RFC 6455 4.1 says a client must, plus that rule; it then
reads a frame, to show the socket works.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from .client import KEY_A, KEY_B, WEBSOCKET_PATH, start_api
from .test_flow import online
from .test_websocket import put_channel

if TYPE_CHECKING:
    from dm_actor.address import Address

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
_NONCE = base64.b64encode(b"sixteen byte key")


class HandshakeFailed(Exception):
    """The client must _Fail the WebSocket Connection_ (RFC 6455 4.1)."""


def check_handshake(head: bytes, offered: list[str]) -> str | None:
    """Validate a server's handshake answer as a client must: its selected subprotocol.

    RFC 6455 4.1, the client's checks of the server's answer: 101; `Upgrade: websocket`;
    `Connection: Upgrade`; `Sec-WebSocket-Accept` from the key; no extension not asked for;
    a `Sec-WebSocket-Protocol` that is one of those offered. And the browsers' and `ws`'s
    rule: a non-empty offer must get a selection.
    """
    status_line, *lines = head.decode("latin-1").split("\r\n")
    if status_line.split(" ")[1] != "101":
        raise HandshakeFailed(status_line)
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if [v.lower() for v in headers.get("upgrade", [])] != ["websocket"]:
        raise HandshakeFailed("no Upgrade: websocket")
    tokens = [t.strip().lower() for v in headers.get("connection", []) for t in v.split(",")]
    if "upgrade" not in tokens:
        raise HandshakeFailed("no Connection: Upgrade")
    accept = base64.b64encode(hashlib.sha1(_NONCE + _GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != [accept]:
        raise HandshakeFailed("wrong Sec-WebSocket-Accept")
    if "sec-websocket-extensions" in headers:
        raise HandshakeFailed("an extension that was not asked for")
    selected = headers.get("sec-websocket-protocol")
    if selected is None:
        if offered:
            raise HandshakeFailed("Server sent no subprotocol")  # (ws's words)
        return None
    if len(selected) != 1 or selected[0] not in offered:
        raise HandshakeFailed(f"Server sent an invalid subprotocol: {selected}")
    return selected[0]


async def strict_handshake(
    addr: Address, offered: list[str], headers: list[tuple[str, str]] | None = None
) -> tuple[str | None, trio.SocketStream, bytes]:
    """Open a WebSocket on the channel's path over a raw socket: the selected subprotocol
    (checked by `check_handshake`), the stream and the bytes read past the 101."""
    fields = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": _NONCE.decode(),
        "Sec-WebSocket-Version": "13",
        "Origin": "http://127.0.0.1",
    }
    if offered:
        fields["Sec-WebSocket-Protocol"] = ", ".join(offered)
    fields.update(headers or ())
    lines = [f"GET {WEBSOCKET_PATH} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.items())]
    stream = await trio.open_tcp_stream(*addr[:2])
    try:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise HandshakeFailed(f"closed after {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return check_handshake(head, offered), stream, rest
    except BaseException:
        await stream.aclose()
        raise


async def read_text_frame(stream: trio.SocketStream, data: bytes) -> Any:
    """One unfragmented text frame from the server (unmasked, RFC 6455 5.1), as JSON."""

    async def need(n: int) -> None:
        nonlocal data
        while len(data) < n:
            chunk = await stream.receive_some(65536)
            assert chunk, "closed"
            data += chunk

    await need(2)
    assert data[0] == 0x81, data[:2]  # FIN, text
    assert not data[1] & 0x80  # a server never masks
    length, start = data[1] & 0x7F, 2
    if length == 126:
        await need(4)
        length, start = int.from_bytes(data[2:4]), 4
    elif length == 127:
        await need(10)
        length, start = int.from_bytes(data[2:10]), 10
    await need(start + length)
    return json.loads(data[start : start + length])


PELION_A = f"pelion_{KEY_A}"


@pytest.mark.parametrize(
    ("offered", "headers", "selected"),
    [
        (["wss", PELION_A], None, "wss"),  # the SPEC's example, browsers
        ([PELION_A, "wss"], None, "wss"),  # Pelion's Java SDK
        ([PELION_A], None, PELION_A),  # pelion-bridge, Node ws, a browser page
        (["chat", PELION_A], None, PELION_A),
        ([PELION_A, "chat"], None, PELION_A),
        (["pelion_ak_wrong", PELION_A], None, PELION_A),  # the offer that carried the key
        ([], [("Authorization", f"Bearer {KEY_A}")], None),  # nothing offered: none selected
    ],
)
async def test_the_selected_subprotocol_is_one_offered(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    offered: list[str],
    headers: list[tuple[str, str]] | None,
    selected: str | None,
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    got, stream, rest = await strict_handshake(api.addr, offered, headers)
    async with stream:
        assert got == selected
        await online(api, nursery, ep="strict-dev")
        message = await read_text_frame(stream, rest)
        assert [r["ep"] for r in message["registrations"]] == ["strict-dev"]


async def test_only_the_offered_key_that_is_valid_is_selected(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A key of another application offered first and a valid one: the socket belongs to
    the first valid key, and that is the one selected (never another application's)."""
    api = await start_api(nursery)
    await put_channel(api, KEY_B)
    offered = ["pelion_ak_wrong", f"pelion_{KEY_B}", PELION_A]
    got, stream, _ = await strict_handshake(api.addr, offered)
    async with stream:
        assert got == f"pelion_{KEY_B}"
    # an offer with no subprotocol we speak, authenticated by the header: none selected
    # (a browser cannot send that header; a client that can does not need a subprotocol)
    with pytest.raises(HandshakeFailed, match="no subprotocol"):
        await strict_handshake(api.addr, ["chat"], [("Authorization", f"Bearer {KEY_B}")])


def test_the_strict_client_fails_what_browsers_and_ws_fail() -> None:
    """The checks themselves: a 101 that selects nothing of an offer (the server before
    this fix answered `pelion_<key>` alone so), or selects what was not offered."""
    accept = base64.b64encode(hashlib.sha1(_NONCE + _GUID).digest())
    ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    ok += b"Sec-WebSocket-Accept: " + accept
    assert check_handshake(ok, []) is None
    assert check_handshake(ok + b"\r\nSec-WebSocket-Protocol: wss", ["wss"]) == "wss"
    with pytest.raises(HandshakeFailed, match="no subprotocol"):
        check_handshake(ok, [PELION_A])
    with pytest.raises(HandshakeFailed, match="invalid subprotocol"):
        check_handshake(ok + b"\r\nSec-WebSocket-Protocol: wss", [PELION_A])
    with pytest.raises(HandshakeFailed, match="Accept"):
        check_handshake(ok.replace(accept, b"x"), [])
    with pytest.raises(HandshakeFailed, match="Connection"):
        check_handshake(ok.replace(b"Connection: Upgrade", b"Connection: close"), [])


async def test_an_upgrade_without_connection_upgrade_gets_400_with_a_body(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    base = [
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", _NONCE.decode()),
    ]
    async with api.client() as client:
        for connection in ([], [("connection", "keep-alive")], [("connection", "close")]):
            reply = await client.request("GET", WEBSOCKET_PATH, headers=base + connection)
            assert (reply.status, reply.text) == (400, "Connection: Upgrade is required.")
    # a token list with Upgrade in it is an upgrade
    got, stream, _ = await strict_handshake(
        api.addr, ["wss", PELION_A], [("Connection", "keep-alive, Upgrade")]
    )
    async with stream:
        assert got == "wss"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"Host", b"\xff\xfe"),  # not UTF-8 / IDNA
        (b"Host", b"xn--zz"),  # bad punycode
        (b"Connection", b"Upgrade, \xe9"),
        (b"Sec-WebSocket-Protocol", b"wss, \xe9"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate; x=\xe9"),
    ],
)
async def test_headers_wsproto_cannot_decode_get_400_not_a_traceback(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    name: bytes,
    value: bytes,
) -> None:
    """wsproto raises UnicodeError (no protocol error, so no answer) for these: each
    such connection was closed unanswered with a traceback in the log."""
    api = await start_api(nursery)
    await put_channel(api)
    fields = {
        b"Host": b"127.0.0.1",
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": _NONCE,
        b"Sec-WebSocket-Version": b"13",
        b"Sec-WebSocket-Protocol": b"wss",
        b"Authorization": f"Bearer {KEY_A}".encode(),
    }
    fields[name] = value
    head = b"GET %s HTTP/1.1\r\n" % WEBSOCKET_PATH.encode()
    head += b"".join(b"%s: %s\r\n" % item for item in fields.items()) + b"\r\n"
    async with await trio.open_tcp_stream(*api.addr[:2]) as stream:
        await stream.send_all(head)
        data = b""
        while not data.endswith(b" header"):
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
    assert data.endswith(b"\r\n\r\nMalformed WebSocket upgrade: %s header" % name.lower())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    got, stream, _ = await strict_handshake(api.addr, ["wss", PELION_A])  # still serving
    async with stream:
        assert got == "wss"
