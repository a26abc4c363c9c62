"""Hostile input at the supervisor (issue 10): what a peer sends never ends the server.

Each test here reproduces a finding over real loopback UDP and fails on the code before its
fix; the raw socket plays the attacker (or an honest client that retransmits at a bad time).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Self

import pytest
import trio
import trio.testing

from dm_actor.actors.device import Signal
from dm_actor.coap import framing_tcp
from dm_actor.coap.message import Message, decode, encode, path_options, query_options, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

from .support import OBJECTS, Device, GatedStore, online, start_server

if TYPE_CHECKING:
    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.address import Address

CON, ACK = MessageType.CON, MessageType.ACK


def register(mid: int, ep: str = "dev", token: bytes = b"\x01", lt: int = 86400) -> bytes:
    options = tuple(
        sorted(
            (*path_options("/rd"), *query_options(f"ep={ep}&lt={lt}&b=U"),
             (OptionNumber.CONTENT_FORMAT, uint_bytes(40))),
            key=lambda o: o[0],
        )
    )  # fmt: skip
    return encode(Message(CON, Code.POST, mid, token, options, OBJECTS))


class Peer:
    """A raw UDP socket: sends what it is told, collects every datagram that comes back."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.got: list[Message] = []

    async def bind(self) -> None:
        await self.sock.bind(("127.0.0.1", 0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.server)

    async def collect(self, seconds: float = 1.0) -> list[Message]:
        with trio.move_on_after(seconds):
            while True:
                data, _ = await self.sock.recvfrom(65536)
                self.got.append(decode(data))
        return self.got

    def answers_to(self, mid: int) -> list[Message]:
        return [m for m in self.got if m.mtype == ACK and m.mid == mid]


async def test_a_register_repeated_past_the_dedup_window_while_held_is_answered_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Finding 1: the 23 datagrams. Register; the same Register with a new Message ID M while
    the store is slow; 20 other requests (more than the 16-entry window); Register M again.
    The process crashed with `request M was already answered`; now M is answered once and
    the server goes on."""
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    with Peer(server.addr) as peer:
        await peer.bind()
        await peer.send(register(1))
        await peer.collect(0.5)
        [created] = peer.answers_to(1)
        assert created.code == Code.CREATED  # the address now belongs to the device's actor
        store.open = False  # the disk is slow: the next answers wait for it
        await peer.send(register(100, token=b"\x02"))
        for mid in range(200, 220):
            get = Message(CON, Code.GET, mid, b"\x03", path_options("/rd/nothing"))
            await peer.send(encode(get))
        await peer.send(register(100, token=b"\x02"))
        await peer.collect(1.0)
        store.commit()
        await peer.collect(1.0)
        assert [m.code for m in peer.answers_to(100)] == [Code.CREATED]
        await peer.send(register(100, token=b"\x02"))  # a late retransmission: the same answer
        await peer.collect(1.0)
        assert len(peer.answers_to(100)) == 2
        assert peer.answers_to(100)[0] == peer.answers_to(100)[1]
        assert set(server.sup.by_endpoint) == {"dev"}


async def test_a_register_for_another_endpoint_from_a_bound_address_is_answered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Finding 2: NAT port reuse, a proxy, a renamed device: B registers from A's address.
    The 2.01 went out through A's endpoint, whose address had just been taken: lost."""
    server, dev_a = await online(nursery, "a")
    assert dev_a.sock is not None
    # B speaks from exactly A's address and port: reuse A's socket through a raw send
    await dev_a.sock.sendto(register(0x7777, ep="b", token=b"\x0b"), server.addr)
    await trio.sleep(1)
    [answer] = [m for _, m in dev_a.arrivals if m.mid == 0x7777]
    assert answer.code == Code.CREATED
    sup: Supervisor = server.sup
    assert set(sup.by_endpoint) == {"a", "b"}  # A stays registered ...
    assert sup.by_addr[("127.0.0.1", dev_a.sock.getsockname()[1])] is sup.by_endpoint["b"]
    assert sup.by_endpoint["a"].addr is None  # ... unreachable until it next contacts us
    # a retransmission of B's Register gets the same answer, not a second registration
    reg_id = sup.by_endpoint["b"].reg.reg_id
    await dev_a.sock.sendto(register(0x7777, ep="b", token=b"\x0b"), server.addr)
    await trio.sleep(1)
    assert sup.by_endpoint["b"].reg.reg_id == reg_id
    answers = [m for _, m in dev_a.arrivals if m.mid == 0x7777]
    assert len(answers) == 2 and answers[0] == answers[1]
    # A comes back (an Update from a new port) and is reachable again
    await dev_a.start(nursery)
    assert (await dev_a.update()).code == Code.CHANGED
    assert sup.by_endpoint["a"].addr is not None


@pytest.mark.parametrize("bound", [False, True])
async def test_an_exception_while_handling_a_peer_ends_only_that_device(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    bound: bool,
) -> None:
    """Containment: any exception raised while handling a peer's input (here a bug planted in
    the registration interface) ends at most that device's registration, counted and
    published as a de-registration; the server and other devices go on."""
    server, healthy = await online(nursery, "healthy")
    victim = Device(server.addr, "victim")
    await victim.start(nursery)
    if bound:
        assert (await victim.register()).code == Code.CREATED
    sup = server.sup
    target = sup if bound else sup.router
    name = "device_request" if bound else "_unknown_peer"
    original = getattr(target, name)

    def planted(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug reached by a peer's bytes")

    monkeypatch.setattr(target, name, planted)
    with trio.move_on_after(1):
        await (victim.update() if bound else victim.register())
    monkeypatch.setattr(target, name, original)
    assert sup.statistics["peer_errors"] == 1
    if bound:
        assert "victim" not in sup.by_endpoint
        assert ("de-registrations", "victim") in server.take("de-registrations")
    accepted = await sup.submit("healthy", "GET", "/3/0/0", async_id="after")
    assert accepted.__class__.__name__ == "Accepted"
    await trio.sleep(5)
    assert healthy.executed


def register_query(mid: int, query: str) -> bytes:
    options = tuple(
        sorted(
            (*path_options("/rd"), *query_options(query),
             (OptionNumber.CONTENT_FORMAT, uint_bytes(40))),
            key=lambda o: o[0],
        )
    )  # fmt: skip
    return encode(Message(CON, Code.POST, mid, b"\x01", options, OBJECTS))


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("lt=60", "no ep: 4.00, not 4.03"),
        ("ep=a\x00b", "NUL in the endpoint name"),
        ("ep=../etc", "a path in the endpoint name"),
        ("ep=a&lt=4294967295", "136 years: over the maximum lifetime"),
        ("ep=a&b=T", "TCP-only binding announced over UDP"),
    ],
)
async def test_bad_registers_get_4_00(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, query: str, why: str
) -> None:
    server = await start_server(nursery)
    with Peer(server.addr) as peer:
        await peer.bind()
        await peer.send(register_query(9, query))
        await peer.collect(1.0)
        assert [m.code for m in peer.answers_to(9)] == [Code.BAD_REQUEST], why
    assert server.sup.by_endpoint == {}


