"""The internal link (dm_actor.transport.link.ClusterLink): three nodes on 127.0.0.1, .2 and
.3 with real UDP sockets (a CoAP socket and a link socket each), a device on 127.0.0.5, and
recording callbacks in place of each node's router."""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from hypothesis import given, settings, strategies as st

from dm_actor.cluster import slots, wire
from dm_actor.cluster.view import HostPort, StaticView
from dm_actor.coap import message as m
from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.transport.link import ClusterLink
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from dm_actor.address import Address

COUNT = 1024
WAIT = 5.0  # a hang guard only: loopback delivers at once
HOSTS = {"A": "127.0.0.1", "B": "127.0.0.2", "C": "127.0.0.3"}
DEVICE_HOST = "127.0.0.5"
SECRET = b"link test secret"


def endpoint_of(node: str) -> str:
    """An endpoint name whose slot is different for each node (slot -> node below)."""
    return f"device-of-{node}"


def slot_for(node: str) -> int:
    return slots.slot_of(endpoint_of(node), COUNT)


OWNERS = {slot_for(n): n for n in HOSTS}
UNOWNED_EP = next(
    ep for ep in (f"x{i}" for i in range(100)) if slots.slot_of(ep, COUNT) not in OWNERS
)
assert len(OWNERS) == 3


@dataclass
class Node:
    name: str
    link: ClusterLink
    coap: UdpEndpoint
    view: StaticView
    received: list[tuple[bytes, Address]] = field(default_factory=list)
    unreachable: list[Address] = field(default_factory=list)
    coap_address: Address = ("", 0)


@dataclass
class Cluster:
    nodes: dict[str, Node]
    links: dict[str, HostPort]

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


async def start_cluster(
    nursery: trio.Nursery, *, peers: int = 100_000, owners: dict[str, dict[int, str]] | None = None
) -> Cluster:
    links: dict[str, HostPort] = {}
    nodes: dict[str, Node] = {}
    for name, host in HOSTS.items():
        view = StaticView(
            name, COUNT, dict(OWNERS if owners is None else owners[name]), links=links,
            secret=SECRET,
        )  # fmt: skip
        received: list[tuple[bytes, Address]] = []
        unreachable: list[Address] = []
        link = ClusterLink(
            view,
            partial(_record, received),
            unreachable.append,
            peers=peers,
            retry_after=30,
        )
        coap = UdpEndpoint(host, 0, link.on_datagram, link.on_unreachable)
        link.attach(coap.send)
        node = Node(name, link, coap, view, received, unreachable)
        node.coap_address = await nursery.start(coap.run)
        address = await nursery.start(link.run, host, 0)
        links[name] = (address[0], address[1])
        nodes[name] = node
    return Cluster(nodes, links)


def _record(into: list[tuple[bytes, Address]], data: bytes, addr: Address) -> None:
    into.append((data, addr))


@pytest.fixture
async def device() -> AsyncIterator[trio.socket.SocketType]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((DEVICE_HOST, 0))
        yield sock


async def until(condition: Callable[[], object]) -> None:
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - polling what other tasks' sockets record
            await trio.sleep(0.001)


async def receive(sock: trio.socket.SocketType) -> tuple[bytes, Address]:
    with trio.fail_after(WAIT):
        data, addr = await sock.recvfrom(65535)
    return data, addr


def register(ep: str, mid: int = 1, mtype: int = MessageType.CON) -> bytes:
    options = (
        (OptionNumber.URI_PATH.value, b"rd"),
        (OptionNumber.URI_QUERY.value, b"ep=" + ep.encode()),
    )
    return m.encode(Message(mtype, Code.POST, mid, b"tk", options, b"</1/0>"))


