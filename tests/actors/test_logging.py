"""What the log shows (issue 13, item 7): each CoAP message in and out at debug, each refusal
once at info, and never a line per datagram of a flood.

A real server on loopback; raw sockets play the peers; virtual time.
"""

from __future__ import annotations

import logging
import re
import socket
from typing import TYPE_CHECKING, Self

import trio
import trio.testing

from dm_actor.actors.refusals import LINES as REFUSAL_LINES
from dm_actor.coap import trace
from dm_actor.coap.message import Message, decode, encode, path_options, query_options, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

from .support import OBJECTS, online, online_tcp, start_server

if TYPE_CHECKING:
    import pytest

    from dm_actor.address import Address

CON, ACK = MessageType.CON, MessageType.ACK


def register(mid: int, query: str = "ep=dev&lt=300&b=U", token: bytes = b"\x01") -> bytes:
    options = tuple(
        sorted(
            (*path_options("/rd"), *query_options(query),
             (OptionNumber.CONTENT_FORMAT, uint_bytes(40))),
            key=lambda o: o[0],
        )
    )  # fmt: skip
    return encode(Message(CON, Code.POST, mid, token, options, OBJECTS))


class Peer:
    """A raw UDP socket that sends what it is told and collects what comes back."""

    def __init__(self, server: Address) -> None:
        self.server = server
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr: Address = ("", 0)

    async def __aenter__(self) -> Self:
        await self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> None:
        await self.sock.sendto(data, self.server)

    async def collect(self, seconds: float = 1.0) -> list[Message]:
        got: list[Message] = []
        with trio.move_on_after(seconds):
            while True:
                data, _ = await self.sock.recvfrom(65536)
                got.append(decode(data))
        return got


def lines(caplog: pytest.LogCaptureFixture, start: str, logger: str = "dm_actor") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(logger) and r.getMessage().startswith(start)
    ]


# -- debug: every message in and out ---------------------------------------------------------


