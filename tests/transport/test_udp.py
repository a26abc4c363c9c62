"""UDP on loopback: the batched endpoint itself, and the server answering CoAP over it.

Real sockets on 127.0.0.1 with port 0. `fail_after` bounds every wait so a lost datagram fails
the test instead of hanging it; nothing sleeps.
"""

from __future__ import annotations

import json
import socket
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor import app
from dm_actor.coap.message import Message, decode, encode, path_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.config import load_settings
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dm_actor.address import Address

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
WAIT = 5.0  # seconds: a hang guard only; loopback answers in microseconds


@pytest.fixture
async def client() -> AsyncIterator[trio.socket.SocketType]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        await sock.bind(("127.0.0.1", 0))
        yield sock


def _closed_port() -> Address:
    """A loopback address where nothing listens (bound, noted, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        addr: Address = s.getsockname()
    return addr


async def _exchange(sock: trio.socket.SocketType, data: bytes, to: Address) -> Message:
    await sock.sendto(data, to)
    with trio.fail_after(WAIT):
        reply, _ = await sock.recvfrom(65535)
    return decode(reply)


# -- the endpoint ----------------------------------------------------------------------------


class Echo:
    """Callbacks that echo every datagram and record unreachable reports."""

    def __init__(self) -> None:
        self.endpoint = UdpEndpoint("127.0.0.1", 0, self.on_datagram, self.on_unreachable)
        self.unreachable: list[Address] = []
        self.reported = trio.Event()

    def on_datagram(self, data: bytes, addr: Address) -> None:
        self.endpoint.send(b"echo:" + data, addr)

    def on_unreachable(self, addr: Address) -> None:
        self.unreachable.append(addr)
        self.reported.set()


async def test_echo_and_statistics(nursery: trio.Nursery, client: trio.socket.SocketType) -> None:
    echo = Echo()
    addr = await nursery.start(echo.endpoint.run)
    assert addr[0] == "127.0.0.1"
    assert addr[1] != 0
    for i in range(3):
        await client.sendto(b"%d" % i, addr)
    with trio.fail_after(WAIT):
        got = [(await client.recvfrom(100))[0] for _ in range(3)]
    assert got == [b"echo:0", b"echo:1", b"echo:2"]
    stats = echo.endpoint.statistics()
    assert (stats.received, stats.sent, stats.dropped, stats.unreachable) == (3, 3, 0, 0)


class Counter:
    """Callbacks that count what arrives (nothing is sent back)."""

    def __init__(self, socket_buffer: int) -> None:
        self.endpoint = UdpEndpoint(
            "127.0.0.1", 0, self.on_datagram, lambda addr: None, socket_buffer=socket_buffer
        )
        self.received: list[bytes] = []
        self.arrived = trio.Event()

    def on_datagram(self, data: bytes, addr: Address) -> None:
        self.received.append(data)
        self.arrived.set()


@pytest.mark.skipif(sys.platform != "linux", reason="SO_RXQ_OVFL is Linux's")
async def test_what_the_kernel_drops_from_a_full_receive_buffer_is_counted(
    nursery: trio.Nursery,
) -> None:
    counter = Counter(socket_buffer=4096)  # the kernel makes it a few datagrams' worth
    addr = await nursery.start(counter.endpoint.run)
    flood = 500
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        # blocking sends without a checkpoint: the endpoint cannot read while they go out
        for i in range(flood):
            sender.sendto(b"%d" % i, addr)
        with trio.fail_after(WAIT):
            await counter.arrived.wait()
            await trio.testing.wait_all_tasks_blocked()
        kept = len(counter.received)
        assert 0 < kept < flood
        # every datagram still queued was queued before the drops: the counter comes with
        # the next datagram queued after them
        assert counter.endpoint.statistics().kernel_drops == 0
        counter.arrived = trio.Event()
        sender.sendto(b"after", addr)
        with trio.fail_after(WAIT):
            await counter.arrived.wait()
    assert counter.received[-1] == b"after"
    stats = counter.endpoint.statistics()
    assert stats.kernel_drops == flood - kept
    assert stats.received == kept + 1


async def test_send_needs_a_running_endpoint(nursery: trio.Nursery) -> None:
    echo = Echo()
    with pytest.raises(trio.ClosedResourceError):
        echo.endpoint.send(b"x", ("127.0.0.1", 9))
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[Address]) -> None:
        with scope:
            await echo.endpoint.run(task_status=task_status)

    await nursery.start(run)
    scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.ClosedResourceError):
        echo.endpoint.send(b"x", ("127.0.0.1", 9))


async def test_port_unreachable_is_reported_and_the_loop_keeps_serving(
    nursery: trio.Nursery, client: trio.socket.SocketType
) -> None:
    echo = Echo()
    addr = await nursery.start(echo.endpoint.run)
    dead = _closed_port()
    echo.endpoint.send(b"anyone?", dead)
    with trio.fail_after(WAIT):
        await echo.reported.wait()
    assert echo.unreachable == [dead]
    # the pending error is consumed by the next send or receive; neither may fail
    echo.endpoint.send(b"again?", dead)
    await client.sendto(b"still there?", addr)
    with trio.fail_after(WAIT):
        reply, _ = await client.recvfrom(100)
        while len(echo.unreachable) < 2:
            echo.reported = trio.Event()
            await echo.reported.wait()
    assert reply == b"echo:still there?"
    assert echo.unreachable == [dead, dead]
    stats = echo.endpoint.statistics()
    assert stats.unreachable == 2
    assert stats.received == 1
    assert stats.dropped == 0


async def test_many_unreachable_destinations_are_all_reported(nursery: trio.Nursery) -> None:
    echo = Echo()
    await nursery.start(echo.endpoint.run)
    dead = [_closed_port() for _ in range(5)]
    for d in dead:
        echo.endpoint.send(b"x", d)
    with trio.fail_after(WAIT):
        while len(echo.unreachable) < len(dead):
            echo.reported = trio.Event()
            await echo.reported.wait()
    assert sorted(echo.unreachable) == sorted(dead)


# -- the server over UDP ---------------------------------------------------------------------


@pytest.fixture
async def server(nursery: trio.Nursery) -> Address:
    settings = load_settings(None, host="127.0.0.1", coap_port=0, store="memory")
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    return listening.coap_udp


def _get(mid: int, token: bytes, mtype: int = MessageType.CON) -> bytes:
    return encode(Message(mtype, Code.GET, mid, token, path_options("/3/0/1")))


async def test_confirmable_request_gets_piggybacked_not_found(
    server: Address, client: trio.socket.SocketType
) -> None:
    reply = await _exchange(client, _get(0x1234, b"\x01\x02\x03"), server)
    assert reply == Message(MessageType.ACK, Code.NOT_FOUND, 0x1234, b"\x01\x02\x03")


async def test_non_confirmable_request_gets_a_non_response(
    server: Address, client: trio.socket.SocketType
) -> None:
    replies = [
        await _exchange(client, _get(mid, b"tk%d" % mid, MessageType.NON), server) for mid in (7, 8)
    ]
    for mid, reply in zip((7, 8), replies, strict=True):
        assert (reply.mtype, reply.code, reply.token) == (
            MessageType.NON,
            Code.NOT_FOUND,
            b"tk%d" % mid,
        )
    assert replies[1].mid == (replies[0].mid + 1) & 0xFFFF


def _first_requests() -> list[object]:
    cases: list[object] = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if json.loads(lines[0])["transport"] == "udp":
            cases.append(pytest.param(bytes.fromhex(json.loads(lines[1])["hex"]), id=path.stem))
    return cases


@pytest.mark.parametrize("register", _first_requests())
async def test_real_client_register_is_created(
    server: Address, register: bytes, client: trio.socket.SocketType
) -> None:
    request = decode(register)
    assert request.code == Code.POST  # the captured client's first datagram
    reply = await _exchange(client, register, server)
    # LwM2M 1.0 and 1.1 are accepted; 1.2 gets 4.12 (Anjay then registers as 1.1, below); the
    # first block of a Register in blocks gets 2.31 Continue (the whole one: below)
    expected = Code.PRECONDITION_FAILED if "lwm2m=1.2" in request.uri_query else Code.CREATED
    if request.option(OptionNumber.BLOCK1.value) is not None:
        expected = Code.CONTINUE
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (
        MessageType.ACK,
        expected,
        request.mid,
        request.token,
    )
    if expected == Code.CREATED:
        assert reply.location_path[0] == "rd"
    # a retransmitted Register gets the same answer, not a second registration
    assert await _exchange(client, register, server) == reply


async def test_anjay_1_2_register_gets_4_12_and_its_1_1_retry_2_01(
    server: Address, client: trio.socket.SocketType
) -> None:
    """Issue 13 item 8, with Anjay's datagrams: the 1.2 Register, then the 1.1 one it sent
    after the capture's server answered 4.12."""
    lines = (VECTORS / "anjay-client-udp.jsonl").read_text().splitlines()
    first, _, retry = (bytes.fromhex(json.loads(line)["hex"]) for line in lines[1:4])
    assert "lwm2m=1.2" in decode(first).uri_query and "lwm2m=1.1" in decode(retry).uri_query
    refused = await _exchange(client, first, server)
    assert (refused.code, refused.token) == (Code.PRECONDITION_FAILED, decode(first).token)
    created = await _exchange(client, retry, server)
    assert (created.code, created.token) == (Code.CREATED, decode(retry).token)
    assert created.location_path[0] == "rd"


