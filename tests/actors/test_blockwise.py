"""Answers larger than a datagram arrive in blocks (RFC 7959 2.4): the server asks for every
block and the AsyncIDResponse carries the whole body, never the first block alone."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.blockwise import get_block
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

from .support import Device, Executed, TcpDevice, online, responses, settle, start_server

if TYPE_CHECKING:
    from dm_actor.coap.message import Message

BODY = bytes(range(256)) * 12 + b"tail"  # 3076 bytes: six blocks of 512 and a short one


def big_value(req: Message) -> tuple[int, bytes, int | None]:
    return Code.CONTENT, BODY, 42  # application/octet-stream


def blocks_asked(executed: list[Executed]) -> int:
    return sum(e.path == "/3/0/1" for e in executed)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_large_answer_is_read_block_by_block(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    server = await start_server(nursery)
    kw = {"handler": big_value, "block_szx": 5}
    dev = (Device(server.addr, "dev", **kw) if transport == "udp"  # type: ignore[arg-type]
           else TcpDevice(server.tcp_addr, "dev", **kw))  # type: ignore[arg-type]  # fmt: skip
    if isinstance(dev, TcpDevice):
        await dev.connect(nursery)
    else:
        await dev.start(nursery)
    await dev.register()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="big")
    await trio.sleep(5)
    answer = responses(server)["big"]
    assert answer["status"] == 200 and answer["ct"] == "application/octet-stream"
    assert base64.b64decode(str(answer["payload"])) == BODY
    assert blocks_asked(dev.executed) == 7  # 6 x 512 + 4 bytes
    if isinstance(dev, TcpDevice):
        await dev.disconnect()


async def test_a_lost_block_is_asked_again_and_the_body_is_whole(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = Device(server.addr, "dev", handler=big_value, block_szx=5, loss=0.3)
    await dev.start(nursery)
    while (await dev.register()).code != Code.CREATED:
        pass
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="big", retry=3)
    await trio.sleep(600)
    answer = responses(server)["big"]
    assert base64.b64decode(str(answer["payload"])) == BODY
    assert blocks_asked(dev.executed) >= 7


async def test_the_next_block_is_asked_with_the_same_request_and_a_fresh_exchange(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, handler=big_value, block_szx=5)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="big")
    await trio.sleep(5)
    gets = [m for _, m in dev.arrivals if m.code == Code.GET]
    asked = [get_block(m, OptionNumber.BLOCK2) for m in gets]
    assert asked[0] is None  # the command itself
    assert [(b.num, b.szx) for b in asked[1:] if b is not None] == [(n, 5) for n in range(1, 7)]
    assert len({m.mid for m in gets}) == len({m.token for m in gets}) == 7
    assert {m.uri_path for m in gets} == {("3", "0", "1")}


async def test_a_device_that_breaks_the_transfer_ends_it_with_502(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """It answers every block request with the first block again: after a few retries the
    command ends with 502 BLOCKWISE_TRANSFER_FAILED, not with a truncated 200."""
    server, _ = await online(nursery, handler=big_value, block_szx=5, broken_blocks=True)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="big")
    await trio.sleep(5)
    answer = responses(server)["big"]
    assert (answer["status"], answer["error"]) == (502, "BLOCKWISE_TRANSFER_FAILED")
    assert "payload" not in answer
    assert server.sup.by_endpoint["dev"].queue.in_flight is None  # the device is free again


async def test_an_observation_whose_first_answer_comes_in_blocks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The whole first value is notified, and the observation (the first exchange's token)
    keeps matching the device's later notifications."""
    server, dev = await online(nursery, handler=big_value, block_szx=5)
    await server.sup.subscribe("dev", "/3/0/1", "app")
    await trio.sleep(5)
    [(_, first)] = server.take("notifications")
    assert isinstance(first, dict) and base64.b64decode(str(first["payload"])) == BODY
    await dev.notify("/3/0/1", b"small now")
    await trio.sleep(1)
    [(_, later)] = server.take("notifications")
    assert isinstance(later, dict) and base64.b64decode(str(later["payload"])) == b"small now"


