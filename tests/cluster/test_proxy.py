"""Cluster mode's HTTP between nodes (dm_actor/api/proxy.py): real HttpServers in one Trio
run, each over its own Supervisor, with a StaticView splitting the slots between them. A call
about one device made on any node gets its owner's exact answer; a channel is served by its
application's home node; the device list is gathered from every node; internal calls are
signed and a forged one is refused."""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing
from trio_websocket import ConnectionRejected

from dm_actor.api.auth import ApiKeys, application_id
from dm_actor.api.proxy import CLUSTER_HEADER, CLUSTER_TIME_HEADER, internal_headers, sign
from dm_actor.api.server import HttpOptions, HttpServer
from dm_actor.cluster.slots import home_slot, slot_of
from dm_actor.cluster.view import StaticView
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from tests.actors.support import Device, Server, start_server
from tests.api.client import KEY_A, KEYS, HttpClient, close_code, websocket

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.cluster.view import HostPort
    from dm_actor.config import Settings

SLOTS = 8
SECRET = b"cluster-test-secret"
APP = application_id(KEY_A)
GET_1 = {"method": "GET", "uri": "/3/0/1"}


@dataclass
class Node:
    name: str
    server: Server
    http: HttpServer
    addr: Address
    view: StaticView

    def client(self, key: str | None = KEY_A) -> HttpClient:
        return HttpClient(self.addr, key)


