"""Attacks on issue 16 (metrics, health checks, JSON logs, the console): each test is a bug
found by using the new surface as a hostile client, device or operator tool would. Each is
`xfail(strict=True)` until the bug is fixed: the test states the behaviour the docs promise,
and fails today. Real loopback sockets (and a real daemon for the log), virtual time where
the app runs in-process.
"""

from __future__ import annotations

import json
import signal
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.api.client import KEY_A, HttpClient
from tests.api.test_health_flood import serving as serving_four_slots
from tests.daemon import Daemon, free_ports

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.address import Address

ADMIN = "ak_attack16_admin"


# -- JSON logs ---------------------------------------------------------------------------------


async def _raw(addr: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes on a new connection, read until the server closes it."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


@pytest.mark.xfail(
    strict=True,
    reason="--log-format json --log-level debug: a request whose target has fewer than two "
    "path segments (GET /v2, GET x, OPTIONS *) makes RequestLog.get('endpoint') index an "
    "empty list (seg[0] / seg[1]: IndexError) inside the formatter: logging prints "
    "'--- Logging error ---' and a traceback to stderr (many lines that are not JSON) and the "
    "request's line is lost. Any client, no key needed.",
)
async def test_a_short_request_target_keeps_the_log_one_json_object_per_line(
    tmp_path: Path,
) -> None:
    coap, http = free_ports(2)
    args = ["--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(http),
            "--data-dir", str(tmp_path / "data"), "--api-key", KEY_A, "--admin-key", ADMIN,
            "--log-format", "json", "--log-level", "debug"]  # fmt: skip
    daemon = Daemon(args, ("127.0.0.1", http), tmp_path / "log")
    await daemon.start()
    try:
        with trio.fail_after(20):
            await daemon.ready()
            for target in (b"/v2", b"x", b"*"):
                answer = await _raw(
                    daemon.http,
                    b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % target,
                )
                assert answer.startswith(b"HTTP/1.1 401"), answer
            proc = daemon.proc
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            daemon.proc = None
    finally:
        await daemon.kill()
    lines = daemon.log.read_text().splitlines()
    for line in lines:  # one JSON object per line, whatever a client sent
        assert isinstance(json.loads(line), dict), line
    requests = [json.loads(line)["message"] for line in lines if "HTTP request" in line]
    assert len(requests) >= 3, requests  # each request's debug line is written


# -- connection slots --------------------------------------------------------------------------


async def _unread_pipeline(addr: Address, path: bytes) -> trio.SocketStream:
    """A connection without a key that pipelines `GET path` until the server stops reading
    it (its answers fill the TCP window: this client never reads)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(addr[:2])
    stream = trio.SocketStream(sock)
    requests = b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path * 10
    while True:
        with trio.move_on_after(1) as blocked:
            await stream.send_all(requests)
        if blocked.cancelled_caught:
            return stream


@pytest.mark.xfail(
    strict=True,
    reason="A client without a key holds a connection slot for send_timeout (30 s) by "
    "pipelining GET /healthz (or /readyz, or /metrics answered 401) and never reading: those "
    "answers are sent without the connection's slot, so it is not sheddable while the send "
    "blocks (a 401 elsewhere is: 'a client that does not read its refusals holds no slot'). "
    "max_connections such connections (~130 KB of requests each) and a client with a valid "
    "key gets 503 from the health-check reserve, or waits in the accept queue, again every "
    "30 s.",
)
async def test_a_keyless_client_that_does_not_read_health_answers_holds_no_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving_four_slots(nursery, tmp_path)  # [api] max_connections = 4
    addr = listening.http
    assert addr is not None
    held = [await _unread_pipeline(addr, b"/healthz") for _ in range(3)]
    held.append(await _unread_pipeline(addr, b"/metrics"))  # 401s, not counted as refusals
    try:
        with trio.fail_after(5):
            async with HttpClient(addr, KEY_A) as client:
                reply = await client.request("GET", "/v3/devices")
        assert reply.status == 200, (reply.status, reply.text)
    finally:
        for stream in held:
            await stream.aclose()
