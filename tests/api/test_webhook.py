"""Webhook channels over loopback: a real HTTP receiver gets the test PUT and the batches."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trio.testing

from dm_actor.api.server import HttpOptions
from dm_actor.api.webhook import HttpClient, HttpError, WebhookOptions, parse_target

from .client import KEY_A, KEY_B, HttpClient as ApiClient, start_api
from .test_flow import online


@dataclass
class Received:
    method: str
    target: str
    headers: dict[bytes, bytes]
    body: bytes
    at: float
    connection: int

    def json(self) -> Any:
        return json.loads(self.body)


Answer = Callable[[Received], Awaitable[int]]


async def ok(_: Received) -> int:
    return 200


@dataclass
class Receiver:
    """A small keep-alive HTTP/1.1 server on loopback that records every request."""

    answer: Answer = ok
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _arrived: trio.Event = field(default_factory=trio.Event)
    _seen: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?app=1"

    async def start(self, nursery: trio.Nursery) -> str:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]
        return self.url

    async def next(self) -> Received:
        """The next request not returned before (waits for it)."""
        while self._seen >= len(self.requests):
            await self._arrived.wait()
        self._seen += 1
        return self.requests[self._seen - 1]

    def deliveries(self) -> list[Received]:
        """The requests after the test PUT(s) of `{}`."""
        return [r for r in self.requests if r.body != b"{}"]

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            conn.receive_data(await stream.receive_some(65536))
                        except trio.BrokenResourceError:
                            return
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return  # ConnectionClosed
                assert request is not None
                received = Received(
                    request.method.decode(), request.target.decode(), dict(request.headers),
                    body, trio.current_time(), number,
                )  # fmt: skip
                self.requests.append(received)
                self._arrived.set()
                self._arrived = trio.Event()
                status = await self.answer(received)
                body = b"" if status == 204 else b"ok"
                headers = [] if status == 204 else [(b"content-length", b"2")]
                data = conn.send(h11.Response(status_code=status, headers=headers))
                data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
                try:
                    await stream.send_all(data)
                except trio.BrokenResourceError:
                    return
                conn.start_next_cycle()


def free_port_url() -> str:
    """An http:// URL on loopback where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


async def register(client: ApiClient, url: str, **extra: object) -> tuple[int, str]:
    reply = await client.request("PUT", "/v2/notification/callback", json={"url": url, **extra})
    return reply.status, reply.text


async def device_request(client: ApiClient, async_id: str, ep: str = "dev") -> None:
    reply = await client.request(
        "POST", f"/v2/device-requests/{ep}?async-id={async_id}",
        json={"method": "GET", "uri": "/3/0/1"},
    )  # fmt: skip
    assert reply.status == 202, reply.text


async def test_registration_tests_the_url_then_batches_arrive_with_the_headers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    receiver = Receiver()
    url = await receiver.start(nursery)
    async with api.client() as client:
        headers = {"Authorization": "Bearer app-secret", "x-tenant": "7"}
        assert await register(client, url, headers=headers) == (204, "")
        test = await receiver.next()
        assert (test.method, test.target, test.body) == ("PUT", "/hook?app=1", b"{}")
        assert test.headers[b"authorization"] == b"Bearer app-secret"
        assert test.headers[b"x-tenant"] == b"7"
        assert test.headers[b"content-type"] == b"application/json"
        reply = await client.request("GET", "/v2/notification/callback")
        assert reply.status == 200
        assert reply.json()["url"] == url and reply.json()["headers"] == headers
        reply = await client.request("GET", "/v2/notification/channel")
        assert reply.json() == {"delivery_mechanism": "CALLBACK"}
        await online(api, nursery)
        first = await receiver.next()
        assert first.method == "PUT" and first.target == "/hook?app=1"
        assert first.headers[b"x-tenant"] == b"7"
        assert [r["ep"] for r in first.json()["registrations"]] == ["dev"]
        await device_request(client, "h1")
        second = await receiver.next()
        [response] = second.json()["async-responses"]
        assert (response["id"], response["status"], response["payload"]) == ("h1", 200, "NDI=")
        assert first.connection == second.connection != test.connection  # kept alive
        assert (await client.request("DELETE", "/v2/notification/callback")).status == 204
        assert (await client.request("DELETE", "/v2/notification/callback")).status == 404
        assert (await client.request("GET", "/v2/notification/callback")).status == 404
        await device_request(client, "h2")
        await trio.sleep(10)
        assert len(receiver.requests) == 3  # deleted: nothing more arrives


