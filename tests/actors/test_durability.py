"""A Register's 2.01 and a command's 202 wait until the store says the write is durable."""

from __future__ import annotations

import socket

import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.message import Message, decode, encode, path_options, query_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.store.memory import MemoryStore

from .support import start_server


class GatedStore(MemoryStore):
    """A memory store whose commits wait for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.commits = 0

    async def durable(self) -> None:
        await self.gate.wait()
        self.commits += 1


def register_datagram(mid: int) -> bytes:
    options = (
        *path_options("/rd"),
        (OptionNumber.CONTENT_FORMAT, b"\x28"),
        *query_options("ep=gated&lt=300&b=U"),
    )
    msg = Message(MessageType.CON, Code.POST, mid, b"tk", tuple(sorted(options)), b"</3/0>")
    return encode(msg)


async def test_register_is_answered_only_after_the_store_is_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    server = await start_server(nursery, store=store)
    sup, addr = server.sup, server.addr
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        await client.bind(("127.0.0.1", 0))
        await client.sendto(register_datagram(7), addr)
        await trio.sleep(5)
        await client.sendto(register_datagram(7), addr)  # the client retransmits
        await trio.sleep(5)
        with trio.move_on_after(1):
            await client.recvfrom(2048)
            raise AssertionError("answered before the registration was durable")
        assert list(store.registrations) == ["gated"]
        assert sup.statistics["registrations"] == 1  # the retransmission made no second one
        store.gate.set()
        data, _ = await client.recvfrom(2048)
        reply = decode(data)
        assert (reply.code, reply.mid, reply.location_path[0]) == (Code.CREATED, 7, "rd")
        await client.sendto(register_datagram(7), addr)  # a late retransmission: same answer
        data, _ = await client.recvfrom(2048)
        assert decode(data) == reply


async def test_submit_returns_after_the_store_is_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.gate.set()
    server = await start_server(nursery, store=store)
    sup, addr = server.sup, server.addr
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        await client.bind(("127.0.0.1", 0))
        await client.sendto(register_datagram(8), addr)
        await client.recvfrom(2048)
    store.gate = trio.Event()
    done: list[object] = []

    async def submit() -> None:
        done.append(await sup.submit("gated", "GET", "/3/0/1", async_id="a"))

    nursery.start_soon(submit)
    await trio.sleep(10)
    assert done == []
    assert "a" in store.commands["gated"]  # written, not yet durable: no 202 yet
    store.gate.set()
    await trio.sleep(0.1)
    assert done == [Accepted()]


async def test_registers_are_shed_while_too_many_answers_wait_for_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    server = await start_server(nursery, store=store)
    server.sup._held_limit = 1
    clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for client in clients:
        await client.bind(("127.0.0.1", 0))
    with clients[0], clients[1]:
        await clients[0].sendto(register_datagram(1), server.addr)
        await trio.sleep(1)
        await clients[1].sendto(register_datagram(2).replace(b"ep=gated", b"ep=other"), server.addr)
        await trio.sleep(1)
        assert list(store.registrations) == ["gated"]  # the second one was not taken
        assert server.sup.statistics["registrations_shed"] == 1
        store.gate.set()
        data, _ = await clients[0].recvfrom(2048)
        assert decode(data).code == Code.CREATED
