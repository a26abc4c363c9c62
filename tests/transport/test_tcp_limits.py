"""CoAP over TCP under idle and hostile peers: the connection cap, the handshake timeout,
failing accepts, peers that reset at once, the CSM's Max-Message-Size floor, and bursts
beyond what a device's actor holds (back-pressure: nothing is dropped).

Real sockets on 127.0.0.1 against `app.serve` (or a bare `TcpListener`), in virtual time
(`autojump_clock`): the server's timers run without the test waiting for them.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from functools import partial
from typing import TYPE_CHECKING, Self

import pytest
import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.mailbox import Mailbox, Overloaded
from dm_actor.coap import framing_tcp
from dm_actor.coap.framing_tcp import StreamDecoder
from dm_actor.coap.message import Message, path_options
from dm_actor.coap.numbers import Code, SignallingOption
from dm_actor.config import load_settings, parse_settings
from dm_actor.transport.tcp import (
    ACCEPT_PAUSE,
    DEFAULT_CAP_LIMIT,
    FIXED_RESERVE,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    LOG_INTERVAL,
    REFUSAL_HOLD_OFF,
    TcpConnection,
    TcpListener,
    _keepalive,
    default_max_connections,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from dm_actor.address import Address

WAIT = 60.0  # virtual seconds: a hang guard only
_STREAMS: list[trio.SocketStream] = []


@pytest.fixture(autouse=True)
async def _close_streams() -> AsyncIterator[None]:
    yield
    while _STREAMS:
        await _STREAMS.pop().aclose()


class Peer:
    """A raw client: frames out, messages in, None at EOF or reset."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = StreamDecoder(1 << 20)

    @classmethod
    async def connect(cls, addr: Address) -> Peer:
        stream = await trio.open_tcp_stream(*addr[:2])
        _STREAMS.append(stream)
        return cls(stream)

    async def send(self, *msgs: Message) -> None:
        await self.stream.send_all(b"".join(framing_tcp.encode(m) for m in msgs))

    async def receive(self) -> Message | None:
        with trio.fail_after(WAIT):
            while (msg := self.decoder.next_message()) is None:
                try:
                    data = await self.stream.receive_some()
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                self.decoder.receive_data(data)
        return msg

    async def register(self, ep: str) -> Message | None:
        """Our CSM and a Register; the answer (the server's CSM is read first)."""
        server_csm = await self.receive()
        assert server_csm is not None
        assert server_csm.code == Code.CSM
        options = (*path_options("/rd"), (15, b"ep=" + ep.encode()), (15, b"b=T"))
        await self.send(framing_tcp.csm(), Message(0, Code.POST, 0, b"r", options, b"</3/0>"))
        return await self.receive()


async def start(nursery: trio.Nursery, toml: str = "") -> app.Listening:
    settings = parse_settings(
        '[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n' + toml
    )
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    return listening


def stats(listening: app.Listening) -> tuple[int, int, int, int]:
    assert listening.tcp is not None
    s = listening.tcp.statistics()
    return (s.open, s.refused, s.shed, s.handshake_timeouts)


# -- the handshake timeout --------------------------------------------------------------------


async def test_a_connection_that_never_sends_its_csm_gets_abort_after_10_s(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery)
    peer = await Peer.connect(server.coap_tcp)
    start_time = trio.current_time()
    assert (await peer.receive()).code == Code.CSM  # type: ignore[union-attr]
    reply = await peer.receive()
    assert reply is not None
    assert (reply.code, reply.payload) == (Code.ABORT, b"no CSM within 10 s")
    assert trio.current_time() - start_time == pytest.approx(10, abs=0.01)
    assert await peer.receive() is None  # closed
    await trio.testing.wait_all_tasks_blocked()
    assert stats(server) == (0, 0, 0, 1)


async def test_one_byte_then_silence_gets_abort_too(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, "[tcp]\nhandshake_timeout = 3.0\n")
    peer = await Peer.connect(server.coap_tcp)
    await peer.stream.send_all(framing_tcp.encode(framing_tcp.csm())[:1])
    await peer.receive()
    reply = await peer.receive()
    assert reply is not None
    assert (reply.code, reply.payload) == (Code.ABORT, b"no CSM within 3 s")
    assert await peer.receive() is None


