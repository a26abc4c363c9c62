"""The hand-over of events to the application, per channel type (docs/delivery.md, "Hand-over
to the application"): when an event is forgotten, and what is sent again.

- Long poll: a response's events are forgotten when the same application polls again (that
  poll acknowledges it) or deletes the channel; a response whose connection was reset before
  the client read it is sent again; until then they stay in the store, so a restart sends
  them again too.
- WebSocket: forgotten once the frame is written to the socket.
- Webhook: forgotten once the receiver answered 2xx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from dm_actor.api.server import HttpOptions
from dm_actor.store.memory import MemoryStore

from .client import KEY_A, HttpClient, next_message, start_api, websocket
from .test_flow import online, pull
from .test_restart_channels import run_server
from .test_webhook import Received, Receiver, device_request, register

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.address import Address

PULL = b"GET /v2/notification/pull HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n\r\n"


def stored(store: Any) -> list[tuple[str, bytes]]:
    """The events the store keeps for any application: (kind, item)."""
    return [(e.kind, e.item) for e in store.load().events]


async def poll_and_drop(addr: Address) -> None:
    """A long poll whose client goes away without reading the response (it arrives in the
    client's receive buffer; closing with it unread resets the connection)."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(addr[:2])
        await sock.send(PULL % KEY_A.encode())
        await trio.sleep(1)


async def command(client: HttpClient, async_id: str) -> None:
    reply = await client.request(
        "POST", f"/v2/device-requests/dev?async-id={async_id}",
        json={"method": "GET", "uri": "/3/0/1"},
    )  # fmt: skip
    assert reply.status == 202, reply.text


async def test_a_long_poll_response_is_forgotten_when_the_next_poll_acknowledges_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    api = await start_api(nursery, store=store)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        await online(api, nursery)
        await command(client, "r1")
        await trio.sleep(1)
        message = await pull(client)
        assert [r["id"] for r in message["async-responses"]] == ["r1"]
        assert [r["ep"] for r in message["registrations"]] == ["dev"]
        await trio.sleep(5)  # the held response is stored (the spill), until acknowledged
        assert sorted(kind for kind, _ in stored(store)) == ["async-responses", "registrations"]
        reply = await client.request("GET", "/v2/notification/pull")  # acknowledges
        assert reply.status == 204  # (30 s later: nothing new, nothing again)
        assert stored(store) == []


async def test_a_long_poll_response_that_never_arrived_is_sent_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    api = await start_api(nursery, store=store)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        await online(api, nursery)
        await command(client, "r1")
        await trio.sleep(1)
        await poll_and_drop(api.addr)  # took the events, then the client went away
        assert sorted(kind for kind, _ in stored(store)) == ["async-responses", "registrations"]
        message = await pull(client)  # ... so the next poll gets them again
        assert [r["id"] for r in message["async-responses"]] == ["r1"]
        assert [r["ep"] for r in message["registrations"]] == ["dev"]
        await command(client, "r2")
        message = await pull(client)  # acknowledges the previous response
        assert [r["id"] for r in message["async-responses"]] == ["r2"]
        assert [item for _, item in stored(store)] == [b'{"id":"r2","status":200,"payload":'
                                                       b'"NDI=","ct":"text/plain",'
                                                       b'"max-age":60}']  # fmt: skip
        await client.request("DELETE", "/v2/notification/pull")  # deleting acknowledges too
        assert stored(store) == []


async def test_a_held_response_does_not_hold_back_the_close_of_its_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The server closes an idle keep-alive connection whose last response is held for its
    acknowledgement: the client sees the close (within a second or two), and the response
    counts as arrived (the next poll, on a new connection, does not get it again)."""
    api = await start_api(nursery, options=HttpOptions(idle_timeout=20))
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        await online(api, nursery)
    stream = await trio.open_tcp_stream(*api.addr[:2])
    async with stream:
        await stream.send_all(PULL % KEY_A.encode())
        data = b""
        with trio.fail_after(23):  # read the response; the server closes 20 s later
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and b'"registrations"' in data
    async with api.client() as client:
        await online(api, nursery, ep="dev-2")
        message = await pull(client)  # acknowledges the first response
        assert [r["ep"] for r in message["registrations"]] == ["dev-2"]


async def test_an_unacknowledged_long_poll_response_is_sent_again_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The daemon dies between a poll's response and the next poll: the restarted one (on
    the same SQLite file) sends the same events again, recognisable by the async-id."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    scope, first = await run_server(nursery, tmp_path, autojump_clock)
    assert first.http is not None
    async with HttpClient(first.http, KEY_A) as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        from tests.actors.support import Device

        dev = Device(first.coap_udp, "dev", lifetime=3600)
        await dev.start(nursery)
        await dev.register()
        await command(client, "r1")
        await trio.sleep(1)
        message = await pull(client)
        assert [r["id"] for r in message["async-responses"]] == ["r1"]
        assert [r["ep"] for r in message["registrations"]] == ["dev"]
        await trio.sleep(2)  # past the spill interval: the held response is stored
    scope.cancel()
    await trio.sleep(1)

    _, second = await run_server(nursery, tmp_path, autojump_clock)
    assert second.http is not None
    async with HttpClient(second.http, KEY_A) as client:
        again = await pull(client)
        assert again == message
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        await trio.sleep(1)
        sup: Supervisor = second.supervisor
        assert stored(sup.store) == []


async def test_a_websocket_event_is_forgotten_once_its_frame_is_written(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    api = await start_api(nursery, store=store)
    async with api.client() as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        await online(api, nursery)
        await trio.sleep(2)  # nobody connected: the registration is stored
        assert [kind for kind, _ in stored(store)] == ["registrations"]
        async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
            assert [r["ep"] for r in (await next_message(ws))["registrations"]] == ["dev"]
            await command(client, "w1")
            assert [r["id"] for r in (await next_message(ws))["async-responses"]] == ["w1"]
            assert stored(store) == []


async def test_a_webhook_event_is_forgotten_once_the_receiver_answered_2xx(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    api = await start_api(nursery, store=store)
    answers = iter([200, 500, 503, 204])  # the test PUT, two failures, then a 2xx

    async def answer(_: Received) -> int:
        return next(answers, 200)

    receiver = Receiver(answer)
    url = await receiver.start(nursery)
    async with api.client() as client:
        assert await register(client, url) == (204, "")
        await receiver.next()
        await online(api, nursery)
        await device_request(client, "h1")
        for _ in range(2):  # failed: the events stay stored, and are sent again
            failed = await receiver.next()
            assert [r["id"] for r in failed.json().get("async-responses", ())] in ([], ["h1"])
            await trio.testing.wait_all_tasks_blocked()
            assert "async-responses" in [kind for kind, _ in stored(store)]
        delivered = await receiver.next()
        assert [r["id"] for r in delivered.json()["async-responses"]] == ["h1"]
        await trio.testing.wait_all_tasks_blocked()
        assert stored(store) == []