async def test_a_register_reaches_its_owner_and_the_answers_leave_through_the_ingress(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery)
    a, b, c = cluster["A"], cluster["B"], cluster["C"]
    me = device.getsockname()
    # a Register for B's slot, sent to A: B's router sees it from the device's own address
    await device.sendto(register(endpoint_of("B")), a.coap_address)
    await until(lambda: b.received)
    assert b.received == [(register(endpoint_of("B")), me)]
    assert not a.received and not c.received
    assert a.link.statistics["forwarded"] == 1
    assert b.link.statistics["received_forwarded"] == 1
    # B's answer goes back through A: the device hears it from A's CoAP address
    created = m.encode(Message(MessageType.ACK, Code.CREATED, 1, b"tk"))
    assert b.link.egress(created, me) is True
    assert await receive(device) == (created, a.coap_address)
    assert b.link.statistics["backwarded"] == 1 and a.link.statistics["sent_back"] == 1
    # B's request (a cluster token) and the device's empty ACK (no token: A's peer map)
    token = slots.token_prefix(slot_for("B")) + b"\0\0\0\1"
    read = m.encode(Message(MessageType.CON, Code.GET, 77, token, ((11, b"3"),)))
    assert b.link.egress(read, me) is True
    assert await receive(device) == (read, a.coap_address)
    await device.sendto(m.empty_ack(77), a.coap_address)
    await until(lambda: len(b.received) == 2)
    assert b.received[1] == (m.empty_ack(77), me)
    # its piggybacked answer names B's slot by the token
    content = m.encode(Message(MessageType.ACK, Code.CONTENT, 77, token, (), b"x"))
    await device.sendto(content, a.coap_address)
    await until(lambda: len(b.received) == 3)
    assert b.received[2] == (content, me)
    # a Reset naming nothing also follows the peer map
    await device.sendto(m.reset_for(78), a.coap_address)
    await until(lambda: len(b.received) == 4)
    assert not a.received and not c.received
    # the device now talks to B directly: B forgets the way through A and answers directly
    await device.sendto(m.empty_ack(79), b.coap_address)
    await until(lambda: len(b.received) == 5)
    assert b.link.egress(created, me) is False
    assert b.link.statistics["backwarded"] == 2


async def test_datagrams_for_this_nodes_slots_stay_here(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery)
    a = cluster["A"]
    await device.sendto(register(endpoint_of("A")), a.coap_address)
    await device.sendto(b"\x40\x00\x00\x09", a.coap_address)  # a ping: names nothing
    await until(lambda: len(a.received) == 2)
    assert a.link.statistics["forwarded"] == 0
    assert a.link.egress(b"x", device.getsockname()) is False  # (not forwarded here: direct)


async def test_a_register_for_a_slot_nobody_serves_gets_5_03_with_max_age(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery)
    a = cluster["A"]
    await device.sendto(register(UNOWNED_EP, mid=5), a.coap_address)
    data, source = await receive(device)
    assert source == a.coap_address
    reply = m.decode(data)
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (
        MessageType.ACK, Code.SERVICE_UNAVAILABLE, 5, b"tk",
    )  # fmt: skip
    assert reply.max_age == 30
    await device.sendto(register(UNOWNED_EP, mid=6, mtype=MessageType.NON), a.coap_address)
    reply = m.decode((await receive(device))[0])
    assert (reply.mtype, reply.code, reply.max_age) == (MessageType.NON, 163, 30)
    # an Update naming an unowned slot is dropped, counted
    path = ((11, b"rd"), (11, slots.reg_id(slots.slot_of(UNOWNED_EP, COUNT)).encode()))
    await device.sendto(m.encode(Message(MessageType.CON, Code.POST, 7, b"", path)), a.coap_address)
    await until(lambda: a.link.statistics["unowned_dropped"] == 1)
    # a slot this node holds but does not serve (past its deadline): the same
    a.view.owners[slots.slot_of(UNOWNED_EP, COUNT)] = "A"
    a.view.mine = lambda slot: False  # type: ignore[method-assign]
    await device.sendto(register(UNOWNED_EP, mid=8), a.coap_address)
    assert m.decode((await receive(device))[0]).code == Code.SERVICE_UNAVAILABLE
    assert a.link.statistics["unowned_registers"] == 3
    assert not any(n.received for n in cluster.nodes.values())