async def test_a_notification_in_blocks_is_notified_whole(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 7959 2.6: a notification carries the first block; the server GETs the rest and
    notifies (and caches) the whole value, never a part."""
    server, dev = await online(nursery, handler=big_value, block_szx=5)
    await server.sup.subscribe("dev", "/3/0/1", "app")
    await trio.sleep(5)
    server.take("notifications")
    asked = len(dev.executed)
    await dev.notify("/3/0/1", BODY)
    await trio.sleep(5)
    [(_, item)] = server.take("notifications")
    assert isinstance(item, dict) and base64.b64decode(str(item["payload"])) == BODY
    assert len(dev.executed) - asked == 6  # blocks 1..6 fetched with GETs
    fetches = [m for _, m in dev.arrivals if m.code == Code.GET][-6:]
    assert all(m.observe is None for m in fetches)  # plain GETs, not a second observation
    cached = server.sup.by_endpoint["dev"].cached("/3/0/1", trio.current_time())
    assert cached is not None and cached.payload == BODY


async def test_later_blocks_of_a_post_answer_do_not_repeat_the_post_body(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The follow-up requests carry Block2 and no body (RFC 7959's examples): a device that
    treated each one as a new POST would at least not get the arguments again."""
    server, dev = await online(nursery, handler=big_value, block_szx=5)
    await server.sup.submit("dev", "POST", "/3/0/1", async_id="p", payload=b"arg",
                            content_format=0)  # fmt: skip
    await trio.sleep(5)
    assert base64.b64decode(str(responses(server)["p"]["payload"])) == BODY
    posts = [m for _, m in dev.arrivals if m.code == Code.POST]
    assert [m.payload for m in posts] == [b"arg"] + [b""] * 6
    assert all(m.content_format is None for m in posts[1:])


async def test_an_observation_whose_first_answer_breaks_is_not_left_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The first block had Observe, the transfer then failed: the server must not keep an
    observation it never registered (the device's next notification gets a Reset)."""
    server, dev = await online(nursery, handler=big_value, block_szx=5, broken_blocks=True)
    await server.sup.subscribe("dev", "/3/0/1", "app")
    await trio.sleep(5)
    assert server.take("notifications") == []
    dev.block_szx = None
    await dev.notify("/3/0/1", b"small", confirmable=True)
    await trio.sleep(1)
    assert server.take("notifications") == []
    assert dev.arrivals[-1][1].mtype == MessageType.RST


async def test_a_newer_small_notification_wins_over_a_fetch_in_progress(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A value in blocks is being fetched when a newer, small value is notified: the older
    value is never notified after it (nor cached)."""
    server, dev = await online(nursery, handler=big_value, block_szx=5)
    await server.sup.subscribe("dev", "/3/0/1", "app")
    await trio.sleep(5)
    server.take("notifications")
    await dev.notify("/3/0/1", BODY)  # the server starts fetching the rest ...
    await dev.notify("/3/0/1", b"newer")  # ... and a newer value arrives meanwhile
    await trio.sleep(5)
    values = [base64.b64decode(str(item["payload"]))  # type: ignore[index]
              for _, item in server.take("notifications")]  # fmt: skip
    assert values == [b"newer"]
    cached = server.sup.by_endpoint["dev"].cached("/3/0/1", trio.current_time())
    assert cached is None or cached.payload == b"newer"


async def test_notifications_in_blocks_never_pile_up_fetches(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: each notification in blocks started a GET for the rest, and a
    newer notification only forgot the fetch, not its exchange: 2,000 notifications left
    2,000 GETs outstanding (retransmitted: x6 traffic, O(n) per step). Now a newer one
    abandons the older fetch's exchange."""
    server, dev = await online(nursery, block_szx=0)
    assert await server.sup.subscribe("dev", "/3/0/1") == Accepted()
    await trio.sleep(1)
    dev.answer = False  # never answers the fetches
    for i in range(300):
        await dev.notify("/3/0/1", b"x" * 64)
        if i % 50 == 0:
            await settle()
    await trio.sleep(0.5)
    actor = server.sup.by_endpoint["dev"]
    assert len(actor.coap._by_token or {}) <= 8
