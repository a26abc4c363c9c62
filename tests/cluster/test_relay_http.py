"""Cluster mode, end to end over real HTTP: events produced on the node that owns a device
reach the application's channel on its home node through `POST /internal/events` (real
HttpServers, each over its own Supervisor, in one Trio run; `EventRelay.send` is
`http_sender` over the node's `ClusterRouter`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.api.auth import application_id
from dm_actor.api.relay import EventRelay, http_sender
from dm_actor.api.server import HttpServer
from dm_actor.cluster.slots import home_slot, slot_of
from dm_actor.cluster.view import StaticView
from dm_actor.coap.numbers import Code
from tests.actors.support import Device, Server, start_server
from tests.api.client import KEY_A, KEYS, HttpClient

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.cluster.view import HostPort

SLOTS = 8
APP = application_id(KEY_A)
GET_1 = {"method": "GET", "uri": "/3/0/1"}


@dataclass
class Node:
    name: str
    server: Server
    http: HttpServer
    relay: EventRelay
    addr: Address
    view: StaticView
    up: bool = True


async def start_pair(nursery: trio.Nursery) -> tuple[Node, Node]:
    """Nodes a and b (slots 0-3: a, 4-7: b); returns (the home of KEY_A's app, the other)."""
    owners = {s: "a" if s < SLOTS // 2 else "b" for s in range(SLOTS)}
    http: dict[str, HostPort] = {}
    nodes: dict[str, Node] = {}
    for name in ("a", "b"):
        view = StaticView(name, SLOTS, owners, http=http, secret=b"relay-test-secret")
        server = await start_server(nursery)
        server_http = HttpServer(server.sup, KEYS, cluster=view)
        router = server_http.router
        assert router is not None
        send = http_sender(view, router.pool.request, router.sign, timeout=2.0)

        async def gated(node: str, body: bytes, send: object = send) -> int:
            if not nodes[node].up:
                raise OSError("connection refused")
            return await send(node, body)  # type: ignore[operator, no-any-return]

        relay = EventRelay(view, server_http.hub, gated)
        server_http.relay = relay
        addr = await nursery.start(server_http.run, "127.0.0.1", 0)
        http[name] = (addr[0], addr[1])
        nodes[name] = Node(name, server, server_http, relay, addr, view)
    home = owners[home_slot(APP, SLOTS)]
    return nodes[home], nodes["b" if home == "a" else "a"]


def endpoint_on(node: Node, n: int = 0) -> str:
    owners = node.view.owners
    found = [f"dev-{i}" for i in range(200) if owners[slot_of(f"dev-{i}", SLOTS)] == node.name]
    return found[n]


async def test_an_async_response_made_on_the_device_owner_reaches_the_home_channel_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    home, other = await start_pair(nursery)
    async with HttpClient(home.addr, KEY_A) as client:
        reply = await client.request("GET", "/v2/notification/pull")  # opens the channel
        assert reply.status == 204
        ep = endpoint_on(other)  # the device lives on the other node
        dev = Device(other.server.addr, ep)
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["ep"] for r in reply.json()["registrations"]] == [ep]
        # the request goes to the owner (proxied); its answer comes back by the relay
        target = f"/v2/device-requests/{ep}?async-id=h1"
        assert (await client.request("POST", target, json=GET_1)).status == 202
        reply = await client.request("GET", "/v2/notification/pull")
        [response] = reply.json()["async-responses"]
        assert (response["id"], response["status"]) == ("h1", 200)
        assert [e.path for e in dev.executed] == ["/3/0/1"]
        # the home node forgot it once the next poll acknowledged it
        reply = await client.request("GET", "/v2/notification/pull")
        assert reply.status == 204
    stats = other.relay.statistics()
    assert stats.sent == 2 and stats.waiting == 0 and stats.failures == 0
    assert home.relay.statistics().received == 2
    assert not other.http.hub.owed and not other.http.hub.orphans


async def test_the_home_node_down_then_back_gets_the_response_after_retries(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    home, other = await start_pair(nursery)
    async with HttpClient(home.addr, KEY_A) as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        ep = endpoint_on(other)
        dev = Device(other.server.addr, ep)
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        await trio.sleep(1)
        home.up = False
        async with HttpClient(other.addr, KEY_A) as direct:  # (the owner takes it directly)
            target = f"/v2/device-requests/{ep}?async-id=h2"
            assert (await direct.request("POST", target, json=GET_1)).status == 202
        await trio.sleep(20)
        assert other.relay.statistics().failures >= 3
        assert other.relay.statistics().waiting == 1
        home.up = True
        await trio.sleep(6)
        reply = await client.request("GET", "/v2/notification/pull")
        body = reply.json()
        assert [r["id"] for r in body["async-responses"]] == ["h2"]
    assert other.relay.statistics().waiting == 0
