"""The HTTP port against hostile clients: slow heads and bodies, crowding, malformed input.

Real loopback sockets, virtual time. Each test shows one way a client used to make the server
drop a connection without an answer, answer wrongly, or lock others out.
"""

from __future__ import annotations

import json
import re
import tracemalloc
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor.api import server as server_module
from dm_actor.api.server import HttpOptions, HttpServer
from tests.actors.support import settle

from .client import KEY_A, KEYS, HttpClient, raw_exchange, start_api
from .test_flow import online

if TYPE_CHECKING:
    from dm_actor.address import Address

GET_1 = {"method": "GET", "uri": "/3/0/1"}
HEAD = b"GET /v3/devices HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200


async def start_http(nursery: trio.Nursery, options: HttpOptions) -> tuple[HttpServer, Address]:
    """An `HttpServer` (its statistics visible) over a running supervisor."""
    api = await start_api(nursery)
    server = HttpServer(api.sup, KEYS, options)
    addr = await nursery.start(server.run, "127.0.0.1", 0)
    return server, addr


class Slow:
    """A client that sends `data` one byte every `interval` seconds and notes how the server
    ended the connection: its answer's status line, b"" for a plain close."""

    def __init__(self, addr: Address, data: bytes = HEAD, interval: float = 2.0) -> None:
        self.addr, self.data, self.interval = addr, data, interval
        self.ended: bytes | None = None

    async def run(self) -> None:
        stream = await trio.open_tcp_stream(*self.addr[:2])
        got = b""
        async with stream:
            try:
                for byte in self.data:
                    await stream.send_all(bytes([byte]))
                    with trio.move_on_after(self.interval) as scope:
                        got = await stream.receive_some(65536)
                    if not scope.cancelled_caught:
                        break  # answered or closed
                else:
                    while chunk := await stream.receive_some(65536):
                        got += chunk
            except trio.BrokenResourceError:
                got = b""
        self.ended = got.split(b"\r\n")[0]


async def test_slow_heads_cannot_lock_out_a_complete_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Slowloris: every slot is held by a connection trickling its head a byte every 2 s.
    A complete request (with a key or without) is still answered at once: the oldest slow
    connection is shed for it. The others get 408 when their head is not complete 10 s
    after they connected (each byte no longer restarts a timer)."""
    server, addr = await start_http(nursery, HttpOptions(max_connections=8, head_timeout=10))
    slow = [Slow(addr) for _ in range(8)]
    for s in slow:
        nursery.start_soon(s.run)
        await settle()  # connected, in this order
    await trio.sleep(1)
    assert server.served == 8
    async with HttpClient(addr, KEY_A) as client, HttpClient(addr, None) as anonymous:
        with trio.fail_after(2):
            assert (await client.request("GET", "/v3/devices")).status == 200
        with trio.fail_after(2):
            assert (await anonymous.request("GET", "/v3/devices")).status == 401
    assert server.statistics().connections_shed == 2
    await trio.sleep(0.1)
    assert [s.ended for s in slow[:2]] == [b"", b""]  # the oldest two, shed
    await trio.sleep(10)
    assert [s.ended for s in slow[2:]] == [b"HTTP/1.1 408 Request Timeout"] * 6
    assert server.statistics().head_timeouts == 6
    assert server.served == 0


async def test_a_body_must_arrive_in_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An authenticated upload trickled a byte every 2 s ends with 408 after `body_timeout`
    (each byte no longer restarts a timer); the server keeps serving."""
    server, addr = await start_http(nursery, HttpOptions(body_timeout=30))
    head = (
        b"POST /v2/device-requests/dev?async-id=a HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + KEY_A.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
    )
    stream = await trio.open_tcp_stream(*addr[:2])
    await stream.send_all(head)
    started = trio.current_time()

    async def trickle() -> None:
        for _ in range(100):
            await stream.send_all(b" ")
            await trio.sleep(2)

    async with stream, trio.open_nursery() as inner:
        inner.start_soon(trickle)
        answer = await stream.receive_some(65536)
        inner.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 30 <= trio.current_time() - started < 31
    assert server.statistics().body_timeouts == 1
    async with HttpClient(addr, KEY_A) as client:
        assert (await client.request("GET", "/v3/devices")).status == 200


