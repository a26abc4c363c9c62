"""`/healthz` and `/readyz` are answered while the connection limits shed or hold back other
connections: real loopback connections, the app in-process, virtual time.

At `max_connections` the server sheds the oldest connection without a request head; when
none can be shed (every slot holds a complete request), it takes a few connections into a
reserve that answers only health checks (and /metrics), else new connections would wait in
the kernel's accept queue behind the flood."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.config import parse_settings

from .client import KEY_A, KEYS, HttpClient

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.address import Address

IDLE = 60  # connections that never send a byte


async def serving(nursery: trio.Nursery, tmp_path: Path) -> app.Listening:
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\nstore = "memory"\n'
        f'data_dir = "{tmp_path}"\n[api]\nmax_connections = 4\n'
    )
    listening: app.Listening = await nursery.start(
        lambda task_status: app.serve(settings, api_keys=KEYS, task_status=task_status)
    )
    return listening


async def stalled_upload(addr: Address) -> trio.SocketStream:
    """A complete request head with a valid key whose body never comes: its connection is
    served and cannot be shed (until `body_timeout`, 30 s)."""
    stream = await trio.open_tcp_stream(*addr[:2])
    await stream.send_all(
        b"PUT /v2/subscriptions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
        + KEY_A.encode()
        + b"\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    )
    return stream


async def health(addr: Address, path: str = "/healthz") -> int:
    async with HttpClient(addr, None) as client:
        return (await client.request("GET", path)).status


async def test_health_is_answered_when_every_slot_is_busy_and_idle_connections_flood(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    addr = listening.http
    assert addr is not None
    busy = [await stalled_upload(addr) for _ in range(4)]  # every slot
    await trio.sleep(0.5)
    idle = [await trio.open_tcp_stream(*addr[:2]) for _ in range(IDLE)]
    with trio.fail_after(5):  # (the uploads hold their slots for 30 s)
        assert await health(addr) == 200
        assert await health(addr, "/readyz") == 200
    with trio.fail_after(5):  # malformed HTTP in the reserve: closed, nothing else happens
        garbage = await trio.open_tcp_stream(*addr[:2])
        await garbage.send_all(b"\x00\x01 not HTTP\r\n\r\n")
        while await garbage.receive_some(4096):  # the server closes it (no answer)
            pass
        await garbage.aclose()
        assert await health(addr) == 200
    with trio.fail_after(5):  # a request of another kind in the reserve: 503, not a wait
        async with HttpClient(addr, KEY_A) as client:
            reply = await client.request("GET", "/v3/devices")
            assert (reply.status, reply.headers[b"retry-after"]) == (503, b"1")
    for stream in busy + idle:
        await stream.aclose()
    with trio.fail_after(5):  # room again: served as usual
        async with HttpClient(addr, KEY_A) as client:
            assert (await client.request("GET", "/v3/devices")).status == 200


async def test_health_is_answered_while_idle_connections_are_shed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    addr = listening.http
    assert addr is not None
    idle = [await trio.open_tcp_stream(*addr[:2]) for _ in range(IDLE)]
    await trio.sleep(0.5)
    with trio.fail_after(5):
        assert await health(addr) == 200
    for stream in idle:
        await stream.aclose()