async def test_malformed_confirmable_gets_reset_and_serving_goes_on(
    server: Address, client: trio.socket.SocketType
) -> None:
    tkl9 = bytes((0x49, Code.GET, 0xAB, 0xCD)) + bytes(9)
    assert await _exchange(client, tkl9, server) == Message(MessageType.RST, 0, 0xABCD)
    reply = await _exchange(client, _get(0x0101, b"ok"), server)
    assert (reply.code, reply.mid, reply.token) == (Code.NOT_FOUND, 0x0101, b"ok")


async def test_unknown_critical_option_gets_bad_option(
    server: Address, client: trio.socket.SocketType
) -> None:
    request = Message(MessageType.CON, Code.GET, 0x2222, b"t", ((2049, b"x"),))
    reply = await _exchange(client, encode(request), server)
    assert reply == Message(MessageType.ACK, Code.BAD_OPTION, 0x2222, b"t")


async def test_coap_ping_gets_reset(server: Address, client: trio.socket.SocketType) -> None:
    ping = encode(Message(MessageType.CON, Code.EMPTY, 0x4444))
    assert await _exchange(client, ping, server) == Message(MessageType.RST, 0, 0x4444)


async def test_ignored_datagrams_get_no_answer(
    server: Address, client: trio.socket.SocketType
) -> None:
    for junk in (
        b"\x40",  # shorter than a header
        b"\x80\x01\x00\x01",  # version 2
        encode(Message(MessageType.ACK, 0, 1)),  # an ACK for nothing
        encode(Message(MessageType.NON, Code.CONTENT, 2, b"x")),  # a stray response
    ):
        await client.sendto(junk, server)
    # the next answer the client sees is for the request sent after the junk
    reply = await _exchange(client, _get(0x0505, b"last"), server)
    assert (reply.mid, reply.token) == (0x0505, b"last")