async def test_an_unauthenticated_upload_is_shed_for_a_complete_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A request without a valid key that is still sending its body holds no slot against
    an authenticated one: it is shed like a slow head."""
    server, addr = await start_http(nursery, HttpOptions(max_connections=1))
    stream = await trio.open_tcp_stream(*addr[:2])
    await stream.send_all(
        b"POST /v2/subscriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n[" + b" " * 9
    )
    await trio.sleep(1)
    async with HttpClient(addr, KEY_A) as client:
        with trio.fail_after(1):
            assert (await client.request("GET", "/v3/devices")).status == 200
    async with stream:
        assert await stream.receive_some(65536) == b""  # closed without an answer
    assert server.statistics().connections_shed == 1, server.statistics()


async def test_a_client_without_a_key_gets_ten_answers_a_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pipelined requests without a key: ten 401s, the last with `connection: close` (a
    flood of pipelined 401s cost the server far more than the client)."""
    _, addr = await start_http(nursery, HttpOptions())
    request = b"GET /v3/devices HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await raw_exchange(addr, request * 50)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"401"] * 10
    assert answer.lower().count(b"connection: close") == 1


async def test_an_unauthenticated_client_that_does_not_read_its_refusals_is_shed(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pipelined requests without a key whose 401s the client never reads (were there no
    limit of ten a connection): the server's send backs up. That connection is shed for a
    complete request (it used to hold its slot for as long as the send could wait)."""
    monkeypatch.setattr(server_module, "_ANONYMOUS_PER_CONNECTION", 1 << 60)
    server, addr = await start_http(nursery, HttpOptions(max_connections=1))
    stream = await trio.open_tcp_stream(*addr[:2])
    request = b"GET /v2/nothing/" + b"x" * 10 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    async with stream:
        with trio.move_on_after(5):
            for _ in range(100_000):  # until the server stops reading (its answers back up)
                await stream.send_all(request * 100)
        async with HttpClient(addr, KEY_A) as client:
            with trio.fail_after(1):
                assert (await client.request("GET", "/v3/devices")).status == 200
    assert server.statistics().connections_shed == 1


async def test_unread_refusals_of_websocket_upgrades_are_shed_too(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same through the WebSocket path (its key may come in a subprotocol, so its
    refusals, 426 here, are sent by the upgrade code)."""
    monkeypatch.setattr(server_module, "_ANONYMOUS_PER_CONNECTION", 1 << 60)
    server, addr = await start_http(nursery, HttpOptions(max_connections=1))
    stream = await trio.open_tcp_stream(*addr[:2])
    request = b"GET /v2/notification/websocket-connect HTTP/1.1\r\nHost: x\r\n\r\n"
    async with stream:
        with trio.move_on_after(5):
            for _ in range(100_000):
                await stream.send_all(request * 100)
        async with HttpClient(addr, KEY_A) as client:
            with trio.fail_after(1):
                assert (await client.request("GET", "/v3/devices")).status == 200
    assert server.statistics().connections_shed == 1


async def test_expect_100_continue_without_a_key_is_refused_before_the_body(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _, addr = await start_http(nursery, HttpOptions())
    head = (
        b"POST /v2/subscriptions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    answer = await raw_exchange(addr, head)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:60]
    assert b"connection: close" in answer.lower()


async def test_a_body_in_tiny_chunks_is_refused_early(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """1 MiB in 1-byte chunks cost h11 seconds of CPU (the loop blocked ~0.2 s a read):
    after 1024 parts (plus one per 256 bytes) a body is refused. Real chunked bodies pass."""
    server, addr = await start_http(nursery, HttpOptions())
    head = (
        b"PUT /v2/subscriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Authorization: Bearer " + KEY_A.encode() + b"\r\n\r\n"
    )
    answer = await raw_exchange(addr, head + b"1\r\n \r\n" * 200_000 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
    assert b"body in too many small parts" in answer
    assert server.statistics().bad_requests == 1
    body = json.dumps([{"endpoint-name": f"node-{i:05}"} for i in range(1000)]).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 300]), body[i : i + 300])
                      for i in range(0, len(body), 300))  # fmt: skip
    answer = await raw_exchange(
        addr, head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + chunks + b"0\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 204 "), answer[:80]


AUTH = b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
GET = b"GET /v3/devices HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
POST_HEAD = b"PUT /v2/subscriptions HTTP/1.1\r\nHost: x\r\n" + AUTH


@pytest.mark.parametrize(
    ("data", "answers"),
    [
        (GET[:20], [b"400"]),  # half a head, then the client half-closes
        (GET, [b"200"]),  # a whole request, then half-closed: still answered
        (GET * 3 + GET[:30], [b"200", b"200", b"200", b"400"]),  # pipelined, the last cut
        (POST_HEAD + b"Content-Length: 10\r\n\r\n[]", [b"400"]),  # a body cut short
        (POST_HEAD + b"Content-Length: 2\r\n\r\n[]garbage\r\n\r\n", [b"204", b"400"]),
        (POST_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n",
         [b"400"]),
        (b"GET /v3/devices HTTP/1.0\r\n" + AUTH + b"\r\n", [b"200"]),
        (b"\r\n" + GET, [b"400"]),  # h11 refuses a blank line before a request
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, [b"400"]),  # TLS
    ],
)  # fmt: skip
async def test_cut_pipelined_and_odd_streams_are_answered_without_a_traceback(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    answers: list[bytes],
) -> None:
    _, addr = await start_http(nursery, HttpOptions())
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        got = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", got) == answers
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_head_completed_just_before_its_deadline_is_served(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _, addr = await start_http(nursery, HttpOptions(head_timeout=10))
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream:
        for i in range(len(GET)):
            await stream.send_all(GET[i : i + 1])
            await trio.sleep(9.9 / len(GET))
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:60]


