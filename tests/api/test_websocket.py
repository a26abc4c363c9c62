"""The WebSocket channel: auth forms, one live socket, events kept while disconnected."""

from __future__ import annotations

import trio
import trio.testing

from .client import KEY_A, KEY_B, Api, close_code, next_message, start_api, websocket
from .test_flow import online

UPGRADE = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
]


async def put_channel(api: Api, key: str = KEY_A) -> None:
    async with api.client(key) as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201


async def test_three_auth_forms_and_the_echoed_subprotocol(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    forms: list[tuple[list[str] | None, list[tuple[bytes, bytes]] | None, str | None]] = [
        (["wss", f"pelion_{KEY_A}"], None, "wss"),
        ([f"pelion_{KEY_A}", "wss"], None, "wss"),
        # pelion-bridge, Node ws, browsers: one offered must be selected (RFC 6455 4.2.2)
        ([f"pelion_{KEY_A}"], None, f"pelion_{KEY_A}"),
        (None, [(b"authorization", f"Bearer {KEY_A}".encode())], None),
    ]
    for protocols, headers, chosen in forms:
        async with websocket(api, protocols, headers) as ws:
            assert ws.subprotocol == chosen
            await online(api, nursery, ep=f"dev-{len(protocols or ())}-{chosen}")
            assert "registrations" in await next_message(ws)


async def test_handshake_refusals(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    path = "/v2/notification/websocket-connect"
    async with api.client(None) as client:
        reply = await client.request("GET", path, headers=UPGRADE)
        assert (reply.status, reply.text) == (401, "Authentication failure.")
        protocols = [("sec-websocket-protocol", "wss, pelion_ak_wrong")]
        reply = await client.request("GET", path, headers=UPGRADE + protocols)
        assert (reply.status, reply.text) == (401, "Authentication failure.")
        reply = await client.request("GET", path, key=KEY_A)  # no Upgrade header
        assert reply.status == 426
        reply = await client.request("GET", path, headers=UPGRADE[:2], key=KEY_A)
        assert reply.status == 400


async def test_a_second_socket_closes_the_first_with_1001(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    async with (
        websocket(api, ["wss", f"pelion_{KEY_A}"]) as first,
        websocket(api, ["wss", f"pelion_{KEY_A}"]) as second,
    ):
        assert await close_code(first) == 1001
        await online(api, nursery)
        assert "registrations" in await next_message(second)


async def test_reconnect_receives_events_queued_while_disconnected(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        await online(api, nursery, ep="first")
        assert [r["ep"] for r in (await next_message(ws))["registrations"]] == ["first"]
    await trio.sleep(1)
    for ep in ("second", "third"):
        await online(api, nursery, ep=ep)
    async with api.client() as client:
        reply = await client.request(
            "POST", "/v2/device-requests/first?async-id=q1", json={"method": "GET", "uri": "/3/0/1"}
        )
        assert reply.status == 202
        await trio.sleep(1)
        view = (await client.request("GET", "/v2/notification/websocket")).json()
        assert (view["status"], view["queue_size"]) == ("disconnected", 3)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        message = await next_message(ws)
    assert [r["ep"] for r in message["registrations"]] == ["second", "third"]
    assert [r["id"] for r in message["async-responses"]] == ["q1"]


async def test_two_keys_never_see_each_others_async_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api, KEY_A)
    await put_channel(api, KEY_B)
    async with (
        websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws_a,
        websocket(api, ["wss", f"pelion_{KEY_B}"]) as ws_b,
        api.client(KEY_A) as a,
        api.client(KEY_B) as b,
    ):
        await online(api, nursery)
        assert "registrations" in await next_message(ws_a)  # registrations go to everyone
        assert "registrations" in await next_message(ws_b)
        body = {"method": "GET", "uri": "/3/0/1"}
        assert (
            await a.request("POST", "/v2/device-requests/dev?async-id=a1", json=body)
        ).status == 202
        assert (
            await b.request("POST", "/v2/device-requests/dev?async-id=b1", json=body)
        ).status == 202
        got_a = await next_message(ws_a)
        got_b = await next_message(ws_b)
        assert [r["id"] for r in got_a["async-responses"]] == ["a1"]
        assert [r["id"] for r in got_b["async-responses"]] == ["b1"]
        await trio.sleep(5)
        for client in (a, b):
            view = (await client.request("GET", "/v2/notification/websocket")).json()
            assert view["queue_size"] == 0


async def test_server_pings_and_deleting_the_channel_closes_1000(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await put_channel(api)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        await trio.sleep(95)  # three pings answered by the client library: still open
        assert ws.closed is None
        async with api.client() as client:
            assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
            assert (await client.request("DELETE", "/v2/notification/websocket")).status == 404
        assert await close_code(ws) == 1000


async def test_a_channel_without_a_socket_for_24_hours_is_deleted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pelion's WebSocket channel lifetime: 24 h with no open socket (the queue is kept while
    the gaps are shorter)."""
    api = await start_api(nursery)
    await put_channel(api)
    await trio.sleep(23 * 3600)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:  # a gap under 24 h: kept
        await trio.sleep(1)
    await trio.sleep(23 * 3600)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/websocket")).status == 200
        await trio.sleep(3600 + 120)  # now 24 h without a socket
        assert (await client.request("GET", "/v2/notification/websocket")).status == 404
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        assert await close_code(ws) == 1011  # PUT it again first