async def test_registration_refusals_and_the_other_channel_types(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)

    async def server_error(_: Received) -> int:
        return 500

    failing = Receiver(server_error)
    failing_url = await failing.start(nursery)
    receiver = Receiver()
    url = await receiver.start(nursery)
    async with api.client() as client:
        status, body = await register(client, free_port_url())
        assert status == 400 and body.startswith("Given URL is not accessible: ")
        assert await register(client, failing_url) == (
            400, "Given URL is not accessible: the test PUT got 500.")  # fmt: skip
        assert await register(client, "https://127.0.0.1/x") == (
            400, "Only http:// URLs are supported.")  # fmt: skip
        status, _ = await register(client, "ftp://127.0.0.1/x")
        assert status == 400
        status, body = await register(client, url + "x" * 400)
        assert (status, body) == (400, "URL and headers exceed 400 characters.")
        assert await register(client, url, headers={"Content-Length": "1"}) == (
            400, "Header 'Content-Length' is set by the server.")  # fmt: skip
        status, _ = await register(client, url, headers={"bad name": "v"})
        assert status == 400
        reply = await client.request("PUT", "/v2/notification/callback", body=b"{nope")
        assert (reply.status, reply.text) == (400, "MALFORMED_JSON_CONTENT")
        reply = await client.request("PUT", "/v2/notification/callback", json={"headers": {}})
        assert (reply.status, reply.text) == (400, "MALFORMED_JSON_CONTENT")
        assert (await client.request("GET", "/v2/notification/channel")).status == 404
        assert receiver.requests == []
        # a WebSocket channel excludes a callback, and the other way round
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        assert await register(client, url) == (
            400, "Another type of notification channel already exists.")  # fmt: skip
        assert receiver.requests == []  # refused before any test PUT
        assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
        assert await register(client, url) == (204, "")
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 400
        assert (await client.request("GET", "/v2/notification/pull")).status == 400
        reply = await client.request("DELETE", "/v2/notification/pull")
        assert (reply.status, reply.text) == (200, "ALREADY_DELETED")
        reply = await client.request("GET", "/v2/notification/channel")
        assert reply.json() == {"delivery_mechanism": "CALLBACK"}
    async with api.client(KEY_B) as other:  # another application has no channel
        assert (await other.request("GET", "/v2/notification/callback")).status == 404


async def test_the_next_batch_goes_only_after_a_2xx(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    release = trio.Event()

    async def slow(r: Received) -> int:
        if r.body != b"{}" and len(receiver.requests) == 2:
            await release.wait()  # the first batch is answered only when released
        return 204

    receiver = Receiver(slow)
    url = await receiver.start(nursery)
    async with api.client() as client:
        assert await register(client, url) == (204, "")
        await online(api, nursery)
        for i in range(3):
            await device_request(client, f"b{i}")
        await trio.sleep(15)  # under the 20 s request timeout
        assert len(receiver.deliveries()) == 1  # still unanswered: nothing else was sent
        release.set()
        await trio.sleep(1)
        first, second = receiver.deliveries()
        assert list(first.json()) == ["registrations"]
        assert sorted(r["id"] for r in second.json()["async-responses"]) == ["b0", "b1", "b2"]


async def test_failures_retry_with_back_off_and_keep_the_batch(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)

    async def flaky(r: Received) -> int:
        failures = len(receiver.deliveries())
        return 200 if r.body == b"{}" or failures > 10 else 503

    receiver = Receiver(flaky)
    url = await receiver.start(nursery)
    async with api.client() as client:
        assert await register(client, url) == (204, "")
        await online(api, nursery)
        await trio.sleep(1000)
        deliveries = receiver.deliveries()
        assert len(deliveries) == 11
        gaps = [round(b.at - a.at) for a, b in itertools.pairwise(deliveries)]
        assert gaps == [1, 2, 4, 8, 16, 32, 64, 120, 120, 120]
        assert all(d.body == deliveries[0].body for d in deliveries)  # the same batch
        asked = trio.current_time()
        await device_request(client, "after")
        await trio.sleep(0.5)
        last = receiver.deliveries()[-1]
        assert [r["id"] for r in last.json()["async-responses"]] == ["after"]
        assert last.at - asked < 0.5  # success reset the back-off


async def test_a_hung_receiver_times_out_and_the_batch_is_resent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)

    async def hang_once(r: Received) -> int:
        if len(receiver.deliveries()) == 1 and r.body != b"{}":
            await trio.sleep_forever()
        return 200

    receiver = Receiver(hang_once)
    url = await receiver.start(nursery)
    async with api.client() as client:
        assert await register(client, url) == (204, "")
        await online(api, nursery)
        await trio.sleep(60)
        first, second = receiver.deliveries()
        assert second.at - first.at == 20 + 1  # the request timeout, then 1 s back-off
        assert first.body == second.body and second.connection != first.connection