async def test_an_unauthenticated_body_is_not_kept(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Its answer will be 401 whatever it holds: 20 uploads of almost 1 MiB each, held open
    just before their end, used to cost 20 MiB; now the server keeps none of it."""
    _, addr = await start_http(nursery, HttpOptions())
    size = (1 << 20) - 10
    head = b"PUT /v2/subscriptions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
    streams = [await trio.open_tcp_stream(*addr[:2]) for _ in range(20)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for stream in streams:
            await stream.send_all(head + b" " * (size - 1))
        await trio.sleep(1)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    for stream in streams:
        await stream.send_all(b" ")
        answer = await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:60]
        await stream.aclose()
    assert held < 4 << 20, held


async def test_per_address_limit_is_off_by_default_and_refuses_beyond_when_set(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, addr = await start_http(nursery, HttpOptions(max_connections_per_address=2))
    clients = [HttpClient(addr, KEY_A) for _ in range(3)]
    for c in clients[:2]:
        assert (await c.request("GET", "/v3/devices")).status == 200
    assert await raw_exchange(addr, HEAD + b"\r\n\r\n") == b""  # closed at once, unanswered
    assert server.statistics().refused_per_address == 1
    await clients[0].aclose()
    await trio.sleep(0.1)
    assert (await clients[2].request("GET", "/v3/devices")).status == 200
    for c in clients:
        await c.aclose()
    assert HttpOptions().max_connections_per_address == 0


async def test_a_client_that_does_not_read_its_answer_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pipelined requests whose (large) answers the client never reads: the server gives up
    after `send_timeout` instead of holding the connection forever."""
    server, addr = await start_http(nursery, HttpOptions(send_timeout=30))
    entries = [{"endpoint-name": f"node-{i:04}", "resource-path": ["/3/0/1"]} for i in range(1000)]
    async with HttpClient(addr, KEY_A) as client:
        assert (await client.request("PUT", "/v2/subscriptions", json=entries)).status == 204
    request = b"GET /v2/subscriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream:
        with trio.move_on_after(5):
            for _ in range(10_000):  # until the server stops reading (its answers back up)
                await stream.send_all(request % KEY_A.encode())
        await trio.sleep(31)
        assert server.statistics().send_timeouts == 1
        assert server.served == 0


# -- malformed and hostile requests: each gets an answer, the server keeps serving ---------

DEEP = b"[" * 100_000  # in a field the route ignores or reads: msgspec recursed until it failed


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("POST", "/v2/device-requests/dev?async-id=n1", b'{"method":"GET","uri":"/3","x":' + DEEP),
        ("POST", "/v2/device-requests/dev?async-id=n2", b'{"uri":"/3","x":' + b'{"a":' * 50_000),
        ("PUT", "/v2/subscriptions", b'[{"endpoint-name":"a","x":' + DEEP),
        ("PUT", "/v2/notification/callback", b'{"url":"http://127.0.0.1:9/","x":' + DEEP),
        ("PUT", "/v2/notification/websocket", b'{"serialization":{"x":' + DEEP),
    ],
)  # fmt: skip
async def test_deeply_nested_json_is_malformed(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    method: str,
    target: str,
    body: bytes,
) -> None:
    api = await start_api(nursery)
    await online(api, nursery)
    async with api.client() as client:
        reply = await client.request(method, target, body=body)
        assert (reply.status, reply.text) == (400, "MALFORMED_JSON_CONTENT")
        assert (await client.request("GET", "/v3/devices")).status == 200
        assert client.connections == 1  # answered on the same connection


