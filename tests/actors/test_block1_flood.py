"""Hostile Block1: many new peers each start a Register in blocks and never finish it. The
reassemblies are bounded by the shared pool (256 places of at most 64 KiB): the rest get 5.03
with Max-Age, the server keeps registering whole Registers, and a place idle for 60 s is
given to a newcomer (its buffer freed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.actors.supervisor import Supervisor
from dm_actor.coap.blockwise import Block
from dm_actor.coap.message import Message, decode, encode, path_options, query_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.config import Settings
from tests.actors.support import settle

if TYPE_CHECKING:
    from dm_actor.address import Address

BLOCK1 = OptionNumber.BLOCK1.value


def first_block(i: int) -> bytes:
    options = (*path_options("/rd"), *query_options(f"ep=b1-{i}&lt=300"))
    options += ((BLOCK1, Block(0, True, 2).encode()),)
    msg = Message(MessageType.CON, Code.POST, i & 0xFFFF, i.to_bytes(4, "big"),
                  tuple(sorted(options, key=lambda o: o[0])), b"<" * 64)  # fmt: skip
    return encode(msg)


def whole_register(i: int) -> bytes:
    options = (*path_options("/rd"), *query_options(f"ep=whole-{i}&lt=300"))
    msg = Message(MessageType.CON, Code.POST, i & 0xFFFF, b"w" + i.to_bytes(3, "big"),
                  tuple(sorted(options, key=lambda o: o[0])), b"</3/0>")  # fmt: skip
    return encode(msg)


async def test_a_flood_of_unfinished_block1_registers_is_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    sup = Supervisor(Settings())
    await nursery.start(sup.run)
    replies: dict[Address, list[Message]] = {}
    sup.attach_udp(lambda data, addr: replies.setdefault(addr, []).append(decode(data)))
    pool = sup.registry.machine_config.block1_pool

    def peer(i: int) -> tuple[str, int]:
        return (f"127.1.{i >> 8}.{i & 255}", 5683)

    for i in range(1000):
        sup.on_datagram(first_block(i), peer(i))
    await settle()
    codes = [replies[peer(i)][-1].code for i in range(1000)]
    assert codes.count(Code.CONTINUE) == pool.limit == 256
    assert codes.count(Code.SERVICE_UNAVAILABLE) == 1000 - 256
    assert {replies[peer(i)][-1].max_age for i in range(256, 1000)} == {60}
    assert len(pool) == 256 and len(sup.router._blocks) <= 2 * pool.limit
    # whole Registers are still taken meanwhile
    for i in range(10):
        sup.on_datagram(whole_register(i), (f"127.2.0.{i}", 5683))
    await settle()
    await trio.sleep(0.1)
    assert all(replies[(f"127.2.0.{i}", 5683)][-1].code == Code.CREATED for i in range(10))
    # after 60 s idle, a newcomer takes the oldest place; the table stays bounded
    await trio.sleep(61)
    for i in range(1000, 1300):
        sup.on_datagram(first_block(i), peer(i))
    await settle()
    assert all(replies[peer(i)][-1].code == Code.CONTINUE for i in range(1000, 1256))
    assert len(pool) == 256 and len(sup.router._blocks) <= 2 * pool.limit
