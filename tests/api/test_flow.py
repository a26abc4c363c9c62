"""End to end over loopback: real HTTP and WebSocket clients, devices speaking CoAP."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from dm_actor.coap.numbers import Code
from dm_actor.store.memory import MemoryStore
from tests.actors.support import Device

from .client import (
    KEY_A,
    KEY_B,
    KEYS,
    Api,
    HttpClient,
    close_code,
    next_message,
    start_api,
    websocket,
)


async def online(api: Api, nursery: trio.Nursery, ep: str = "dev", **kw: object) -> Device:
    dev = Device(api.server.addr, ep, **kw)  # type: ignore[arg-type]
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    return dev


async def pull(client: HttpClient) -> dict[str, list[Any]]:
    reply = await client.request("GET", "/v2/notification/pull")
    assert reply.status == 200, (reply.status, reply.body)
    assert reply.headers[b"content-type"] == b"application/json"
    message: dict[str, list[Any]] = reply.json()
    return message


async def test_long_poll_flow(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await _long_poll_flow(api, client, nursery)


async def _long_poll_flow(api: Api, client: HttpClient, nursery: trio.Nursery) -> None:
    reply = await client.request("GET", "/v2/notification/pull")  # creates the channel
    assert reply.status == 204 and reply.body == b""
    await online(api, nursery)
    message = await pull(client)
    [registration] = message["registrations"]
    assert registration == {"ep": "dev", "q": False, "security_mode": "nosec", "resources": [
        {"path": "/1/0", "obs": False}, {"path": "/3/0", "obs": False},
        {"path": "/3303/0", "obs": False}, {"path": "/3311/0", "obs": False}]}  # fmt: skip
    reply = await client.request(
        "POST", "/v2/device-requests/dev?async-id=r-1", json={"method": "GET", "uri": "/3/0/1"}
    )
    assert (reply.status, reply.body) == (202, b"")
    message = await pull(client)
    [response] = message["async-responses"]
    assert response == {"id": "r-1", "status": 200, "payload": "NDI=", "ct": "text/plain",
                        "max-age": 60}  # fmt: skip
    assert client.connections == 1  # keep-alive throughout


async def test_websocket_flow(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await _websocket_flow(api, client, nursery)


async def _websocket_flow(api: Api, client: HttpClient, nursery: trio.Nursery) -> None:
    reply = await client.request("PUT", "/v2/notification/websocket")
    assert reply.status == 201
    assert reply.json() == {"status": "disconnected", "queue_size": 0, "serialization": {
        "type": "v2", "max_chunk_size": 10000, "cfg": {
            "deregistrations_as_object": False, "include_uid": False,
            "include_timestamp": False, "include_original_ep": False}}}  # fmt: skip
    assert (await client.request("PUT", "/v2/notification/websocket")).status == 200
    assert (await client.request("GET", "/v2/notification/channel")).json() == {
        "delivery_mechanism": "WEB_SOCKET"
    }
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        assert ws.subprotocol == "wss"
        status = (await client.request("GET", "/v2/notification/websocket")).json()["status"]
        assert status == "connected"
        await online(api, nursery)
        message = json.loads(await ws.get_message())
        assert [r["ep"] for r in message["registrations"]] == ["dev"]
        reply = await client.request(
            "POST",
            "/v2/device-requests/dev?async-id=w1",
            json={"method": "PUT", "uri": "/3/0/14", "content-type": "text/plain",
                  "payload-b64": "KzAx"},
        )  # fmt: skip
        assert reply.status == 202
        message = json.loads(await ws.get_message())
        assert message == {"async-responses": [{"id": "w1", "status": 200}]}
    await trio.sleep(1)
    status = (await client.request("GET", "/v2/notification/websocket")).json()["status"]
    assert status == "disconnected"
    assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
    assert (await client.request("GET", "/v2/notification/channel")).status == 404


async def test_websocket_without_channel_closes_1011(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with websocket(api, ["wss", f"pelion_{KEY_B}"]) as ws:
        assert await close_code(ws) == 1011


async def test_a_delivered_async_response_is_forgotten_by_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    store = api.sup.store
    assert isinstance(store, MemoryStore)
    await online(api, nursery)
    async with api.client() as client:
        await client.request("PUT", "/v2/notification/websocket")  # a channel, not connected
    owner = KEYS.owner(KEY_A)
    assert owner is not None
    await api.sup.submit("dev", "GET", "/3/0/1", async_id="a", owner=owner)
    await trio.sleep(1)
    assert [e.kind for e in store.load().events] == ["async-responses"]  # owed until taken
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        message = await next_message(ws)
        while "async-responses" not in message:
            message = await next_message(ws)
    assert message["async-responses"][0]["id"] == "a"
    assert store.load().events == []


async def test_a_long_poll_channel_without_a_poll_for_10_minutes_is_deleted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pelion's long-poll channel lifetime: 10 min without a poll. While it lives, another
    channel type is refused; once it expired, a WebSocket channel can be made."""
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")  # creates the channel
        await trio.sleep(9 * 60)
        await client.request("GET", "/v2/notification/pull")  # refreshes it (30 s poll)
        await trio.sleep(9 * 60)
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 400
        await trio.sleep(2 * 60)
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