async def test_an_icmp_error_at_the_ingress_reaches_the_owner(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery)
    a, c = cluster["A"], cluster["C"]
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        await gone.bind((DEVICE_HOST, 0))
        addr = gone.getsockname()
        await gone.sendto(register(endpoint_of("C")), a.coap_address)
        await until(lambda: c.received)
    # the device's socket is closed: C's request, sent through A, meets an ICMP error at A
    token = slots.token_prefix(slot_for("C")) + b"\0\0\0\1"
    assert c.link.egress(m.encode(Message(MessageType.CON, Code.GET, 1, token)), addr)
    await until(lambda: c.unreachable)
    assert c.unreachable == [addr]
    assert not a.unreachable
    assert a.link.statistics["unreachable_forwarded"] == 1
    assert c.link.statistics["unreachable_received"] == 1


async def test_forged_and_broken_frames_are_dropped_and_counted(
    nursery: trio.Nursery, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = await start_cluster(nursery)
    b = cluster["B"]
    target = cluster.links["B"]
    payload = register(endpoint_of("B"))
    device: Address = (DEVICE_HOST, 4000)
    frames = [
        b"",
        b"garbage" * 10,
        b"\xff" * (wire.MAX_FRAME + 1),
        # the right layout, another key
        wire.encode(wire.FORWARD, "A", device, payload, wire.link_key(b"wrong")),
        # the cluster secret itself as the key (not the link's key)
        wire.encode(wire.FORWARD, "A", device, payload, SECRET),
        # authenticated, but naming B itself as the sender, or a node nobody knows
        wire.encode(wire.FORWARD, "B", device, payload, wire.link_key(SECRET)),
        wire.encode(wire.FORWARD, "Z", device, payload, wire.link_key(SECRET)),
    ]
    good = wire.encode(wire.FORWARD, "A", device, payload, wire.link_key(SECRET), time.time())
    frames.append(good[:-1] + bytes([good[-1] ^ 1]))
    # authenticated, but stale (a replay, or held in a paused node's socket) or from a clock
    # far ahead
    for shift in (-b.link.max_age - 1, b.link.max_age + 1):
        key = wire.link_key(SECRET)
        frames.append(wire.encode(wire.FORWARD, "A", device, payload, key, time.time() + shift))
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        await attacker.bind(("127.0.0.9", 0))
        for _ in range(3):
            for frame in frames:
                await attacker.sendto(frame, target)
        await attacker.sendto(good, target)  # (after them, one that passes)
        await until(lambda: b.received)
    assert b.received == [(payload, device)]
    assert b.link.statistics["frames_refused"] == 3 * len(frames)
    # logged once per reason (then counted only)
    lines = [r for r in caplog.records if "frame from" in r.getMessage()]
    assert 1 <= len(lines) <= 6 < b.link.statistics["frames_refused"]


async def test_a_forward_for_a_slot_the_receiver_does_not_serve_is_dropped(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    # A still thinks B owns the slot; B has handed it to C (no second forward: no loops)
    moved = slot_for("B")
    owners = {name: dict(OWNERS) for name in HOSTS}
    owners["B"][moved] = owners["C"][moved] = "C"
    cluster = await start_cluster(nursery, owners=owners)
    await device.sendto(register(endpoint_of("B")), cluster["A"].coap_address)
    await until(lambda: cluster["B"].link.statistics["misrouted"] == 1)
    assert not any(n.received for n in cluster.nodes.values())


async def test_floods_of_addresses_are_bounded(
    nursery: trio.Nursery, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery, peers=50)
    a, b = cluster["A"], cluster["B"]
    # ingress side: 500 devices forwarded (the callback directly: addresses need no sockets)
    for port in range(1000, 1500):
        a.link.on_datagram(register(endpoint_of("B"), mid=port), ("127.0.0.7", port))
    assert len(a.link.peers) == 50
    assert ("127.0.0.7", 1499) in a.link.peers and ("127.0.0.7", 1000) not in a.link.peers
    # owner side: they all reach B, whose ingress map keeps the 50 most recent
    await until(lambda: len(b.received) == 500)
    assert len(b.link.ingress) == 50
    # BACKWARDs for 500 more addresses: A's peer map stays bounded
    token = slots.token_prefix(slot_for("B")) + b"\0\0\0\1"
    for port in range(2000, 2500):
        b.link.ingress[("127.0.0.7", port)] = "A"
        b.link.egress(m.encode(Message(MessageType.CON, Code.GET, 1, token)), ("127.0.0.7", port))
    await until(lambda: a.link.statistics["sent_back"] == 500)
    assert len(a.link.peers) == 50


async def test_nothing_is_sent_before_the_link_runs_or_to_an_unknown_node() -> None:
    view = StaticView("A", COUNT, dict(OWNERS), links={"B": ("127.0.0.2", 9)}, secret=SECRET)
    received: list[tuple[bytes, Address]] = []
    link = ClusterLink(view, lambda d, a: received.append((d, a)), lambda a: None)
    link.on_datagram(register(endpoint_of("B")), (DEVICE_HOST, 1))  # the link is not running
    link.on_datagram(register(endpoint_of("C")), (DEVICE_HOST, 2))  # C: no link address
    assert link.statistics["link_dropped"] == 2 and not received
    view.links["B"] = ("node-b.example", 9)  # a name would block on every send: refused
    link.ingress[(DEVICE_HOST, 3)] = "B"
    assert link.egress(b"x", (DEVICE_HOST, 3)) is True  # held: B's CoAP address is not ours
    assert link.statistics["ingress_gone_held"] == 1 and link.ingress


async def test_two_endpoints_share_a_port_with_reuse_port(nursery: trio.Nursery) -> None:
    first = UdpEndpoint("127.0.0.1", 0, lambda d, a: None, lambda a: None, reuse_port=True)
    address = await nursery.start(first.run)
    second = UdpEndpoint("127.0.0.1", address[1], lambda d, a: None, lambda a: None,
                         reuse_port=True)  # fmt: skip
    assert await nursery.start(second.run) == address
    third = UdpEndpoint("127.0.0.1", address[1], lambda d, a: None, lambda a: None)
    with pytest.raises(OSError, match="in use"):
        await nursery.start(third.run)


@settings(max_examples=300)
@given(
    st.binary(max_size=80),
    st.sampled_from([register(endpoint_of("B")), register(UNOWNED_EP), m.empty_ack(1)]),
    st.integers(0, 65535),
)
async def test_nothing_a_peer_sends_raises_out_of_the_callbacks(
    noise: bytes, datagram: bytes, port: int
) -> None:
    view = StaticView("A", COUNT, dict(OWNERS), links={"B": ("127.0.0.2", 9)}, secret=SECRET)
    received: list[tuple[bytes, Address]] = []
    link = ClusterLink(view, partial(_record, received), lambda a: None, peers=4)
    link.attach(lambda d, a: None)
    addr: Address = (DEVICE_HOST, port)
    for data in (noise, datagram, datagram[: len(noise) % 12], datagram + noise):
        link.on_datagram(data, addr)
        link._on_frame(data, addr)
        link.on_unreachable(addr)
        link.egress(data, addr)
    # an authenticated frame around any payload
    key = wire.link_key(SECRET)
    for kind in (wire.FORWARD, wire.BACKWARD):
        link._on_frame(wire.encode(kind, "B", addr, noise, key), ("127.0.0.2", 9))
    assert len(link.peers) <= 4 and len(link.ingress) <= 4


async def test_frames_are_not_traced_as_coap_at_debug_level(
    nursery: trio.Nursery, device: trio.socket.SocketType, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dm_actor.transport.udp")
    cluster = await start_cluster(nursery)
    await device.sendto(register(endpoint_of("B")), cluster["A"].coap_address)
    await until(lambda: cluster["B"].received)
    traced = [r.getMessage() for r in caplog.records if r.name == "dm_actor.transport.udp"]
    # the device's datagram in at A's CoAP socket, and nothing from the link sockets
    assert len(traced) == 1
    assert "/rd?ep=device-of-B" in traced[0]


async def test_answers_go_out_directly_once_the_ingress_node_is_gone(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    """...when that node's CoAP address is this node's (SO_REUSEPORT, a VIP): the device
    sees the source it talks to. Otherwise they are held (the next test)."""
    cluster = await start_cluster(nursery)
    a, b = cluster["A"], cluster["B"]
    b.view.coap = {"A": "127.0.0.1:5683", "B": "127.0.0.1:5683"}
    me = device.getsockname()
    await device.sendto(register(endpoint_of("B")), a.coap_address)
    await until(lambda: b.received)
    # A's link dies (kill -9): the first frame to it meets an ICMP error, the next go direct
    alive = cluster.links["A"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
        gone.bind((HOSTS["A"], 0))
        cluster.links["A"] = gone.getsockname()
    assert b.link.egress(b"first", me) is True
    await until(lambda: b.link.statistics["link_unreachable"] == 1)
    assert b.link.egress(b"second", me) is False
    assert b.link.statistics["ingress_gone"] == 1 and not b.link.ingress
    # it comes back (here: at its old address): a frame from it says it is up again
    cluster.links["A"] = alive
    await device.sendto(register(endpoint_of("B"), mid=2), a.coap_address)
    await until(lambda: len(b.received) == 2)
    assert b.link.egress(b"third", me) is True
    assert (await receive(device)) == (b"third", a.coap_address)
    # a node the view no longer counts as live (its heartbeat is old): direct at once
    b.view.live_nodes = lambda: ["B", "C"]  # type: ignore[method-assign]
    await trio.sleep(1.5)  # (the view is read again at most once a second)
    assert b.link.egress(b"fourth", me) is False


async def test_what_names_no_slot_stays_here_once_the_node_it_followed_is_gone(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    cluster = await start_cluster(nursery)
    a, b = cluster["A"], cluster["B"]
    me = device.getsockname()
    # B answered the device's request through A (a token of the device's: names nothing)
    b.link.ingress[me] = "A"
    assert b.link.egress(m.encode(Message(MessageType.ACK, Code.CREATED, 1, b"tk")), me)
    await receive(device)
    assert a.link.peers[me] == "B"
    await device.sendto(m.reset_for(5), a.coap_address)
    await until(lambda: b.received)
    # B is no longer live: A keeps the device's Reset rather than sending it into nothing
    a.view.live_nodes = lambda: ["A", "C"]  # type: ignore[method-assign]
    await trio.sleep(1.5)
    await device.sendto(m.reset_for(6), a.coap_address)
    await until(lambda: a.received)
    assert a.received == [(m.reset_for(6), me)] and len(b.received) == 1


async def test_answers_are_held_once_an_ingress_node_with_another_address_is_gone(
    nursery: trio.Nursery, device: trio.socket.SocketType, autojump_clock: object
) -> None:
    """From B's own address the device would see another server and take a retransmission
    for a new exchange (executed twice: the issue-17 attacker's kill -9 of an ingress node
    in topology B): held back until the device is heard again, which re-routes them."""
    cluster = await start_cluster(nursery)
    a, b = cluster["A"], cluster["B"]
    me = device.getsockname()
    await device.sendto(register(endpoint_of("B")), a.coap_address)
    await until(lambda: b.received)
    b.view.live_nodes = lambda: ["B", "C"]  # type: ignore[method-assign]
    await trio.sleep(1.5)  # (the view is read again at most once a second)
    assert b.link.egress(b"held", me) is True
    assert b.link.egress(b"held again", me) is True
    assert b.link.statistics["ingress_gone_held"] == 2
    with trio.move_on_after(1):
        assert await receive(device) is None, "nothing reaches the device meanwhile"
    # the device talks to B directly now: B answers directly
    b.link.on_datagram(register(endpoint_of("B"), mid=3), me)
    assert b.link.egress(b"direct", me) is False
