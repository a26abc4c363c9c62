"""delivery.md rules that concern CoAP over TCP (RFC 8323), over real loopback connections."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from dm_actor.actors.device import Signal
from dm_actor.actors.supervisor import Accepted
from dm_actor.coap import framing_tcp
from dm_actor.coap.message import Message, Option, path_options, query_options
from dm_actor.coap.numbers import Code
from dm_actor.device.machine import MID_BLOCK
from dm_actor.transport.tcp import TcpConnection

from .support import (
    OBJECTS,
    Device,
    GatedStore,
    TcpDevice,
    online_tcp,
    responses,
    start_server,
)


async def test_tcp_device_registers_and_answers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1")
    await dev.connect(nursery)
    assert (await dev.register()).code == Code.CREATED
    assert await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a") == Accepted()
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    assert [(e.method, e.path) for e in dev.executed] == [(Code.GET, "/3/0/1")]
    await dev.disconnect()


async def test_rule_3_2_tcp_attempt_is_written_once_and_fails_after_126_s(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1", answer=False)
    await dev.connect(nursery)
    await dev.register()
    t0 = trio.current_time()
    await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a")
    await trio.sleep(125)
    assert responses(server) == {}
    await trio.sleep(2)
    assert responses(server)["a"] == {"id": "a", "status": 504, "error": "TIMEOUT"}
    assert len(dev.executed) == 1  # written once: TCP is reliable, nothing is retransmitted
    assert 126 <= trio.current_time() - t0 <= 127
    await dev.disconnect()


async def test_rule_3_4_tcp_device_without_a_connection_uses_no_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1")
    await dev.connect(nursery)
    await dev.register()
    await dev.disconnect()
    await trio.sleep(1)
    await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a", retry=0)
    await trio.sleep(3600)
    assert responses(server) == {}  # nothing sent, and the only attempt is not used up
    cmd = server.sup.by_endpoint["tcp-1"].queue.find("a")
    assert cmd is not None and (cmd.attempts, cmd.attempts_left) == (0, 1)
    await dev.connect(nursery)  # the device comes back on a new connection with an Update
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    await dev.disconnect()


async def test_rule_6_tcp_queue_mode_waits_for_wake_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcpq", binding="TQ")
    await dev.connect(nursery)
    await dev.register()
    await trio.sleep(94)
    await server.sup.submit("tcpq", "GET", "/3/0/1", async_id="a")
    await trio.sleep(600)
    assert dev.executed == []
    await dev.update()
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    await dev.disconnect()


async def test_a_reconnect_while_the_actor_is_busy_keeps_the_new_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The connection closes and the device reconnects and updates before the actor read the
    close (it waited for the store): the close must not take the new connection away."""
    store = GatedStore()
    store.open = True
    server, dev = await online_tcp(nursery, store=store)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(0.1)
    actor = server.sup.by_endpoint["dev"]  # (its task now waits for the attempt's write)
    await dev.disconnect()
    await trio.sleep(0.1)
    await dev.connect(nursery)
    updated: list[int] = []

    async def update() -> None:
        updated.append((await dev.update()).code)

    nursery.start_soon(update)
    await trio.sleep(0.5)
    store.open = True
    store.commit()
    await trio.sleep(30)
    assert updated == [Code.CHANGED]
    assert actor.conn is not None
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(5)
    assert responses(server)["b"]["status"] == 200
    await dev.disconnect()