async def test_a_csm_without_a_registration_gets_abort_and_a_device_in_time_stays(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery)
    silent = await Peer.connect(server.coap_tcp)
    await silent.receive()
    await silent.send(framing_tcp.csm(), framing_tcp.ping(token=b"p"))  # a Ping is no request
    assert await silent.receive() == framing_tcp.pong(b"p")
    device = await Peer.connect(server.coap_tcp)
    await trio.sleep(9)
    reply = await device.register("late-but-in-time")
    assert reply is not None
    assert reply.code == Code.CREATED
    reply = await silent.receive()
    assert reply is not None
    assert (reply.code, reply.payload) == (Code.ABORT, b"no registration within 10 s")
    assert await silent.receive() is None
    await trio.sleep(3600)  # once registered, a connection may idle (queue mode, Pings)
    await device.send(framing_tcp.ping(token=b"q"))
    assert await device.receive() == framing_tcp.pong(b"q")
    assert stats(server) == (1, 0, 0, 1)


# -- the cap ---------------------------------------------------------------------------------


async def test_at_the_cap_the_oldest_connection_without_a_request_is_shed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, "[tcp]\nmax_connections = 3\n")
    device = await Peer.connect(server.coap_tcp)
    assert (await device.register("dev")).code == Code.CREATED  # type: ignore[union-attr]
    idle = [await Peer.connect(server.coap_tcp) for _ in range(2)]
    for p in idle:
        assert (await p.receive()).code == Code.CSM  # type: ignore[union-attr]
    newcomer = await Peer.connect(server.coap_tcp)
    reply = await idle[0].receive()  # the oldest idle one makes room, the device stays
    assert reply is not None
    assert (reply.code, reply.payload) == (Code.ABORT, b"server busy")
    assert await idle[0].receive() is None
    assert (await newcomer.register("new")).code == Code.CREATED  # type: ignore[union-attr]
    await device.send(framing_tcp.ping(token=b"d"))
    assert await device.receive() == framing_tcp.pong(b"d")
    await trio.testing.wait_all_tasks_blocked()
    assert stats(server) == (3, 0, 1, 0)