async def test_the_channel_is_removed_after_24_h_of_failures(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    receiver = Receiver()
    url = await receiver.start(nursery)
    async with api.client() as client:
        assert await register(client, url) == (204, "")
        receiver.answer = _always(500)
        await online(api, nursery, lifetime=3 * 86400)
        await trio.sleep(23.9 * 3600)
        assert (await client.request("GET", "/v2/notification/channel")).status == 200
        await trio.sleep(0.2 * 3600)
        assert (await client.request("GET", "/v2/notification/channel")).status == 404
        attempts = len(receiver.deliveries())
        assert 715 < attempts < 730  # 24 h at one attempt per 120 s
        await device_request(client, "gone")
        await trio.sleep(3600)
        assert len(receiver.deliveries()) == attempts


async def test_re_registering_retargets_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    old = Receiver()
    new = Receiver()
    old_url = await old.start(nursery)
    new_url = await new.start(nursery)
    async with api.client() as client:
        assert await register(client, old_url) == (204, "")
        old.answer = _always(500)
        await online(api, nursery)
        await trio.sleep(100)  # failing, the back-off is at 64 s
        failed = len(old.deliveries())
        assert failed == 7
        assert await register(client, new_url, headers={"x-v": "2"}) == (204, "")
        await trio.sleep(1)
        [delivered] = new.deliveries()
        assert list(delivered.json()) == ["registrations"]
        assert delivered.headers[b"x-v"] == b"2"
        assert len(old.deliveries()) == failed
        reply = await client.request("GET", "/v2/notification/callback")
        assert reply.json()["url"] == new_url


async def test_each_application_gets_only_its_own_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=HttpOptions(webhook=WebhookOptions(backoff_max=5)))
    a, b = Receiver(), Receiver()
    url_a, url_b = await a.start(nursery), await b.start(nursery)
    async with api.client(KEY_A) as client_a, api.client(KEY_B) as client_b:
        assert await register(client_a, url_a) == (204, "")
        assert await register(client_b, url_b) == (204, "")
        await online(api, nursery)
        await device_request(client_a, "only-a")
        await trio.sleep(5)
    ids_a = [r["id"] for d in a.deliveries() for r in d.json().get("async-responses", [])]
    ids_b = [r["id"] for d in b.deliveries() for r in d.json().get("async-responses", [])]
    assert (ids_a, ids_b) == (["only-a"], [])
    assert all("registrations" in d.json() for d in b.deliveries())


def _always(status: int) -> Answer:
    async def answer(_: Received) -> int:
        return status

    return answer


async def test_client_reopens_a_closed_keep_alive_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    served: list[int] = []

    async def once(stream: trio.SocketStream) -> None:
        """Answer one request, then close (an idle keep-alive timeout)."""
        served.append(1)
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
            data = conn.send(h11.Response(status_code=204, headers=[]))
            await stream.send_all(data + conn.send(h11.EndOfMessage()))

    listeners = await nursery.start(partial(trio.serve_tcp, once, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    target = parse_target(f"http://127.0.0.1:{port}/", {})
    client = HttpClient(timeout=5)
    for _ in range(3):
        assert await client.request(b"PUT", target, b"{}") == (204, b"")
        await trio.sleep(1)
    assert len(served) == 3
    await client.aclose()
    with pytest.raises(HttpError):
        await HttpClient(timeout=5).request(b"PUT", parse_target(free_port_url(), {}), b"")
