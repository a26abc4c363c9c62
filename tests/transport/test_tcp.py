"""CoAP over TCP (RFC 8323) on loopback: signalling, requests, framing across writes, errors.

A trio client talks to `app.serve` (or to a bare `TcpListener`) on 127.0.0.1 port 0.
`fail_after` bounds every wait; nothing sleeps.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor import app
from dm_actor.coap import framing_tcp
from dm_actor.coap.framing_tcp import MAX_MESSAGE_SIZE, StreamDecoder
from dm_actor.coap.message import Message, path_options
from dm_actor.coap.numbers import Code, SignallingOption
from dm_actor.config import load_settings
from dm_actor.transport.tcp import SEND_QUEUE_HARD_FACTOR, TcpConnection, TcpListener

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dm_actor.address import Address

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
WAIT = 5.0  # seconds: a hang guard only


class Peer:
    """A test client: writes frames, reads messages, sees EOF as None."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = StreamDecoder(1 << 20)

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

    async def handshake(self) -> Message:
        """Read the server's CSM and send ours; returns the server's."""
        server_csm = await self.receive()
        assert server_csm is not None
        await self.send(framing_tcp.csm(4096))
        return server_csm


@pytest.fixture
async def server(nursery: trio.Nursery) -> Address:
    settings = load_settings(None, host="127.0.0.1", coap_port=0, store="memory")
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    return listening.coap_tcp


@pytest.fixture
async def peer(server: Address) -> AsyncIterator[Peer]:
    stream = await trio.open_tcp_stream(*server[:2])
    async with stream:
        yield Peer(stream)


def _get(token: bytes) -> Message:
    return Message(0, Code.GET, 0, token, path_options("/3/0/1"))


async def test_csm_exchange_ping_and_a_request(peer: Peer) -> None:
    server_csm = await peer.handshake()
    assert server_csm.code == Code.CSM
    assert framing_tcp.parse_csm(server_csm).max_message_size == MAX_MESSAGE_SIZE
    await peer.send(framing_tcp.ping(token=b"p1"))
    assert await peer.receive() == framing_tcp.pong(b"p1")
    await peer.send(framing_tcp.ping(token=b"p2", custody=True))
    assert await peer.receive() == framing_tcp.pong(b"p2", custody=True)
    await peer.send(_get(b"req1"))
    assert await peer.receive() == Message(0, Code.NOT_FOUND, 0, b"req1")


async def test_a_stream_split_into_one_byte_writes(peer: Peer) -> None:
    await peer.receive()
    data = b"".join(
        framing_tcp.encode(m)
        for m in (framing_tcp.csm(), _get(b"a"), framing_tcp.ping(), _get(b"b"))
    )
    for i in range(len(data)):
        await peer.stream.send_all(data[i : i + 1])
    replies = [await peer.receive() for _ in range(3)]
    assert replies == [
        Message(0, Code.NOT_FOUND, 0, b"a"),
        framing_tcp.pong(b""),
        Message(0, Code.NOT_FOUND, 0, b"b"),
    ]