async def test_connections_whose_requests_were_refused_stay_in_their_handshake(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Finding F2 (/work/notes/attack-device.md): any request used to end the handshake, so
    `max_connections` sockets that each sent a GET of a path that does not exist (4.04) were
    never shed nor timed out, and every later device was refused for ever. Only a connection
    bound to a registered device leaves its handshake now."""
    server = await start(nursery, "[tcp]\nmax_connections = 4\n")
    device = await Peer.connect(server.coap_tcp)
    assert (await device.register("dev")).code == Code.CREATED  # type: ignore[union-attr]
    junk = [await Peer.connect(server.coap_tcp) for _ in range(3)]
    for i, p in enumerate(junk):
        assert (await p.receive()).code == Code.CSM  # type: ignore[union-attr]
        if i == 2:  # a bare response: nothing to answer
            await p.send(framing_tcp.csm(), Message(0, Code.CONTENT, 0, b"c"))
            continue
        get = Message(0, Code.GET, 0, b"g", path_options("/nothing"))
        bad = Message(0, Code.POST, 0, b"b", path_options("/rd"))  # a Register without ep
        await p.send(framing_tcp.csm(), get, bad)
        assert await p.receive() == Message(0, Code.NOT_FOUND, 0, b"g")
        assert (await p.receive()).code == Code.BAD_REQUEST  # type: ignore[union-attr]
    newcomer = await Peer.connect(server.coap_tcp)  # the oldest refused one makes room
    reply = await junk[0].receive()
    assert reply is not None
    assert (reply.code, reply.payload) == (Code.ABORT, b"server busy")
    assert (await newcomer.register("new")).code == Code.CREATED  # type: ignore[union-attr]
    for p in junk[1:]:  # the others time out
        reply = await p.receive()
        assert reply is not None
        assert (reply.code, reply.payload) == (Code.ABORT, b"no registration within 10 s")
        assert await p.receive() is None
    await trio.sleep(3600)  # the registered devices' connections are never closed
    for d in (device, newcomer):
        await d.send(framing_tcp.ping(token=b"d"))
        assert await d.receive() == framing_tcp.pong(b"d")
    assert stats(server) == (2, 0, 1, 2)


async def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, "[tcp]\nmax_connections = 2\n")
    devices = [await Peer.connect(server.coap_tcp) for _ in range(2)]
    for i, d in enumerate(devices):
        assert (await d.register(f"dev{i}")).code == Code.CREATED  # type: ignore[union-attr]
    for _ in range(5):
        refused = await Peer.connect(server.coap_tcp)
        assert (await refused.receive()).code == Code.CSM  # type: ignore[union-attr]
        release = await refused.receive()
        assert release is not None
        assert release.code == Code.RELEASE
        assert release.uint_option(SignallingOption.HOLD_OFF) == REFUSAL_HOLD_OFF
        assert await refused.receive() is None
        await refused.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert stats(server) == (2, 5, 0, 0)
    # one device leaves: the next connection is served
    await devices[0].stream.aclose()
    await trio.sleep(1)
    again = await Peer.connect(server.coap_tcp)
    assert (await again.register("dev0")).code == Code.CREATED  # type: ignore[union-attr]


async def test_idle_connections_beyond_the_cap_never_hold_more_than_the_cap(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, "[tcp]\nmax_connections = 20\n")
    for _ in range(100):
        _STREAMS.append(await trio.open_tcp_stream(*server.coap_tcp[:2]))
        await trio.testing.wait_all_tasks_blocked()
        assert server.tcp is not None
        assert server.tcp.statistics().open <= 20
    assert server.tcp is not None
    s = server.tcp.statistics()
    assert (s.accepted, s.open, s.shed, s.refused) == (100, 20, 80, 0)
    await trio.sleep(11)  # the survivors time out too
    assert stats(server) == (0, 0, 80, 20)


async def test_connections_reset_at_once_are_harmless(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, "[tcp]\nmax_connections = 8\n")
    for _ in range(200):  # connect, RST (SO_LINGER 0) before the server looks at it
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.connect(server.coap_tcp[:2])
            sock.send(framing_tcp.encode(framing_tcp.csm())[:2])
    await trio.sleep(1)
    assert server.tcp is not None
    s = server.tcp.statistics()
    assert (s.open, s.errors) == (0, 0)
    device = await Peer.connect(server.coap_tcp)
    assert (await device.register("dev")).code == Code.CREATED  # type: ignore[union-attr]


async def test_the_default_cap_keeps_a_reserve_for_http_and_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert default_max_connections(4096, 1024) == 4096 - FIXED_RESERVE - 1024
    assert default_max_connections(1024, 1024) == (1024 - FIXED_RESERVE) // 2
    assert default_max_connections(1 << 20, 1024) == DEFAULT_CAP_LIMIT
    assert default_max_connections(10, 1024) == 1
    settings = load_settings(None)
    assert app.tcp_max_connections(settings, 4096) == 4096 - FIXED_RESERVE - 1024
    explicit = parse_settings("[tcp]\nmax_connections = 7\n")
    assert app.tcp_max_connections(explicit, 4096) == 7
    assert not caplog.records
    too_many = parse_settings("[tcp]\nmax_connections = 5000\n")
    assert app.tcp_max_connections(too_many, 1024) == 5000
    [warning] = caplog.records
    assert "descriptor limit 1024 leaves for CoAP/TCP (480)" in warning.getMessage()


async def test_accepted_connections_use_tcp_keepalive(nursery: trio.Nursery) -> None:
    with trio.socket.socket() as server_side:
        await server_side.bind(("127.0.0.1", 0))
        server_side.listen()
        async with await trio.open_tcp_stream(*server_side.getsockname()[:2]):
            accepted, _ = await server_side.accept()
            with accepted:
                _keepalive(accepted)
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                if sys.platform == "linux":
                    assert (
                        accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                        == KEEPALIVE_IDLE
                    )
                    assert (
                        accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                        == KEEPALIVE_COUNT
                    )


# -- failing accepts -----------------------------------------------------------------------


class FailingListener:
    """Stands in for a `trio.SocketListener` whose accept fails `failures` times (EMFILE)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []
        self.done = trio.Event()

    async def accept(self) -> trio.SocketStream:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        self.done.set()
        await trio.sleep_forever()
        raise AssertionError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *args: object) -> None:
        pass