class _Conn:
    """A TCP connection as the supervisor sees one (the frames it would send)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    @property
    def peer(self) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def send_frame_nowait(self, frame: bytes) -> None:
        self.frames.append(frame)


async def test_a_close_and_a_reconnect_read_before_the_actor_runs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The request sent on the closed connection fails at once (rule 3.4), not 93 s later,
    and the device, connected again, gets the next command right away."""
    server, dev = await online_tcp(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(0.5)
    actor = server.sup.by_endpoint["dev"]
    assert actor.conn is not None
    server.sup.on_tcp_closed(actor.conn)  # both before the actor's task runs again
    conn2 = _Conn()
    update = tuple(sorted(path_options(dev.location), key=lambda o: o[0]))
    server.sup.on_tcp_message(conn2, Message(0, Code.POST, 0, b"\x01", update))
    await trio.sleep(1)
    assert responses(server)["a"]["error"] == "NOT_CONNECTED"
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(1)
    decoder = framing_tcp.StreamDecoder()
    for frame in conn2.frames:
        decoder.receive_data(frame)
    sent = []
    while (msg := decoder.next_message()) is not None:
        sent.append(msg.code)
    assert Code.GET in sent  # "b" went out on the new connection
    await dev.disconnect()


async def test_a_close_is_never_lost_to_a_full_mailbox(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery)
    actor = server.sup.by_endpoint["dev"]
    for _ in range(server.sup.mailbox_size):
        actor.tell(Signal.SWEEP)  # a burst the actor has not read yet
    assert actor.conn is not None
    server.sup.on_tcp_closed(actor.conn)
    await trio.sleep(1)
    assert not actor.queue.reachable  # known at once: commands wait for the next contact
    await dev.disconnect()


async def test_an_attempt_not_yet_sent_when_the_connection_closes_keeps_its_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Rule 3.4: a TCP device with no connection: nothing sent, no retry used."""
    store = GatedStore()
    store.open = True
    server, dev = await online_tcp(nursery, store=store)
    await trio.sleep(1)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a", retry=0))
    await trio.sleep(0.1)
    actor = server.sup.by_endpoint["dev"]
    assert actor.conn is not None
    server.sup.on_tcp_closed(actor.conn)
    store.open = True
    store.commit()
    await trio.sleep(1)
    assert "a" not in responses(server)
    assert all(e.path != "/3/0/1" for e in dev.executed)
    assert actor.queue.queue and actor.queue.queue[0].async_id == "a", "never sent, yet finished"
    await dev.disconnect()


async def test_an_answer_read_with_the_close_does_not_start_the_next_command(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(0.5)
    actor = server.sup.by_endpoint["dev"]
    conn = actor.conn
    assert isinstance(conn, TcpConnection) and actor.queue.in_flight is not None
    token = actor.queue.in_flight.token
    assert token is not None
    server.sup.on_tcp_message(conn, Message(0, Code.CONTENT, 0, token, (), b"42"))
    conn.close()  # as TcpListener does before on_closed
    server.sup.on_tcp_closed(conn)
    await trio.sleep(1)
    r = responses(server)
    assert r["a"]["status"] == 200
    assert "b" not in r, f"b never sent, yet finished: {r.get('b')}"
    await dev.disconnect()


async def test_a_closed_connection_is_forgotten_even_with_a_register_in_the_mailbox(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery)
    actor = server.sup.by_endpoint["dev"]
    conn = actor.conn
    assert conn is not None
    opts = tuple(
        sorted(path_options("/rd") + query_options("ep=dev&lt=86400&b=T"), key=lambda o: o[0])
    )
    server.sup.on_tcp_message(conn, Message(0, Code.POST, 0, b"\x09", opts, OBJECTS))
    server.sup.on_tcp_closed(conn)
    await trio.sleep(1)
    assert conn not in server.sup.by_conn, "dead connection still routed to the actor"
    await dev.disconnect()


async def test_an_update_on_a_new_connection_makes_the_observations_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery)
    await server.sup.subscribe("dev", "/3/0/1", owner="o")
    await trio.sleep(1)
    actor = server.sup.by_endpoint["dev"]
    assert actor.observed_paths() == {"/3/0/1"}
    old_stream = dev.stream
    old_scope = dev._scope
    dev.stream = None
    dev._scope = None
    await dev.connect(nursery)  # second connection; the first stays open
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(1)
    assert old_scope is not None and old_stream is not None
    old_scope.cancel()
    await old_stream.aclose()
    await trio.sleep(5)
    observes = [e for e in dev.executed if e.path == "/3/0/1"]
    assert len(observes) == 2, (
        "the observation died with the old connection and is never made again"
    )
    await dev.disconnect()


async def test_a_device_away_for_hours_is_observed_again_when_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery)
    await server.sup.subscribe("dev", "/3/0/1", owner="o")
    await trio.sleep(1)
    await dev.disconnect()
    await trio.sleep(7300)
    await dev.connect(nursery)
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(5)
    observes = [e for e in dev.executed if e.path == "/3/0/1"]
    assert len(observes) == 2, "subscription kept but never observed again"
    await dev.disconnect()


async def test_an_attempt_not_yet_sent_when_the_device_moves_to_udp_keeps_its_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server, tcp = await online_tcp(nursery, store=store)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a", retry=0))
    await trio.sleep(0.1)  # decided, waiting for its write
    udp = Device(server.addr, "dev")
    await udp.start(nursery)
    store.open = True  # the UDP Register's answer commits everything (after its binding)
    assert (await udp.register()).code == Code.CREATED  # the same device, now over UDP
    await trio.sleep(5)
    assert responses(server)["a"]["status"] == 200  # sent over UDP with its one attempt
    assert [e.path for e in udp.executed] == ["/3/0/1"] and tcp.executed == []
    await tcp.disconnect()


def _register_options(ep: str) -> tuple[Option, ...]:
    return tuple(sorted(path_options("/rd") + query_options(f"ep={ep}&lt=86400&b=T"),
                        key=lambda o: o[0]))  # fmt: skip


async def test_an_attempt_decided_for_tcp_and_sent_over_udp_has_a_stored_message_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server, tcp = await online_tcp(nursery, store=store)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a", retry=0))
    await trio.sleep(0.1)
    udp = Device(server.addr, "dev")
    await udp.start(nursery)
    store.open = True
    assert (await udp.register()).code == Code.CREATED
    await trio.sleep(5)
    assert responses(server)["a"]["status"] == 200
    actor = server.sup.by_endpoint["dev"]
    cmd = actor.queue.find("a")
    assert cmd is not None
    assert cmd.mid == udp.executed[0].mid  # the MID sent is the one stored ...
    assert store.next_mids["dev"] == (cmd.mid + MID_BLOCK) & 0xFFFF  # ... and reserved
    await tcp.disconnect()


async def test_a_udp_device_updating_over_tcp_is_observed_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    udp = Device(server.addr, "dev")
    await udp.start(nursery)
    await udp.register()
    await server.sup.subscribe("dev", "/3/0/1", owner="o")
    await trio.sleep(5)
    actor = server.sup.by_endpoint["dev"]
    assert actor.observed_paths() == {"/3/0/1"}
    tcp = TcpDevice(server.tcp_addr, "dev")
    await tcp.connect(nursery)
    tcp.location = udp.location
    assert (await tcp.update()).code == Code.CHANGED
    await trio.sleep(5)
    observes = [e for e in tcp.executed if e.path == "/3/0/1"]
    assert observes, "UDP observation is dead (new endpoint) but never made again over TCP"
    await tcp.disconnect()


async def test_a_close_between_the_commit_and_the_send_keeps_the_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server, dev = await online_tcp(nursery, store=store)
    await trio.sleep(1)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a", retry=0))
    await trio.sleep(0.1)
    actor = server.sup.by_endpoint["dev"]
    store.commit()  # durable, but no task has run yet
    conn = actor.conn
    assert conn is not None
    assert isinstance(conn, TcpConnection)
    conn.close()
    server.sup.on_tcp_closed(conn)  # the close is handled first
    store.open = True
    store.commit()
    await trio.sleep(1)
    r = responses(server)
    assert all(e.path != "/3/0/1" for e in dev.executed)
    assert "a" not in r, f"never sent, yet its only attempt was used: {r.get('a')}"
    await dev.disconnect()


async def test_an_answer_read_before_a_new_connection_binds_counts(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery, answer=False)
    await server.sup.submit("dev", "POST", "/3/0/4", async_id="a", retry=0)
    await trio.sleep(0.5)
    actor = server.sup.by_endpoint["dev"]
    conn1 = actor.conn
    cmd = actor.queue.in_flight
    assert cmd is not None and cmd.token is not None and conn1 is not None
    # the answer arrives on the old connection, then a Register on a new one, before the
    # actor's task runs
    server.sup.on_tcp_message(conn1, Message(0, Code.CHANGED, 0, cmd.token, (), b""))
    server.sup.on_tcp_message(
        _Conn(), Message(0, Code.POST, 0, b"\x07", _register_options("dev"), OBJECTS)
    )
    await trio.sleep(1)
    r = responses(server)
    assert r["a"]["status"] == 200, f"the device's answer was read, yet: {r.get('a')}"
    await dev.disconnect()