async def test_debug_shows_each_udp_message_in_and_out(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dm_actor")
    _server, dev = await online(nursery, "dev-1")
    assert (await dev.update("lt=600")).code == Code.CHANGED
    got = lines(caplog, "CoAP ", "dm_actor.transport.udp")
    peer = trace.peer_str(dev.sock.getsockname())  # type: ignore[union-attr]
    pattern = (
        rf"CoAP in udp {re.escape(peer)} CON 0\.02 mid=(\d+) token=([0-9a-f]+)"
        r" /rd\?ep=dev-1&lt=\d+&lwm2m=1\.1&b=U len=\d+"
    )
    register = [m for line in got if (m := re.fullmatch(pattern, line))]
    assert len(register) == 1, got
    mid, token = register[0].groups()
    assert f"CoAP out udp {peer} ACK 2.01 mid={mid} token={token} len=0" in got
    assert any(re.fullmatch(rf"CoAP in udp {re.escape(peer)} CON 0\.02 .* /rd/\w+\?lt=600 len=0", x)
               for x in got)  # fmt: skip
    assert any(re.fullmatch(rf"CoAP out udp {re.escape(peer)} ACK 2\.04 .* len=0", x) for x in got)


async def test_debug_shows_each_tcp_message_in_and_out(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dm_actor")
    _, dev = await online_tcp(nursery, "dev-t")
    await dev.disconnect()
    await trio.sleep(1)
    got = lines(caplog, "CoAP ", "dm_actor.transport.tcp")
    assert sum(1 for x in got if re.fullmatch(r"CoAP in tcp \S+ 7\.01 len=0", x)) == 1, got
    assert sum(1 for x in got if re.fullmatch(r"CoAP out tcp \S+ 7\.01 len=0", x)) == 1, got
    assert any(re.fullmatch(r"CoAP in tcp \S+ 0\.02 token=\w+ /rd\?ep=dev-t&.* len=\d+", x)
               for x in got), got  # fmt: skip
    assert any(re.fullmatch(r"CoAP out tcp \S+ 2\.01 token=\w+ len=0", x) for x in got), got


async def test_with_debug_off_no_message_is_formatted(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never(*args: object) -> str:
        raise AssertionError("a message was formatted with debug off")

    monkeypatch.setattr(trace, "describe", never)
    monkeypatch.setattr(trace, "undecodable", never)
    caplog.set_level(logging.INFO, logger="dm_actor")
    server, dev = await online(nursery, "dev-1")
    assert (await dev.update()).code == Code.CHANGED
    _, tcp_dev = await online_tcp(nursery, "dev-t")
    await tcp_dev.disconnect()
    async with Peer(server.addr) as peer:
        await peer.send(b"\x40\x01\x00")  # undecodable
        await peer.collect(0.5)
    assert not lines(caplog, "CoAP ")
    assert server.sup.statistics["peer_errors"] == 0


# -- info: each refusal once ------------------------------------------------------------------


async def test_a_refused_register_is_logged_once_with_its_reason(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dm_actor")
    server = await start_server(nursery)
    async with Peer(server.addr) as peer:
        for _ in range(4):  # the Register and three retransmissions
            await peer.send(register(0x1234, "ep=dev&lt=300&lwm2m=9.9&b=U"))
            await trio.sleep(2)
        got = await peer.collect()
    assert [(m.mtype, m.code, m.mid) for m in got] == [(ACK, Code.PRECONDITION_FAILED, 0x1234)] * 4
    refused = lines(caplog, "refused")
    assert refused == [
        f"refused Register from udp {trace.peer_str(peer.addr)}: 4.12,"
        " unsupported lwm2m version '9.9'"
    ]
    assert caplog.records[-1].levelno == logging.INFO


async def test_a_request_of_an_unknown_peer_gets_4_04_logged_once(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dm_actor")
    server = await start_server(nursery)
    get = encode(Message(CON, Code.GET, 7, b"\x09", path_options("3/0")))
    update = encode(Message(CON, Code.POST, 8, b"\x0a", path_options("rd/nosuchid")))
    async with Peer(server.addr) as peer:
        for _ in range(3):
            await peer.send(get)
            await peer.send(update)
            await trio.sleep(2)
        got = await peer.collect()
    assert (
        sorted((m.mid, m.code) for m in got)
        == [(7, Code.NOT_FOUND)] * 3 + [(8, Code.NOT_FOUND)] * 3
    )
    me = trace.peer_str(peer.addr)
    assert lines(caplog, "refused") == [
        f"refused GET /3/0 from udp {me}: 4.04, the peer is not registered",
        f"refused POST /rd/nosuchid from udp {me}: 4.04, no such registration",
    ]


async def test_a_malformed_datagram_is_logged_once(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dm_actor")
    server = await start_server(nursery)
    async with Peer(server.addr) as peer:
        for _ in range(3):
            await peer.send(bytes((0x40, 0x01, 0x00, 0x05, 0xFF)))  # a marker, no payload
            await trio.sleep(2)
        await peer.send(b"\x40" * 5000)
        got = await peer.collect()
    assert [(m.mtype, m.mid) for m in got] == [(MessageType.RST, 5)] * 3
    me = trace.peer_str(peer.addr)
    assert lines(caplog, "refused") == [
        f"refused a malformed datagram from udp {me}: Reset, payload marker followed by no payload",
        f"refused a datagram from udp {me}: dropped, 5000 bytes, over 4096",
    ]


async def test_a_registered_devices_refused_update_is_logged(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dm_actor")
    _server, dev = await online(nursery, "dev-1")
    assert (await dev.update("lt=0")).code == Code.BAD_REQUEST
    assert (await dev.request(Code.GET, "/nothing")).code == Code.NOT_FOUND
    me = trace.peer_str(dev.sock.getsockname())  # type: ignore[union-attr]
    assert lines(caplog, "refused") == [
        f"refused Update from udp {me}: 4.00, lifetime lt='0' is not 1..2^32-1",
        f"refused GET /nothing from udp {me}: 4.04, no such resource on the server",
    ]


async def test_a_flood_of_bad_registers_logs_at_most_the_bound(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """10,000 refused Registers (4.12, or 5.03 when admission is full) within a minute: at
    most `REFUSAL_LINES` lines; the first refusal logged after the minute says how many
    were left out. (The supervisor's once-a-minute counter line is separate.)"""
    caplog.set_level(logging.INFO, logger="dm_actor")
    server = await start_server(nursery)
    async with Peer(server.addr) as peer:
        for mid in range(10_000):
            await peer.send(register(mid, f"ep=d{mid}&lt=300&lwm2m=9.9&b=U"))
            if mid % 500 == 499:
                await trio.sleep(0.05)
        await peer.collect(5)
        flood = lines(caplog, "refused")
        assert 1 <= len(flood) <= REFUSAL_LINES
        await trio.sleep(60)
        await peer.send(register(20_000, "ep=late&lt=300&lwm2m=9.9&b=U"))
        await peer.collect(1)
    after = lines(caplog, "refused")[len(flood) :]
    assert len(after) == 1
    left_out = re.search(r"\((\d+) more refusals not logged before this one\)", after[0])
    assert left_out is not None
    assert len(flood) + int(left_out.group(1)) == 10_000
