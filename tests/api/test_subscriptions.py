"""Subscriptions and pre-subscriptions over REST, with notifications on the channel."""

from __future__ import annotations

import json

import trio
import trio.testing

from .client import KEY_B, start_api, websocket
from .test_flow import online, pull
from .test_websocket import put_channel


async def test_subscribe_notify_list_and_unsubscribe(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client, api.client(KEY_B) as other:
        await client.request("GET", "/v2/notification/pull")
        dev = await online(api, nursery)
        assert "registrations" in await pull(client)
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert (reply.status, reply.body) == (200, b"")
        message = await pull(client)  # the Observe's first value
        assert message == {"notifications": [
            {"ep": "dev", "path": "/3303/0/5700", "ct": "text/plain", "payload": "NDI=",
             "max-age": 60}]}  # fmt: skip
        await dev.notify("/3303/0/5700", b"21.5")
        message = await pull(client)
        assert [(n["path"], n["payload"]) for n in message["notifications"]] == [
            ("/3303/0/5700", "MjEuNQ==")
        ]
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 200
        assert (await other.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 404
        assert (await client.request("GET", "/v2/subscriptions/dev/3/0/1")).status == 404
        reply = await client.request("GET", "/v2/subscriptions/dev")
        assert (reply.status, reply.headers[b"content-type"]) == (200, b"text/uri-list")
        assert reply.text.split("\n") == ["/3303/0/5700"]
        assert (await other.request("GET", "/v2/subscriptions/dev")).status == 404
        reply = await client.request("PUT", "/v2/subscriptions/dev/5/0/1")
        assert (reply.status, reply.text) == (404, "URI_PATH_DOES_NOT_EXISTS")
        reply = await client.request("PUT", "/v2/subscriptions/ghost/3/0/1")
        assert (reply.status, reply.text) == (404, "DEVICE_NOT_FOUND")
        reply = await client.request("DELETE", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 204
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 404
        await client.request("PUT", "/v2/subscriptions/dev/3303/0")
        await client.request("PUT", "/v2/subscriptions/dev/3/0")
        reply = await client.request("GET", "/v2/subscriptions/dev")
        assert reply.text == "/3/0\n/3303/0"
        assert (await client.request("DELETE", "/v2/subscriptions/dev")).status == 204
        assert (await client.request("GET", "/v2/subscriptions/dev")).status == 404


async def test_presubscriptions(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    body = [
        {"endpoint-name": "sensor-*", "resource-path": ["/3303/0/5700"]},
        {"endpoint-type": "Light"},
    ]
    async with api.client() as client:
        assert (await client.request("PUT", "/v2/subscriptions", json=body)).status == 204
        assert (await client.request("GET", "/v2/subscriptions")).json() == body
        reply = await client.request("PUT", "/v2/subscriptions", json=[{"resource-path": []}])
        assert (reply.status, reply.text) == (400, "MALFORMED_JSON_CONTENT")
        reply = await client.request("PUT", "/v2/subscriptions", json={"not": "a list"})
        assert reply.status == 400
        assert (await client.request("PUT", "/v2/subscriptions", json=body[:1])).status == 204
        async with websocket(api, ["wss", "pelion_ak_test_a"]) as ws:
            sensor = await online(api, nursery, ep="sensor-1")
            await trio.sleep(1)
            assert sorted(sensor.observers) == ["/3303/0/5700"]
            await sensor.notify("/3303/0/5700", b"7")
            seen: list[str] = []
            while len(seen) < 2:
                message = await ws.get_message()
                seen += [n["payload"] for n in _notifications(message)]
            assert seen == ["NDI=", "Nw=="]
        assert (await client.request("PUT", "/v2/subscriptions", json=[])).status == 204
        assert (await client.request("GET", "/v2/subscriptions")).json() == []
        assert (await client.request("PUT", "/v2/subscriptions", json=body)).status == 204
        assert (await client.request("DELETE", "/v2/subscriptions")).status == 204
        assert (await client.request("GET", "/v2/subscriptions")).json() == []


def _notifications(message: str | bytes) -> list[dict[str, str]]:
    items: list[dict[str, str]] = json.loads(message).get("notifications", [])
    return items