async def test_failing_accepts_pause_and_are_logged_once_per_interval_without_traceback(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = TcpListener("127.0.0.1", 0, lambda c, m: None, lambda c: None)
    fake = FailingListener(failures=250)  # 25 s of EMFILE
    caplog.set_level(logging.DEBUG, logger="dm_actor")
    nursery.start_soon(listener._accept_loop, fake, nursery)  # type: ignore[arg-type]
    with trio.fail_after(WAIT):
        await fake.done.wait()
    gaps = [b - a for a, b in zip(fake.calls, fake.calls[1:], strict=False)]
    assert min(gaps) == pytest.approx(ACCEPT_PAUSE)  # never spins
    assert listener.statistics().accept_errors == 250
    lines = [r for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(lines) == 3  # at 0, 10 and 20 s
    assert all(r.exc_info is None for r in lines)
    assert "EMFILE" in lines[0].getMessage()
    assert f"more like it in the last {LOG_INTERVAL:g} s" in lines[1].getMessage()


# -- CSM Max-Message-Size on the wire ----------------------------------------------------------


@pytest.mark.parametrize(
    ("csm_bytes", "diagnostic"),
    [
        (b"\x10\xe1\x20", b"Max-Message-Size 0 is below 128 bytes"),  # 0 as an empty uint
        (b"\x20\xe1\x21\x7f", b"Max-Message-Size 127 is below 128 bytes"),
    ],
)
async def test_an_absurd_max_message_size_gets_abort_with_bad_csm_option(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    csm_bytes: bytes,
    diagnostic: bytes,
) -> None:
    server = await start(nursery)
    peer = await Peer.connect(server.coap_tcp)
    await peer.receive()
    await peer.stream.send_all(csm_bytes)
    data = b""
    with trio.fail_after(WAIT):
        while chunk := await peer.stream.receive_some():
            data += chunk
    # Abort, Bad-CSM-Option 2 (Max-Message-Size), then the diagnostic; then the close
    n = 3 + len(diagnostic)
    assert data == bytes((0xD0, n - 13, 0xE5, 0x21, 0x02, 0xFF)) + diagnostic


@pytest.mark.parametrize(
    ("csm_bytes", "size"),
    [
        (b"\x20\xe1\x21\x80", 128),
        (b"\x50\xe1\x24\xff\xff\xff\xff", 0xFFFFFFFF),
        (b"\x30\xe1\x22\x04\x80", 1152),
    ],
)
async def test_a_max_message_size_from_the_floor_up_is_kept_on_the_connection(
    autojump_clock: trio.testing.MockClock, csm_bytes: bytes, size: int
) -> None:
    seen: list[int] = []
    came = trio.Event()

    def on_message(conn: TcpConnection, msg: Message) -> None:
        seen.append(conn.max_message_size)
        came.set()

    listener = TcpListener("127.0.0.1", 0, on_message, lambda c: None)
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(listener.run)
        peer = await Peer.connect(addr)
        await peer.receive()
        await peer.stream.send_all(csm_bytes + framing_tcp.encode(Message(0, Code.GET, 0, b"g")))
        with trio.fail_after(WAIT):
            await came.wait()
        assert seen == [size]
        nursery.cancel_scope.cancel()


# -- back-pressure: nothing read is dropped ----------------------------------------------------


async def test_a_burst_beyond_the_actors_mailbox_is_answered_whole(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Finding F3 (/work/notes/attack-device.md): a burst of messages written at once used to
    go to the device's actor without waiting, and past its 64-entry mailbox they were dropped;
    over TCP nothing is retransmitted, so 136 of 200 Updates were never answered. The reader
    now waits for room instead."""
    server = await start(nursery)
    device = await Peer.connect(server.coap_tcp)
    created = await device.register("burst")
    assert created is not None
    assert created.code == Code.CREATED
    location = path_options("/" + "/".join(created.location_path))
    n = 500
    await device.send(*(Message(0, Code.POST, 0, i.to_bytes(2, "big"), location) for i in range(n)))
    answers = [await device.receive() for _ in range(n)]
    assert [(a.code, a.token) for a in answers if a is not None] == [
        (Code.CHANGED, i.to_bytes(2, "big")) for i in range(n)
    ]
    assert server.supervisor.statistics["mailbox_overloaded"] == 0
    assert server.tcp is not None
    assert server.tcp.statistics().receiver_waits > 0


async def test_a_receiver_without_room_stalls_its_connection_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While a connection's receiver has no room, nothing more is read from it (what it
    holds stays bounded) and nothing is lost; other connections are served; the connection
    can still be closed, and the server stopped."""
    room = {b"a": trio.Event(), b"b": trio.Event()}  # per connection: its receiver has room
    offered: list[bytes] = []
    conns: dict[bytes, TcpConnection] = {}
    closed: list[TcpConnection] = []

    def on_message(conn: TcpConnection, msg: Message) -> Callable[[], Awaitable[object]] | None:
        offered.append(msg.token)
        key = msg.token[:1]
        conns[key] = conn
        if key in room and not room[key].is_set():
            return room[key].wait
        conn.send_nowait(Message(0, Code.CONTENT, 0, msg.token))
        return None

    listener = TcpListener(
        "127.0.0.1", 0, on_message, closed.append, is_bound=lambda c: True, send_queue_size=256
    )
    burst = [Message(0, Code.GET, 0, b"%d" % i, path_options("/3/0/0")) for i in range(100)]
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(listener.run)
        stalled = [await Peer.connect(addr) for _ in range(2)]
        for key, peer in zip((b"a", b"b"), stalled, strict=True):
            assert (await peer.receive()).code == Code.CSM  # type: ignore[union-attr]
            await peer.send(framing_tcp.csm(), Message(0, Code.GET, 0, key), *burst)
        other = await Peer.connect(addr)
        await other.receive()
        await other.send(framing_tcp.csm(), Message(0, Code.GET, 0, b"o"))
        assert await other.receive() == Message(0, Code.CONTENT, 0, b"o")
        await trio.sleep(30)
        assert sorted(offered) == [b"a", b"b", b"o"]  # nothing behind them was handed on
        assert listener.statistics().receiver_waits == 2
        room[b"a"].set()  # room: the message is offered again, then the rest in order
        expected = [b"a", *(m.token for m in burst)]
        for token in expected:
            assert await stalled[0].receive() == Message(0, Code.CONTENT, 0, token)
        assert offered == [b"a", b"b", b"o", *expected]
        conns[b"b"].close()  # a connection still waiting can be closed
        assert await stalled[1].receive() is None
        await trio.testing.wait_all_tasks_blocked()
        assert closed == [conns[b"b"]]
        # a connection waiting for ever does not hold up the server's shutdown
        room[b"b"] = trio.Event()
        await stalled[0].send(Message(0, Code.GET, 0, b"b-again"))
        await trio.testing.wait_all_tasks_blocked()
        assert listener.statistics().receiver_waits == 3
        nursery.cancel_scope.cancel()
    assert listener.statistics().open == 0


async def test_a_burst_past_a_de_register_is_answered_by_the_next_owner(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The reader waits for room while the device de-registers: what it offers after that
    is a stranger's (4.04), and the connection goes on."""
    server = await start(nursery)
    device = await Peer.connect(server.coap_tcp)
    created = await device.register("leaving")
    assert created is not None
    location = path_options("/" + "/".join(created.location_path))
    before = [Message(0, Code.POST, 0, b"u%d" % i, location) for i in range(100)]
    after = [Message(0, Code.POST, 0, b"v%d" % i, location) for i in range(100)]
    await device.send(*before, Message(0, Code.DELETE, 0, b"d", location), *after)
    answers: dict[bytes, int] = {}
    while len(answers) < 201 and (answer := await device.receive()) is not None:
        answers[answer.token] = answer.code
    assert answers == {
        **{m.token: Code.CHANGED for m in before},
        b"d": Code.DELETED,
        **{m.token: Code.NOT_FOUND for m in after},
    }
    assert server.tcp is not None
    assert server.tcp.statistics().receiver_waits > 0
    assert server.supervisor.statistics["frames_dropped"] == 0


async def test_requests_answered_by_the_reader_wait_for_room_in_the_send_queue(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """5,000 requests in one write, each answered at once by the reader's task (4.04): it
    stops reading while its send queue is full instead of dropping answers (more than the
    queue's hard limit were dropped before)."""
    server = await start(nursery)
    peer = await Peer.connect(server.coap_tcp)
    await peer.receive()
    n = 5000
    gets = (Message(0, Code.GET, 0, i.to_bytes(2, "big"), path_options("/x")) for i in range(n))
    await peer.send(framing_tcp.csm(), *gets)
    answers = [await peer.receive() for _ in range(n)]
    assert [(a.code, a.token) for a in answers if a is not None] == [
        (Code.NOT_FOUND, i.to_bytes(2, "big")) for i in range(n)
    ]
    assert server.supervisor.statistics["frames_dropped"] == 0


async def test_a_closing_mailbox_wakes_the_producers_waiting_for_room() -> None:
    mailbox: Mailbox[int] = Mailbox(2)
    mailbox.put(1)
    mailbox.put(2)
    with pytest.raises(Overloaded):
        mailbox.put(3)
    woken: list[int] = []

    async def producer(i: int) -> None:
        await mailbox.wait_room()
        woken.append(i)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(producer, i)
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []
        assert mailbox.take() == [1, 2]  # room: every waiting producer tries again
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(woken) == [0, 1, 2]
        mailbox.put(4)
        mailbox.put(5)
        nursery.start_soon(producer, 3)
        await trio.testing.wait_all_tasks_blocked()
        mailbox.close()
    assert sorted(woken) == [0, 1, 2, 3]
    await mailbox.wait_room()  # closed: at once