async def test_real_anjay_client_stream_gets_answered(peer: Peer) -> None:
    lines = (VECTORS / "anjay-client-tcp.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[1:]]
    client_port = records[1]["src_port"]  # the client speaks second, after the server's CSM
    client = [bytes.fromhex(r["hex"]) for r in records if r["src_port"] == client_port]
    await peer.receive()
    await peer.stream.send_all(client[0] + client[1])  # its CSM, then POST /rd
    decoder = StreamDecoder()
    for segment in client[:2]:
        decoder.receive_data(segment)
    assert (first := decoder.next_message()) is not None
    assert first.code == Code.CSM
    assert (register := decoder.next_message()) is not None
    assert register.code == Code.POST
    reply = await peer.receive()
    assert reply is not None
    # it registers as LwM2M 1.2 (that capture's server took it): 4.12, so that it falls back
    # to 1.1 as it does over UDP (issue 13 item 8)
    assert "lwm2m=1.2" in register.uri_query
    assert (reply.code, reply.token) == (Code.PRECONDITION_FAILED, register.token)
    await peer.stream.send_all(client[1].replace(b"lwm2m=1.2", b"lwm2m=1.1"))  # its fallback
    reply = await peer.receive()
    assert reply is not None
    assert (reply.code, reply.token) == (Code.CREATED, register.token)
    assert reply.location_path[0] == "rd"


async def test_a_client_that_skips_its_csm_gets_abort(peer: Peer) -> None:
    await peer.receive()
    await peer.send(_get(b"x"))
    reply = await peer.receive()
    assert reply is not None
    assert reply.code == Code.ABORT
    assert await peer.receive() is None  # and the server closed the connection


async def test_an_unknown_critical_csm_option_gets_abort_naming_it(peer: Peer) -> None:
    await peer.receive()
    await peer.send(framing_tcp.csm().with_options((9, b"")))
    reply = await peer.receive()
    assert reply is not None
    assert reply.code == Code.ABORT
    assert reply.option(SignallingOption.BAD_CSM_OPTION) == b"\x09"
    assert await peer.receive() is None


async def test_an_oversized_frame_gets_abort(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(Message(0, Code.POST, 0, b"big", (), bytes(MAX_MESSAGE_SIZE)))
    reply = await peer.receive()
    assert reply is not None
    assert reply.code == Code.ABORT
    assert await peer.receive() is None


async def test_an_unknown_critical_option_in_a_request_gets_bad_option(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(Message(0, Code.GET, 0, b"t", ((2049, b"x"),)))
    assert await peer.receive() == Message(0, Code.BAD_OPTION, 0, b"t")


async def test_release_closes_after_answering(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(_get(b"last"), framing_tcp.release(), _get(b"never"))
    assert await peer.receive() == Message(0, Code.NOT_FOUND, 0, b"last")
    assert await peer.receive() is None


async def test_abort_from_the_client_closes(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(framing_tcp.abort("bye"), _get(b"never"))
    assert await peer.receive() is None


async def test_empty_messages_and_pongs_are_ignored(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(Message(0, 0), framing_tcp.pong(b"x"), _get(b"after"))
    assert await peer.receive() == Message(0, Code.NOT_FOUND, 0, b"after")


# -- TcpListener and TcpConnection directly ----------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.closed: list[TcpConnection] = []
        self.conns: list[TcpConnection] = []
        self.ended = trio.Event()

    def on_message(self, conn: TcpConnection, msg: Message) -> None:
        self.conns.append(conn)
        self.messages.append(msg)

    def on_closed(self, conn: TcpConnection) -> None:
        self.closed.append(conn)
        self.ended.set()


async def test_listener_hands_over_messages_and_reports_the_close(nursery: trio.Nursery) -> None:
    rec = Recorder()
    addr = await nursery.start(TcpListener("127.0.0.1", 0, rec.on_message, rec.on_closed).run)
    async with await trio.open_tcp_stream(*addr[:2]) as stream:
        peer = Peer(stream)
        await peer.handshake()
        reply = Message(0, Code.CONTENT, 0, b"t", (), b"hello")
        await peer.send(_get(b"t"))
        with trio.fail_after(WAIT):
            while not rec.messages:
                await trio.testing.wait_all_tasks_blocked()
        assert rec.messages == [_get(b"t")]
        conn = rec.conns[0]
        assert conn.peer == stream.socket.getsockname()
        assert conn.csm == framing_tcp.Csm(4096, False)
        await conn.send(reply)
        assert await peer.receive() == reply
    with trio.fail_after(WAIT):
        await rec.ended.wait()
    assert rec.closed == [conn]
    assert conn.closed
    with pytest.raises(trio.ClosedResourceError):
        conn.send_nowait(reply)


async def test_the_send_queue_is_bounded() -> None:
    conn = TcpConnection(("127.0.0.1", 1), send_queue_size=2)
    for _ in range(2 * SEND_QUEUE_HARD_FACTOR):  # what was read is answered beyond the size
        conn.send_nowait(_get(b"1"))
    with pytest.raises(trio.WouldBlock):
        conn.send_nowait(_get(b"3"))
    with pytest.raises(ValueError, match="token"):
        TcpConnection(("127.0.0.1", 1), 2).send_nowait(_get(bytes(9)))


async def test_a_blocked_sender_waits_for_room(nursery: trio.Nursery) -> None:
    conn = TcpConnection(("127.0.0.1", 1), send_queue_size=1)
    send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
    conn.send_nowait(_get(b"1"))
    sent = trio.Event()

    async def send_second() -> None:
        await conn.send(_get(b"2"))
        sent.set()

    nursery.start_soon(send_second)
    await trio.testing.wait_all_tasks_blocked()
    assert not sent.is_set()  # the queue is full until the writer drains it
    nursery.start_soon(conn._write_loop, send_stream)
    await trio.testing.wait_all_tasks_blocked()
    assert sent.is_set()
    conn.close()
    await trio.testing.wait_all_tasks_blocked()
    assert await receive_stream.receive_some() == b"".join(
        framing_tcp.encode(_get(t)) for t in (b"1", b"2")
    )


async def test_close_wakes_a_blocked_sender_with_an_error(nursery: trio.Nursery) -> None:
    conn = TcpConnection(("127.0.0.1", 1), send_queue_size=1)
    conn.send_nowait(_get(b"1"))
    failed = trio.Event()

    async def send_second() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await conn.send(_get(b"2"))
        failed.set()

    nursery.start_soon(send_second)
    await trio.testing.wait_all_tasks_blocked()
    conn.close()
    await trio.testing.wait_all_tasks_blocked()
    assert failed.is_set()


async def test_a_malformed_path_in_a_request_gets_bad_request(peer: Peer) -> None:
    await peer.handshake()
    await peer.send(Message(0, Code.GET, 0, b"b", ((11, b"\xff"),)), _get(b"g"))
    assert await peer.receive() == Message(0, Code.BAD_REQUEST, 0, b"b")
    assert await peer.receive() == Message(0, Code.NOT_FOUND, 0, b"g")