async def test_a_bound_device_registering_while_the_store_is_behind_gets_5_03(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, "busy", store=store)
    server.sup._held_limit = 1
    store.open = False
    store.put_registration(store.registrations["busy"])  # one write the disk has not taken
    answer = await dev.register()
    assert (answer.code, answer.max_age) == (Code.SERVICE_UNAVAILABLE, 60)
    assert server.sup.statistics["registrations_shed"] == 1


class FakeConnection:
    """A CoAP-over-TCP connection as the actors see it (frames are kept, not sent)."""

    def __init__(self, peer: Address) -> None:
        self._peer = peer
        self.frames: list[bytes] = []

    @property
    def peer(self) -> Address:
        return self._peer

    def send_frame_nowait(self, frame: bytes) -> None:
        self.frames.append(frame)


async def test_a_register_waiting_in_the_mailbox_when_the_transport_changes_twice(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by the server-level fuzzer: UDP Register, a second one queued in the actor's
    mailbox, the same endpoint over TCP, then over UDP again, in one receive batch. The
    last Register's binding handled the queued one (nested) and then failed with a KeyError:
    the device lost its registration. Now both are taken in order and it stays registered."""
    server = await start_server(nursery)
    sup = server.sup
    addr = ("127.0.0.1", 40000)
    conn = FakeConnection(("127.0.0.1", 40001))
    sup.on_datagram(register_query(0x965D, "ep=dev-0&b=UQ"), addr)
    sup.on_datagram(register_query(0x967E, "ep=dev-0&b=U"), addr)
    tcp = decode(register_query(1, "ep=dev-0&b=T"))
    sup.on_tcp_message(conn, Message(0, tcp.code, 0, tcp.token, tcp.options, tcp.payload))
    sup.on_datagram(register_query(0x9681, "ep=dev-0&b=U"), addr)
    await trio.sleep(1)
    assert sup.statistics["peer_errors"] == 0
    actor = sup.by_endpoint["dev-0"]
    assert sup.by_reg_id == {actor.reg.reg_id: actor}
    assert actor.addr == addr and actor.conn is None


async def test_a_held_answer_goes_out_on_the_transport_its_request_came_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by the stateful test: with the store stalled, a TCP device registers twice on
    one connection and then over UDP. The second 2.01, held for the store, went out as a UDP
    ACK with Message ID 0 to the new address; the TCP client never got it."""
    store = GatedStore()
    server = await start_server(nursery, store=store)
    sup = server.sup
    sent: list[tuple[bytes, Address]] = []
    sup.attach_udp(lambda data, addr: sent.append((data, addr)))
    conn = FakeConnection(("127.0.0.1", 40001))
    for token in (b"\x01", b"\x02"):
        tcp = decode(register_query(1, "ep=moving&b=T"))
        sup.on_tcp_message(conn, Message(0, tcp.code, 0, token, tcp.options, tcp.payload))
        await trio.sleep(0.1)
    udp_addr = ("127.0.0.1", 40002)
    sup.on_datagram(register_query(0x4242, "ep=moving&b=U"), udp_addr)
    await trio.sleep(0.1)
    assert conn.frames == [] and sent == []
    store.commit()
    await trio.sleep(0.1)
    decoder = framing_tcp.StreamDecoder()
    for frame in conn.frames:
        decoder.receive_data(frame)
    tokens = sorted(m.token for m in iter(decoder.next_message, None))
    assert tokens == [b"\x01", b"\x02"]  # both TCP Registers answered on their connection
    assert [(decode(d).mid, a) for d, a in sent] == [(0x4242, udp_addr)]  # one ACK over UDP


async def test_refusals_are_summed_up_in_one_log_line_a_minute(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of bad datagrams is counted, and the operator reads one line a minute, not one
    per datagram."""
    server = await start_server(nursery)
    with Peer(server.addr) as peer:
        await peer.bind()
        for mid in range(500):
            await peer.send(bytes((0x40, 0x01, mid >> 8, mid & 0xFF, 0xFF)))  # bad option
        await trio.sleep(1)
    assert server.sup.statistics["decode_errors"] == 500
    with caplog.at_level("WARNING", logger="dm_actor.actors.supervisor"):
        await trio.sleep(120)
    lines = [r.getMessage() for r in caplog.records if "last 60 s" in r.getMessage()]
    assert lines == ["devices, last 60 s: decode_errors +500"]


def test_mail_read_after_another_device_took_its_address_is_answered() -> None:
    """Found by the stateful test (F8): ep2's Update arrived from an address while it was
    ep2's; before ep2's task read it, a Register of ep0 queued for admission took the
    address. The Update was then handled by ep2 with no address: never answered. Now the
    device losing an address handles what came from it first."""
    from .stateful_support import (
        Deregister,
        Open,
        Ping,
        Register,
        Release,
        Stall,
        Submit,
        Update,
        run_actions,
    )

    def reg(peer: int, ep: int, *, queue: bool = False, hold: bool = False) -> Register:
        return Register(peer=peer, ep=ep, lifetime=86400, queue_mode=queue, hold=hold)

    run_actions(
        [
            reg(0, 0), reg(1, 0), reg(0, 0, queue=True), Ping(peer=0),
            reg(1, 0, hold=True), reg(0, 2), reg(0, 0),
            Submit(ep=0, method=0, path=0, expiry=60, reuse=None), Open(),
            Update(peer=1, ep=2, lifetime=None, stale=False, hold=True), Stall(),
            reg(0, 0), Deregister(peer=0, ep=0, stale=False, hold=False), reg(0, 0),
            Release(peer=1, reverse=False, duplicate=False),
        ],
        1,
    )  # fmt: skip


async def test_an_update_read_just_before_the_expiry_signal_keeps_the_registration(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by an attacker: an Update in the mailbox when the lifetime sweeper fired was
    answered 2.04 and then the registration ended as expired anyway."""
    server = await start_server(nursery)
    sup = server.sup
    addr = ("127.0.0.1", 40010)
    sent: list[bytes] = []
    sup.attach_udp(lambda data, to: sent.append(data))
    sup.on_datagram(register_query(1, "ep=short&lt=1"), addr)
    await trio.sleep(0.1)
    [created] = [decode(d) for d in sent if decode(d).mid == 1]
    location = "/" + "/".join(created.location_path)
    actor = sup.by_endpoint["short"]
    await trio.sleep_until(actor.reg.expires_at(sup.registration_grace) - 0.01)
    update = Message(CON, Code.POST, 2, b"\x02", path_options(location))
    sup.on_datagram(encode(update), addr)
    actor.tell(Signal.EXPIRED)  # as the sweeper does, while the Update waits in the mailbox
    await trio.sleep(0.1)
    [changed] = [decode(d) for d in sent if decode(d).mid == 2]
    assert changed.code == Code.CHANGED
    assert "short" in sup.by_endpoint


async def test_a_tcp_register_whose_connection_closed_before_admission_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: a TCP Register waiting for admission when its connection
    closed was registered on the dead connection (by_conn leaked it, commands timed out)."""
    server = await start_server(nursery)
    sup = server.sup
    conn = FakeConnection(("127.0.0.1", 40020))
    tcp = decode(register_query(1, "ep=ghost&b=T"))
    sup.on_tcp_message(conn, Message(0, tcp.code, 0, tcp.token, tcp.options, tcp.payload))
    sup.on_tcp_closed(conn)
    await trio.sleep(1)
    assert "ghost" not in sup.by_endpoint
    assert conn not in sup.by_conn


@pytest.mark.parametrize("first", ["deregister", "expired"])
async def test_mail_after_the_registration_ended_in_the_same_step_is_not_handled(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, first: str
) -> None:
    """An attacker's finding: an Update read in the same step after a De-register (or the
    expiry signal) was answered 2.04 and wrote the registration back to the store, so the
    deleted device came back after a restart."""
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    sup = server.sup
    addr = ("127.0.0.1", 40030)
    sent: list[bytes] = []
    sup.attach_udp(lambda data, to: sent.append(data))
    sup.on_datagram(register_query(100, "ep=dev&lt=600"), addr)
    await trio.sleep(0.1)
    [created] = [decode(d) for d in sent if decode(d).mid == 100]
    location = path_options("/" + "/".join(created.location_path))
    actor = sup.by_endpoint["dev"]
    if first == "deregister":
        sup.on_datagram(encode(Message(CON, Code.DELETE, 101, b"\x01", location)), addr)
    else:
        await trio.sleep_until(actor.reg.expires_at(sup.registration_grace))
        actor.tell(Signal.EXPIRED)
    sup.on_datagram(encode(Message(CON, Code.POST, 102, b"\x02", location)), addr)
    await trio.sleep(1)
    [update] = [decode(d) for d in sent if decode(d).mid == 102]
    assert update.code == Code.NOT_FOUND
    assert "dev" not in sup.by_endpoint
    assert "dev" not in store.registrations


async def test_a_datagram_over_the_size_cap_is_dropped_unread(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: 60 KB datagrams packed with 30,000 options cost ~30 ms each to
    decode; bursts of them held the event loop for seconds."""
    from dm_actor.actors.supervisor import MAX_DATAGRAM

    server = await start_server(nursery)
    sup = server.sup
    sent: list[bytes] = []
    sup.attach_udp(lambda data, to: sent.append(data))
    header = bytes((0x40, 0x01, 0x12, 0x34))
    sup.on_datagram(header + b"\x11\x30" * (MAX_DATAGRAM // 2), ("127.0.0.1", 40040))
    assert sup.statistics["datagrams_too_large"] == 1 and sent == []
    sup.on_datagram(header + b"\xb2rd", ("127.0.0.1", 40040))  # a small one is answered
    assert sent and sup.statistics["datagrams_too_large"] == 1


def test_an_answer_on_a_replaced_tcp_connection_leaves_while_an_attempt_is_held() -> None:
    """Found by the stateful test after the drain-before-rebind change: with the store
    stalled and an attempt held, a TCP device's wrong-id De-register was answered into the
    TCP endpoint's output, which the move to UDP then replaced: the 4.04 never left. Answers
    leave at once whatever the hold, over TCP too."""
    from .stateful_support import Deregister, Filler, Register, Stall, Submit, run_actions

    def reg(peer: int) -> Register:
        return Register(peer=peer, ep=0, lifetime=86400, queue_mode=False, hold=False)

    run_actions(
        [
            reg(0), reg(3), Stall(),
            Filler(peer=0, count=1, settle_each=False, non=False, kind="get"),
            Submit(ep=0, method=0, path=0, expiry=60, reuse=None),
            Deregister(peer=3, ep=0, stale=True, hold=False), reg(0),
        ],
        0,
    )  # fmt: skip