async def start_cluster(
    nursery: trio.Nursery,
    names: tuple[str, ...] = ("a", "b"),
    settings: Settings | None = None,
    options: HttpOptions | None = None,
    keys: ApiKeys = KEYS,
) -> dict[str, Node]:
    """Nodes sharing one table of owners (slot s: names[s * N // SLOTS]) and of addresses."""
    owners = {s: names[s * len(names) // SLOTS] for s in range(SLOTS)}
    http: dict[str, HostPort] = {}
    nodes = {}
    for name in names:
        view = StaticView(name, SLOTS, owners, http=http, secret=SECRET)
        server = await start_server(nursery, settings)
        server_http = HttpServer(server.sup, keys, options, cluster=view)
        addr = await nursery.start(server_http.run, "127.0.0.1", 0)
        http[name] = (addr[0], addr[1])
        nodes[name] = Node(name, server, server_http, addr, view)
    return nodes


def endpoint_of(node: str, nodes: dict[str, Node], prefix: str = "dev", n: int = 0) -> str:
    """The `n`th endpoint name `prefix-<i>` whose slot `node` owns."""
    owners = nodes[node].view.owners
    found = [f"{prefix}-{i}" for i in range(200) if owners[slot_of(f"{prefix}-{i}", SLOTS)] == node]
    return found[n]


def home_and_other(nodes: dict[str, Node]) -> tuple[Node, Node]:
    """The home node of KEY_A's application, and another node."""
    home = next(iter(nodes.values())).view.owners[home_slot(APP, SLOTS)]
    other = next(n for n in nodes if n != home)
    return nodes[home], nodes[other]


async def online(node: Node, nursery: trio.Nursery, ep: str, **kw: object) -> Device:
    dev = Device(node.server.addr, ep, **kw)  # type: ignore[arg-type]
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    return dev


async def test_a_device_request_on_a_non_owner_gets_the_owners_202_then_409(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    ep = endpoint_of("a", nodes)
    dev = await online(nodes["a"], nursery, ep)
    async with nodes["b"].client() as client:
        target = f"/v2/device-requests/{ep}?async-id=x1"
        reply = await client.request("POST", target, json=GET_1)
        assert (reply.status, reply.body) == (202, b"")
        reply = await client.request("POST", target, json=GET_1)  # a repeat: shares it
        assert (reply.status, reply.body) == (202, b"")
        reply = await client.request("POST", target, json={"method": "GET", "uri": "/3/0/2"})
        assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE")
        assert reply.headers[b"content-type"].startswith(b"text/plain")
        await trio.sleep(1)
        assert [e.path for e in dev.executed] == ["/3/0/1"]  # once, by the owner
        view = (await client.request("GET", f"/v2/device-requests/{ep}")).json()
        assert view["endpoint_name"] == ep and view["queue_length"] == 0
        # the owner's resources and directory entry, read through b
        reply = await client.request("GET", f"/v2/endpoints/{ep}")
        assert reply.status == 200 and "/3/0/1" in [r["uri"] for r in reply.json()]
        reply = await client.request("GET", f"/v3/devices/{ep}")
        assert reply.status == 200 and reply.json()["id"] == ep
    assert client.connections == 1  # keep-alive on the client's side
    router = nodes["b"].http.router
    assert router is not None and router.statistics["proxied"] == 6
    assert router.pool.connections == 1  # and between the nodes
    assert nodes["b"].server.sup.by_endpoint == {}  # b never saw the device


async def test_429_and_404_come_from_the_owner(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery, settings=parse_settings("[delivery]\nqueue_length = 2"))
    ep = endpoint_of("b", nodes)
    await online(nodes["b"], nursery, ep, answer=False)
    ghost = endpoint_of("b", nodes, "ghost")
    async with nodes["a"].client() as client:
        for i, status in enumerate((202, 202, 429)):
            reply = await client.request(
                "POST", f"/v2/device-requests/{ep}?async-id=f{i}", json=GET_1
            )
            assert reply.status == status
        assert reply.text == "QUEUE_IS_FULL"
        reply = await client.request("POST", f"/v2/device-requests/{ghost}?async-id=g", json=GET_1)
        assert (reply.status, reply.text) == (404, "DEVICE_NOT_FOUND")
        reply = await client.request("GET", f"/v3/devices/{ghost}")
        assert reply.status == 404 and reply.json()["type"] == "not_found"
        assert len(reply.json()["request_id"]) == 32  # the owner's request id
        reply = await client.request("GET", f"/v2/subscriptions/{ghost}")
        assert (reply.status, reply.text) == (404, "DEVICE_NOT_FOUND")
        reply = await client.request("PUT", f"/v2/subscriptions/{ghost}/3/0/1")
        assert (reply.status, reply.text) == (404, "DEVICE_NOT_FOUND")


async def test_a_pull_on_a_non_home_node_reaches_the_home_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    home, other = home_and_other(nodes)
    async with other.client() as client:
        reply = await client.request("GET", "/v2/notification/pull")  # opens the channel
        assert (reply.status, reply.body) == (204, b"")
        assert APP in home.http.hub.channels and APP not in other.http.hub.channels
        ep = endpoint_of(home.name, nodes)
        await online(home, nursery, ep)
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["ep"] for r in reply.json()["registrations"]] == [ep]
        reply = await client.request("POST", f"/v2/device-requests/{ep}?async-id=p1", json=GET_1)
        assert reply.status == 202
        reply = await client.request("GET", "/v2/notification/pull")
        [response] = reply.json()["async-responses"]
        assert (response["id"], response["status"]) == ("p1", 200)
        reply = await client.request("GET", "/v2/notification/channel")
        assert reply.json() == {"delivery_mechanism": "LONG_POLLING"}
        assert (await client.request("DELETE", "/v2/notification/pull")).text == "REMOVED"
        assert APP not in home.http.hub.channels


async def test_the_device_list_is_gathered_from_every_node_and_paged(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery, ("a", "b", "c"))
    everyone = []
    for name, node in nodes.items():
        for i in range(3):
            ep = endpoint_of(name, nodes, n=i)
            await online(node, nursery, ep)
            everyone.append(ep)
    for order, expected in (("ASC", sorted(everyone)), ("DESC", sorted(everyone, reverse=True))):
        seen: list[str] = []
        after = ""
        async with nodes["b"].client() as client:
            while True:
                reply = await client.request(
                    "GET", f"/v3/devices?limit=4&order={order}&after={after}"
                )
                page = reply.json()
                assert reply.status == 200 and page["total_count"] == 9
                assert page["limit"] == 4 and page["order"] == order
                seen += [d["id"] for d in page["data"]]
                if not page["has_more"]:
                    break
                after = page["data"][-1]["id"]
        assert seen == expected
    async with nodes["c"].client() as client:
        reply = await client.request("GET", "/v3/devices?limit=1")  # this node's 400
        assert reply.status == 400 and reply.json()["fields"][0]["name"] == "limit"
        prefix = endpoint_of("a", nodes)
        reply = await client.request("GET", f"/v3/devices?id__in={prefix},nobody")
        assert [d["id"] for d in reply.json()["data"]] == [prefix]
        assert reply.json()["total_count"] == 1


async def test_presubscriptions_are_set_on_every_live_node(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery, ("a", "b", "c"))
    entries = [{"endpoint-name": "dev-*", "resource-path": ["/3/0/1"]}]
    async with nodes["a"].client() as client:
        assert (await client.request("PUT", "/v2/subscriptions", json=entries)).status == 204
        for node in nodes.values():
            [p] = node.server.sup.presubscriptions[APP]
            assert p.resource_paths == ("/3/0/1",)
        assert (await client.request("DELETE", "/v2/subscriptions")).status == 204
        for node in nodes.values():
            assert not node.server.sup.presubscriptions.get(APP)
        # a node that cannot be reached: 503, and the same PUT again sets it everywhere
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        nodes["a"].view.http["c"] = closed.getsockname()
        closed.close()
        reply = await client.request("PUT", "/v2/subscriptions", json=entries)
        assert reply.status == 503 and reply.headers[b"retry-after"] == b"1"
        assert "not on node(s) c" in reply.json()["message"]
        assert [bool(n.server.sup.presubscriptions.get(APP)) for n in nodes.values()] == [
            True, True, False
        ]  # fmt: skip
        nodes["a"].view.http["c"] = nodes["c"].addr[:2]
        assert (await client.request("PUT", "/v2/subscriptions", json=entries)).status == 204
        assert all(n.server.sup.presubscriptions.get(APP) for n in nodes.values())


async def test_internal_headers_forged_old_or_missing_are_refused_403(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    b = nodes["b"]
    router = b.http.router
    assert router is not None
    ep = endpoint_of("a", nodes)
    target = f"/v2/device-requests/{ep}"
    now = router.wall()
    async with b.client() as client:
        forged = [
            (CLUSTER_HEADER.decode(), "00" * 32),
            (CLUSTER_TIME_HEADER.decode(), f"{now:.3f}"),
        ]
        reply = await client.request("GET", target, headers=forged)
        assert reply.status == 403 and reply.json()["type"] == "forbidden"
        old = internal_headers(SECRET, b"GET", target.encode(), now - 60)
        reply = await client.request(
            "GET", target, headers=[(n.decode(), v.decode()) for n, v in old]
        )
        assert reply.status == 403
        other_key = internal_headers(b"wrong", b"GET", target.encode(), now)
        reply = await client.request(
            "GET", target, headers=[(n.decode(), v.decode()) for n, v in other_key]
        )
        assert reply.status == 403
        # a valid one is answered here, never sent on: b does not serve a's device's slot,
        # so 503 (a device only moving between nodes is never answered 404)
        valid = internal_headers(SECRET, b"GET", target.encode(), router.wall())
        reply = await client.request(
            "GET", target, headers=[(n.decode(), v.decode()) for n, v in valid]
        )
        assert reply.status == 503 and reply.headers[b"retry-after"]
        assert router.statistics["proxied"] == 0
        # /internal/events: a valid header only; 404 while no relay is attached
        reply = await client.request("POST", "/internal/events", body=b"[]", key=None)
        assert reply.status == 403
        signed = [
            (n.decode(), v.decode()) for n, v in router.sign(b"POST", b"/internal/events", b"[]")
        ]
        reply = await client.request(
            "POST", "/internal/events", body=b"[]", headers=signed, key=None
        )
        assert reply.status == 404

        class Relay:
            def __init__(self) -> None:
                self.bodies: list[bytes] = []

            async def receive(self, body: bytes) -> int:
                self.bodies.append(body)
                return 204

        relay = Relay()
        b.http.relay = relay
        # the MAC covers the body: the headers signed for b"[]" do not pass b"[1]"
        reply = await client.request(
            "POST", "/internal/events", body=b"[1]", headers=signed, key=None
        )
        assert reply.status == 403 and relay.bodies == []
        signed = [
            (n.decode(), v.decode()) for n, v in router.sign(b"POST", b"/internal/events", b"[1]")
        ]
        reply = await client.request(
            "POST", "/internal/events", body=b"[1]", headers=signed, key=None
        )
        assert reply.status == 204 and relay.bodies == [b"[1]"]
        # the MAC covers the method and the target
        reply = await client.request(
            "PUT", "/internal/events", body=b"[2]", headers=signed, key=None
        )
        assert reply.status == 403 and relay.bodies == [b"[1]"]
    assert router.statistics["internal_refused"] == 6
    # what relay.py's EventRelay is given as `send`: a's router posting to b
    a_router = nodes["a"].http.router
    assert a_router is not None
    assert await a_router.send_events("b", b"[3]") == 204 and relay.bodies[-1] == b"[3]"
    assert sign(SECRET, b"GET", b"/x", b"1.000") != sign(SECRET, b"GET", b"/y", b"1.000")


async def test_an_owner_that_cannot_be_reached_is_a_quick_503(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    a, b = nodes["a"], nodes["b"]
    ep = endpoint_of("a", nodes)
    # a listener that never answers (accepted by the kernel, never read)
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    b.view.http["a"] = silent.getsockname()
    router = b.http.router
    assert router is not None
    async with b.client() as client:
        started = trio.current_time()
        reply = await client.request("POST", f"/v2/device-requests/{ep}?async-id=u1", json=GET_1)
        assert reply.status == 503 and reply.headers[b"retry-after"] == b"1"
        assert reply.json()["type"] == "service_unavailable" and reply.json()["code"] == 503
        assert trio.current_time() - started <= router.timeout + 1
        # a port nobody listens on: at once
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        b.view.http["a"] = closed.getsockname()
        closed.close()
        started = trio.current_time()
        reply = await client.request("GET", f"/v3/devices/{ep}")
        assert reply.status == 503 and trio.current_time() - started < 1
        # the list needs every node
        reply = await client.request("GET", "/v3/devices")
        assert reply.status == 503
        # a slot nobody owns (a failover's gap)
        del b.view.owners[slot_of(ep, SLOTS)]
        reply = await client.request("GET", f"/v2/device-requests/{ep}")
        assert reply.status == 503 and reply.headers[b"retry-after"] == b"1"
        # and the node still serves
        b.view.owners[slot_of(ep, SLOTS)] = "a"
        b.view.http["a"] = a.addr[:2]
        assert (await client.request("GET", f"/v3/devices/{ep}")).status == 404
    silent.close()
    assert router.statistics["unreachable"] == 4


async def test_a_websocket_on_a_non_home_node_is_relayed_with_its_close_codes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    home, other = home_and_other(nodes)
    # no channel yet: the home node's 1011 passes through
    async with websocket(other.addr, ["wss", f"pelion_{KEY_A}"]) as ws:
        assert await close_code(ws) == 1011
    async with other.client() as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        assert APP in home.http.hub.channels
        async with websocket(other.addr, ["wss", f"pelion_{KEY_A}"]) as ws:
            assert ws.subprotocol == "wss"
            await trio.sleep(0.5)
            reply = await client.request("GET", "/v2/notification/websocket")
            assert reply.json()["status"] == "connected"
            ep = endpoint_of(home.name, nodes)
            await online(home, nursery, ep)
            message = jsonlib.loads(await ws.get_message())
            assert [r["ep"] for r in message["registrations"]] == [ep]
            reply = await client.request(
                "POST", f"/v2/device-requests/{ep}?async-id=w1", json=GET_1
            )
            assert reply.status == 202
            message = jsonlib.loads(await ws.get_message())
            assert message["async-responses"][0]["id"] == "w1"
            # the channel deleted (on the home node): its close code reaches the client
            assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
            assert await close_code(ws) == 1000
    router = other.http.router
    assert router is not None and router.statistics["websockets_relayed"] == 2


async def test_a_relayed_long_poll_whose_client_hangs_up_takes_no_events(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    home, other = home_and_other(nodes)
    async with other.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
    stream = await trio.open_tcp_stream(*other.addr[:2])
    head = f"GET /v2/notification/pull HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\r\n"
    await stream.send_all(head.encode())
    await trio.sleep(1)  # the poll waits on the home node
    channel = home.http.hub.channels[APP]
    polling = [channel.polling]
    await stream.aclose()  # the client hangs up
    await trio.sleep(1)
    polling.append(channel.polling)
    assert polling == [True, False]  # the home node's poll ended with the internal connection
    ep = endpoint_of(home.name, nodes)
    await online(home, nursery, ep)
    async with other.client() as client:
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["ep"] for r in reply.json()["registrations"]] == [ep]


async def test_a_relayed_websocket_client_that_answers_no_ping_is_closed_1001(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    _, other = home_and_other(nodes)
    async with other.client() as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        stream = await trio.open_tcp_stream(*other.addr[:2])
        head = (
            "GET /v2/notification/websocket-connect HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Protocol: wss, pelion_{KEY_A}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 101")
        await trio.sleep(1)
        reply = await client.request("GET", "/v2/notification/websocket")
        assert reply.json()["status"] == "connected"
        await trio.sleep(65)  # the client reads nothing: no pong
        reply = await client.request("GET", "/v2/notification/websocket")
        assert reply.json()["status"] == "disconnected"
        assert other.http.statistics().websockets_too_slow == 1
        await stream.aclose()


async def test_a_kept_connection_the_owner_closed_is_replaced_without_a_503(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery, options=HttpOptions(idle_timeout=5))
    ep = endpoint_of("a", nodes)
    await online(nodes["a"], nursery, ep)
    router = nodes["b"].http.router
    assert router is not None
    async with nodes["b"].client() as client:
        assert (await client.request("GET", f"/v3/devices/{ep}")).status == 200
        await trio.sleep(10)  # a closed the idle internal connection meanwhile
        assert (await client.request("GET", f"/v3/devices/{ep}")).status == 200
    assert router.pool.connections == 2 and router.statistics["unreachable"] == 0


async def test_a_peer_that_answers_garbage_is_a_503_and_the_node_serves_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    b = nodes["b"]
    ep = endpoint_of("a", nodes)
    answers = [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort"]

    async def fake_peer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(answers.pop(0))

    [listener] = await nursery.start(partial(trio.serve_tcp, fake_peer, 0, host="127.0.0.1"))
    b.view.http["a"] = listener.socket.getsockname()
    async with b.client() as client:
        for _ in range(2):
            reply = await client.request("GET", f"/v3/devices/{ep}")
            assert reply.status == 503 and reply.json()["type"] == "service_unavailable"
        b.view.http["a"] = nodes["a"].addr[:2]
        assert (await client.request("GET", f"/v3/devices/{ep}")).status == 404
    assert client.connections == 1


async def test_an_administrators_device_routes_are_answered_by_the_owner(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    keys = ApiKeys([KEY_A], admin_keys=["ak_admin"])
    nodes = await start_cluster(nursery, keys=keys)
    ep = endpoint_of("b", nodes)
    dev = await online(nodes["b"], nursery, ep)
    async with nodes["a"].client("ak_admin") as client:
        reply = await client.request("GET", f"/admin/devices/{ep}")
        assert reply.status == 200 and reply.json()["transport"] == "udp"
        reply = await client.request("POST", f"/admin/device-requests/{ep}", json=GET_1)
        assert reply.status == 202 and "async-response-id" in reply.json()
        await trio.sleep(1)
        assert [e.path for e in dev.executed] == ["/3/0/1"]
        reply = await client.request("GET", "/admin/overview")  # this node's own
        assert reply.json()["devices_registered"] == 0
        metrics = (await client.request("GET", "/metrics")).text
        assert 'dm_actor_http_cluster_total{kind="proxied"} 2.0' in metrics


async def test_a_websocket_or_pull_whose_home_slot_has_no_owner_is_503(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    nodes = await start_cluster(nursery)
    _, other = home_and_other(nodes)
    del other.view.owners[home_slot(APP, SLOTS)]  # (the table is shared: nobody's now)
    statuses: list[int] = []
    try:
        async with websocket(other.addr, ["wss", f"pelion_{KEY_A}"]):
            pass
    except* ConnectionRejected as group:
        statuses = [e.status_code for e in _leaves(group)]
    assert statuses == [503]
    async with other.client() as client:
        reply = await client.request("GET", "/v2/notification/pull")
        assert reply.status == 503 and reply.headers[b"retry-after"] == b"1"


def _leaves(group: BaseExceptionGroup[ConnectionRejected]) -> list[ConnectionRejected]:
    out: list[ConnectionRejected] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


class _Lost:
    """A relayed response's receipt that says its client never got it (a reset connection:
    `PullReceipt`'s own tests show when a real socket says so)."""

    def lost(self) -> bool:
        return True

    def check(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_a_relayed_pull_tells_the_home_whether_its_client_got_the_last_response(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The home node cannot see the relaying node's client: the next relayed poll says
    whether the previous response arrived (x-dm-previous-pull), and the home node sends it
    again only when it did not (it judged by the internal connection before, and sent
    responses that had arrived twice when an ACK was late: test_cluster_routing)."""
    nodes = await start_cluster(nursery)
    home, other = home_and_other(nodes)
    async with other.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        ep = endpoint_of(home.name, nodes)
        await online(home, nursery, ep)
        await client.request("GET", "/v2/notification/pull")  # (the registration)
        reply = await client.request("POST", f"/v2/device-requests/{ep}?async-id=p1", json=GET_1)
        assert reply.status == 202
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["id"] for r in reply.json()["async-responses"]] == ["p1"]
        other.http._relayed_pulls.pop(APP).close()
        other.http._relayed_pulls[APP] = _Lost()  # type: ignore[assignment]
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["id"] for r in reply.json()["async-responses"]] == ["p1"]  # sent again
        reply = await client.request("GET", "/v2/notification/pull")  # arrived: not again
        assert reply.status == 204