async def test_two_authorization_headers_are_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Which of two keys would win is a guess (the last did): neither, 400."""
    api = await start_api(nursery)
    for keys in ((KEY_A, "ak_test_b"), ("ak_wrong", KEY_A), (KEY_A, KEY_A)):
        auth = b"".join(b"Authorization: Bearer %s\r\n" % k.encode() for k in keys)
        answer = await raw_exchange(
            api.addr, b"GET /v3/devices HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"more than one Authorization header" in answer


async def test_a_head_over_the_limit_is_431_even_when_it_arrives_whole(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """docs/api.md: headers over 16 KiB get 431. h11 only bounds a head that arrives in
    parts; one of 20 KiB in a single segment used to get 200."""
    api = await start_api(nursery)
    head = b"GET /v3/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY_A.encode()
    answer = await raw_exchange(api.addr, head + b"\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    # just under the limit, in one segment with a pipelined second request: both answered
    small = head + b"\r\nX-Pad: " + b"a" * 15_000 + b"\r\n\r\n"
    last = head + b"\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(api.addr, small + last)
    assert answer.count(b"HTTP/1.1 200 ") == 2, answer[:200]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 202),  # no Content-Type: read as JSON (clients often send none)
        ("application/json", 202),  # Pelion's SDK
        ("Application/JSON; charset=utf-8", 202),
        ("application/vnd.example+json", 202),
        ("application/x-www-form-urlencoded", 415),  # curl -d without -H
        ("text/plain", 415),
    ],
)
async def test_a_json_route_takes_json(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    content_type: str | None,
    status: int,
) -> None:
    api = await start_api(nursery)
    await online(api, nursery)
    headers = [] if content_type is None else [("content-type", content_type)]
    async with api.client() as client:
        for target in ("/v2/device-requests/dev?async-id=c1", "/v2/subscriptions"):
            body = GET_1 if target.startswith("/v2/device") else []
            reply = await client.request("POST" if "device" in target else "PUT", target,
                                         json=body, headers=headers)  # fmt: skip
            expected = status if status != 202 or "device" in target else 204
            assert reply.status == expected, (target, reply.text)
            if status == 415:
                assert reply.text == "Content-Type must be application/json."
        # an empty body has no type to check (the SDK sends application/json anyway)
        reply = await client.request("PUT", "/v2/notification/websocket", headers=headers)
        assert reply.status == 201


async def test_a_failing_handler_answers_500_and_the_server_keeps_serving(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, addr = await start_http(nursery, HttpOptions())
    real = server.api.dispatch

    async def broken(req: object) -> object:
        raise RuntimeError("a bug")

    server.api.dispatch = broken  # type: ignore[assignment,method-assign]
    async with HttpClient(addr, KEY_A) as client:
        reply = await client.request("GET", "/v2/endpoints/dev")
        assert (reply.status, reply.text) == (500, "Internal server error.")
        reply = await client.request("GET", "/v3/devices")
        assert reply.status == 500 and reply.json()["type"] == "internal_server_error"
        server.api.dispatch = real  # type: ignore[method-assign]
        assert (await client.request("GET", "/v3/devices")).status == 200
        assert client.connections == 1
    assert server.statistics().server_errors == 2


@pytest.mark.parametrize(
    "target",
    [
        "/v3/devices?limit=" + "9" * 5000,  # past int()'s digit limit
        "/v3/devices?limit=1e400",
        "/v3/devices?after=%FF%FE&limit=2",  # not UTF-8
        "/v3/devices/%FF%00",
        "/v3/devices?" + "&".join(f"a{i}=1" for i in range(3000)),
        "/v3/devices?filter=" + "%26x%3D1" * 500,
        "/v2/device-requests/dev?async-id=a&retry=" + "9" * 5000,
        "/v2/device-requests/dev?async-id=a&expiry-seconds=-" + "9" * 400,
        "/v2/subscriptions/%FF/%00/..",
        "/v2/endpoints/" + "%" * 100,
        "*",
    ],
)
async def test_odd_targets_are_answered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, target: str
) -> None:
    api = await start_api(nursery)
    await online(api, nursery)
    async with api.client() as client:
        for method in ("GET", "POST", "PUT", "DELETE"):
            reply = await client.request(method, target, json=GET_1 if method == "POST" else None)
            assert 200 <= reply.status < 500, (method, target, reply.status, reply.text)
        assert (await client.request("GET", "/v3/devices")).status == 200


@pytest.mark.parametrize(
    "body",
    [
        b'{"method":"GET","uri":"/3/0/1","x":1' + b"0" * 100_000 + b"}",  # a huge number
        b'{"method":"GET","uri":"/3/0/1","x":1e999999}',
        b'{"method":"GET","uri":"/3/0/\xff\xfe"}',  # not UTF-8
        b'{"method":"GET","uri":"/3/0/1","payload-b64":"' + b"A" * 900_000 + b'"}',
        b"\x00" * 1000,
    ],
)
async def test_odd_json_is_answered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, body: bytes
) -> None:
    api = await start_api(nursery)
    await online(api, nursery)
    async with api.client() as client:
        for method, target in (
            ("POST", "/v2/device-requests/dev?async-id=j1"),
            ("PUT", "/v2/subscriptions"),
            ("PUT", "/v2/notification/callback"),
            ("PUT", "/v2/notification/websocket"),
        ):
            reply = await client.request(method, target, body=body)
            assert 200 <= reply.status < 500, (target, reply.status, reply.text)
        assert (await client.request("GET", "/v3/devices")).status == 200


# -- pre-subscriptions: bounded per application ---------------------------------------------


async def test_presubscriptions_are_capped_per_application(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    entries = [{"endpoint-name": f"node-{i}"} for i in range(1025)]
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/subscriptions", json=entries)
        assert (reply.status, reply.text) == (400, "TOO_MANY_PRESUBSCRIPTIONS")
        assert (await client.request("GET", "/v2/subscriptions")).json() == []
        reply = await client.request("PUT", "/v2/subscriptions", json=entries[:1024])
        assert reply.status == 204
        assert len((await client.request("GET", "/v2/subscriptions")).json()) == 1024
    async with api.client() as client:  # Pelion's other limit: 256 distinct resource paths
        many = [{"resource-path": [f"/3/0/{i}" for i in range(257)]}]
        reply = await client.request("PUT", "/v2/subscriptions", json=many)
        assert (reply.status, reply.text) == (400, "TOO_MANY_PRESUBSCRIPTIONS")
        same = [{"endpoint-name": f"n{i}", "resource-path": ["/3/0/1", "/3/*"]} for i in range(50)]
        assert (await client.request("PUT", "/v2/subscriptions", json=same)).status == 204
    _, addr = await start_http(nursery, HttpOptions(max_presubscriptions=2))
    async with HttpClient(addr, KEY_A) as client:
        reply = await client.request("PUT", "/v2/subscriptions", json=entries[:3])
        assert (reply.status, reply.text) == (400, "TOO_MANY_PRESUBSCRIPTIONS")
        body = json.dumps(entries[:2]).encode()
        assert (await client.request("PUT", "/v2/subscriptions", body=body)).status == 204