async def test_a_burst_of_1000_requests_is_all_answered(
    server: Address, client: trio.socket.SocketType
) -> None:
    count = 1000
    answered: set[int] = set()

    async def collect() -> None:
        while len(answered) < count:
            data, _ = await client.recvfrom(65535)
            reply = decode(data)
            assert reply.code == Code.NOT_FOUND
            answered.add(reply.mid)

    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            for mid in range(count):
                await client.sendto(_get(mid, mid.to_bytes(2, "big")), server)
    assert answered == set(range(count))


async def test_a_malformed_path_from_an_unknown_peer_gets_bad_request(
    server: Address, client: trio.socket.SocketType
) -> None:
    bad = Message(MessageType.CON, Code.GET, 2, b"b", ((11, b"\xff"),))
    assert await _exchange(client, encode(bad), server) == Message(
        MessageType.ACK, Code.BAD_REQUEST, 2, b"b"
    )


@pytest.mark.parametrize(
    "stem", ["anjay-client-udp-block1-register", "anjay-client-udp-block1-register-64"]
)
async def test_anjay_register_in_block1_blocks_is_registered_whole(
    server: Address, client: trio.socket.SocketType, stem: str
) -> None:
    """Issue 13 item 3, with Anjay's datagrams (--outbuf-size 256 / 128): each block but the
    last gets 2.31 Continue echoing its Block1; the last gets 2.01 with Block1 echoed, and the
    registration lists every link of the reassembled body; a retransmitted block gets the
    same answer."""
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()[1:]
    sent = [bytes.fromhex(json.loads(line)["hex"]) for line in lines]
    blocks = [
        d
        for d in sent
        if decode(d).code == Code.POST and decode(d).option(OptionNumber.BLOCK1.value) is not None
    ]
    assert len(blocks) >= 2
    replies = [await _exchange(client, block, server) for block in blocks]
    codes = [r.code for r in replies]
    assert codes == [Code.CONTINUE] * (len(blocks) - 1) + [Code.CREATED]
    for block, reply in zip(blocks, replies, strict=True):
        assert reply.option(OptionNumber.BLOCK1.value) == decode(block).option(
            OptionNumber.BLOCK1.value
        )
    assert replies[-1].location_path[0] == "rd"
    assert await _exchange(client, blocks[-1], server) == replies[-1]
    assert await _exchange(client, blocks[0], server) == replies[0]


async def test_anjay_send_in_block1_blocks_is_answered_2_04(
    server: Address, client: trio.socket.SocketType
) -> None:
    """Issue 13 items 3 and 6, with Anjay's datagrams (`--outbuf-size 256`): its Register in
    two blocks, then a 185-byte LwM2M Send (SenML CBOR) in two blocks: 2.31, 2.01, 2.31, 2.04,
    each echoing its Block1."""
    lines = (VECTORS / "anjay-client-udp-block1-send.jsonl").read_text().splitlines()[1:]
    sent = [bytes.fromhex(json.loads(line)["hex"]) for line in lines]
    requests = [d for d in sent if decode(d).code in (Code.POST, Code.DELETE)]
    replies = [await _exchange(client, d, server) for d in requests[:4]]
    assert [r.code for r in replies] == [Code.CONTINUE, Code.CREATED, Code.CONTINUE, Code.CHANGED]
    for request, reply in zip(requests, replies, strict=False):
        assert reply.option(OptionNumber.BLOCK1.value) == decode(request).option(
            OptionNumber.BLOCK1.value
        )
