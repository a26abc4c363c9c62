"""Small-buffer simulated devices (`Profile.buffer_size`, as Anjay's `--outbuf-size 256
--inbuf-size 256`): their Register and Send go in Block1 blocks, a request over the buffer gets
a bare 4.13, a request body in blocks is put back together and executed once.

Client-level tests drive one device over a fake network; fleet tests run real loopback
sockets against a real server, in virtual time.
"""

from __future__ import annotations

import base64
import json
import random
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.blockwise import Block, get_block
from dm_actor.coap.message import Message, decode, encode, path_options
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.lwm2m import content
from dm_actor.sim.client import REGISTERED, TCP, Profile, SimDevice, Totals
from dm_actor.sim.objects import World
from tests.sim.test_fleet import executed, start

if TYPE_CHECKING:
    from dm_actor.sim.fleet import Fleet

CON, ACK = MessageType.CON, MessageType.ACK
BLOCK1, SIZE1 = OptionNumber.BLOCK1.value, OptionNumber.SIZE1.value
SENML_JSON = ContentFormat.SENML_JSON.value
#: Anjay's `--outbuf-size 256 --inbuf-size 256`
SMALL = Profile(record=True, buffer_size=256)


class FakeNet:
    def __init__(self) -> None:
        self.totals = Totals()
        self.sent: list[bytes] = []

    def send(self, device: SimDevice, data: bytes) -> None:
        self.sent.append(data)

    def open(self, device: SimDevice) -> bool:
        return device.transport != TCP

    def close(self, device: SimDevice) -> None:
        pass

    def take(self) -> list[Message]:
        out = [decode(d) for d in self.sent]
        self.sent.clear()
        return out


def device(net: FakeNet, profile: Profile = SMALL, **kw: object) -> SimDevice:
    world = World(random.Random(3), sample_period=5.0)
    return SimDevice(net, profile, world, 0, "dev-0", lifetime=300, **kw)  # type: ignore[arg-type]


def block1(msg: Message) -> Block | None:
    return get_block(msg, BLOCK1)


def answer(msg: Message, code: int, *options: tuple[int, bytes]) -> bytes:
    ordered = tuple(sorted(options, key=lambda o: o[0]))  # repeated options keep their order
    return encode(Message(ACK, code, msg.mid, msg.token, ordered))


# -- one device, bytes in and out ------------------------------------------------------------


def test_register_goes_in_blocks_of_128_each_after_the_2_31() -> None:
    net = FakeNet()
    dev = device(net, temperatures=30, lights=4)
    links = dev.object_links()
    assert len(links) > 384
    dev.on_timer(0.0)
    [first] = net.take()  # one block at a time
    assert block1(first) == Block(0, True, 3) and first.payload == links[:128]
    assert all(len(d) <= 256 for d in [encode(first)])
    dev.on_datagram(answer(first, Code.CONTINUE, (BLOCK1, Block(0, True, 3).encode())), 0.1)
    [second] = net.take()
    # RFC 7959 2.5: the same Uri-Path and Uri-Query in each block; a new MID and token (Anjay)
    assert second.uri_path == first.uri_path == ("rd",)
    assert second.uri_query == first.uri_query == ("ep=dev-0", "lt=300", "lwm2m=1.1", "b=U")
    assert second.content_format == first.content_format == ContentFormat.LINK_FORMAT
    assert second.mid != first.mid and second.token != first.token
    assert block1(second) == Block(1, True, 3) and second.payload == links[128:256]
    # the server asks for smaller blocks in its 2.31: followed from the next one
    dev.on_datagram(answer(second, Code.CONTINUE, (BLOCK1, Block(1, True, 2).encode())), 0.2)
    [third] = net.take()
    assert block1(third) == Block(4, True, 2) and third.payload == links[256:320]
    rest = b""
    msg = third
    sizes = [len(encode(m)) for m in (first, second, third)]
    while (b := block1(msg)) is not None and b.more:
        rest += msg.payload
        dev.on_datagram(answer(msg, Code.CONTINUE, (BLOCK1, b.encode())), 0.3)
        [msg] = net.take()
        sizes.append(len(encode(msg)))
    assert links[256:] == rest + msg.payload
    assert dev.state != REGISTERED
    done = Message(ACK, Code.CREATED, msg.mid, msg.token,
                   (*path_options("rd/r1", 8), (BLOCK1, msg.option(BLOCK1) or b"")))  # fmt: skip
    dev.on_datagram(encode(done), 0.4)
    assert (dev.state, dev.location, net.totals.registered) == (REGISTERED, "rd/r1", 1)
    assert net.totals.blocks_sent == len(sizes) == 2 + -(-(len(links) - 256) // 64)
    assert max(sizes) <= 256


def test_an_update_with_the_object_links_goes_in_blocks() -> None:
    net = FakeNet()
    dev = device(net, temperatures=12, lights=4)
    dev.on_timer(0.0)
    for _ in range(2):
        [msg] = net.take()
        b = block1(msg)
        assert b is not None
        code = Code.CONTINUE if b.more else Code.CREATED
        dev.on_datagram(answer(msg, code, *path_options("rd/r1", 8), (BLOCK1, b.encode())), 0.0)
    assert dev.state == REGISTERED
    create = Message(CON, Code.POST, 300, b"c", (*path_options("/3311"),
                     (12, bytes((SENML_JSON,)))), b'[{"bn":"/3311/9/5850","vb":true}]')  # fmt: skip
    dev.on_datagram(encode(create), 1.0)
    assert net.take()[0].code == Code.CREATED
    dev.on_timer(1.0)  # the Update with the new object list
    [first] = net.take()
    assert first.uri_path == ("rd", "r1") and first.content_format == ContentFormat.LINK_FORMAT
    assert block1(first) == Block(0, True, 3) and first.payload == dev.object_links()[:128]
    dev.on_datagram(answer(first, Code.CONTINUE, (BLOCK1, Block(0, True, 3).encode())), 1.1)
    [second] = net.take()
    assert second.uri_path == ("rd", "r1") and second.token != first.token
    assert first.payload + second.payload == dev.object_links()
    dev.on_datagram(answer(second, Code.CHANGED, (BLOCK1, Block(1, False, 3).encode())), 1.2)
    assert dev.updates == 1 and dev.upload is None and dev.errors == 0


def test_without_a_buffer_limit_the_register_goes_whole() -> None:
    net = FakeNet()
    dev = device(net, Profile(), temperatures=12, lights=4)
    dev.on_timer(0.0)
    [reg] = net.take()
    assert block1(reg) is None and reg.payload == dev.object_links()


def test_a_small_register_goes_whole_and_a_refused_block_fails_it() -> None:
    net = FakeNet()
    dev = device(net)  # 1 temperature, 1 light: 60 bytes of links
    dev.on_timer(0.0)
    [reg] = net.take()
    assert block1(reg) is None
    dev.on_datagram(answer(reg, Code.CREATED, *path_options("rd/r1", 8)), 0.0)
    assert dev.state == REGISTERED
    net = FakeNet()
    big = device(net, temperatures=12, lights=4)
    big.on_timer(0.0)
    [first] = net.take()
    assert block1(first) == Block(0, True, 3)
    big.on_datagram(answer(first, Code.REQUEST_ENTITY_INCOMPLETE), 0.0)
    assert big.state != REGISTERED and big.upload is None and net.totals.errors == 1


def test_a_request_over_the_buffer_gets_a_bare_4_13() -> None:
    net = FakeNet()
    dev = device(net)
    dev.on_datagram(answer(decode(_register(net, dev)), Code.CREATED, *path_options("rd/r1", 8)), 0)
    body = b"4" * 300
    put = Message(CON, Code.PUT, 900, b"\xa5\x00\x00\x05", path_options("/3311/0/5851"), body)
    dev.on_datagram(encode(put), 1.0)
    [reply] = net.take()
    # Anjay's answer (tests/vectors anjay-client-udp-block1-write-response): token only
    assert reply == Message(ACK, Code.REQUEST_ENTITY_TOO_LARGE, 900, b"\xa5\x00\x00\x05")
    assert net.totals.too_large == 1 and not executed(dev, "/3311/0/5851")


def test_a_write_in_blocks_is_answered_2_31_and_executed_once_whole() -> None:
    net = FakeNet()
    dev = device(net)
    dev.on_datagram(answer(decode(_register(net, dev)), Code.CREATED, *path_options("rd/r1", 8)), 0)
    body = _senml_write(300, 77)
    blocks = [body[i : i + 128] for i in range(0, len(body), 128)]
    for n, chunk in enumerate(blocks):
        more = n < len(blocks) - 1
        opts = (*path_options("/3311/0"), (12, bytes((SENML_JSON,))),
                (BLOCK1, Block(n, more, 3).encode()))  # fmt: skip
        msg = Message(CON, Code.PUT, 100 + n, bytes((n,)), opts, chunk)
        dev.on_datagram(encode(msg), 1.0)
        dev.on_datagram(encode(msg), 1.0)  # a retransmission: the same answer, fed once
        replies = net.take()
        assert replies[0] == replies[1]
        assert replies[0].code == (Code.CONTINUE if more else Code.CHANGED)
        assert block1(replies[0]) == Block(n, more, 3)  # echoed
    [write] = [e for e in dev.executed or () if e.path == "/3311/0"]
    assert write.payload == body and dev.light(0).dimmer == 77
    # a block out of order: 4.08
    late = Message(CON, Code.PUT, 200, b"z", (*path_options("/3311/0"),
                   (BLOCK1, Block(2, True, 3).encode())), b"x" * 128)  # fmt: skip
    dev.on_datagram(encode(late), 2.0)
    assert net.take()[0].code == Code.REQUEST_ENTITY_INCOMPLETE


def _register(net: FakeNet, dev: SimDevice) -> bytes:
    dev.on_timer(0.0)
    [reg] = net.sent
    net.sent.clear()
    return reg


def _senml_write(size: int, last: int) -> bytes:
    """A SenML JSON write of /3311/0/5851 of at least `size` bytes whose last record sets
    `last`: applied whole, the dimmer ends at `last`."""
    records: list[dict[str, object]] = [{"bn": "/3311/0/", "n": "5851", "v": 1}]
    while len(json.dumps(records)) < size:
        records.append({"n": "5851", "v": len(records) % 50})
    records.append({"n": "5851", "v": last})
    return json.dumps(records).encode()


# -- a fleet against the real server ---------------------------------------------------------


def _received(fleet: Fleet) -> dict[int, list[Message]]:
    """Record what each device receives (the fleet's delivery, wrapped)."""
    seen: dict[int, list[Message]] = {}
    deliver = fleet._deliver

    def recording(dev: SimDevice, data: bytes, now: float) -> None:
        seen.setdefault(dev.index, []).append(decode(data))
        deliver(dev, data, now)

    fleet._deliver = recording  # type: ignore[method-assign]
    return seen


async def test_small_buffer_devices_register_in_blocks_with_all_their_links(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _, view, fleet, _ = await start(nursery, {
        "devices": 20, "bindings": ("U", "UQ"), "ramp": 20.0, "seed": 8, "temperatures": 12,
        "lights": 4, "profile": SMALL,
    })  # fmt: skip
    await trio.sleep(5)
    totals = fleet.totals
    assert totals.registered == 20 and totals.errors == 0
    assert totals.blocks_sent == 20 * 2  # 201 bytes of links: 2 blocks of 128 each
    registered = view.take("registrations")
    assert len(registered) == 20
    for reg in registered:
        paths = {r["path"] for r in reg["resources"]}  # type: ignore[index]
        assert {f"/3303/{i}" for i in range(12)} | {f"/3311/{i}" for i in range(4)} <= paths


async def test_a_700_byte_write_goes_through_in_smaller_blocks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, view, fleet, _ = await start(nursery, {
        "devices": 2, "bindings": ("U", "T"), "seed": 9, "profile": SMALL,
    })  # fmt: skip
    seen = _received(fleet)
    await trio.sleep(2)
    assert fleet.totals.registered == 2
    body = _senml_write(700, 33)
    assert 700 <= len(body) < 760
    for dev in fleet.devices:
        ok = await listening.supervisor.submit(
            dev.endpoint,
            "PUT",
            "/3311/0",
            payload=body,
            content_format=SENML_JSON,
            async_id=f"w{dev.index}",
        )
        assert ok == Accepted()  # fmt: skip
    await trio.sleep(30)
    answers = {str(r["id"]): r["status"] for r in view.take("async-responses")}  # type: ignore[index]
    assert answers == {"w0": 200, "w1": 200}
    for dev in fleet.devices:
        [write] = [e for e in dev.executed or () if e.path == "/3311/0"]  # exactly once
        assert write.payload == body and dev.light(0).dimmer == 33
    # UDP: the whole body, then blocks of 512 and 256 (each over the buffer: a bare 4.13,
    # so the server halves), then 128 (block and options fit 256 bytes); each block once
    puts = [m for m in seen[0] if m.code == Code.PUT]
    sizes = [b.size if (b := block1(m)) else len(m.payload) for m in puts]
    assert sizes == [len(body), 512, 256] + [128] * 6
    assert [block1(m).num for m in puts[3:]] == list(range(6))  # type: ignore[union-attr]
    # TCP: blocks of 128 too, 6 of them, at once: the server heeds the CSM's Max-Message-Size
    # 256 (RFC 8323 5.3.1); only the UDP device answered 4.13 (three times)
    assert fleet.totals.too_large == 3
    assert fleet.totals.blocks_received == 6 + 6


async def test_sends_in_blocks_are_published(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Twelve temperatures make a SenML CBOR Send of ~360 bytes: 3 blocks of 128; the last
    one's values (`/3303/11`) reach the subscriber, so the server used the whole body."""
    listening, view, fleet, fleet_scope = await start(nursery, {
        "devices": 10, "bindings": ("U", "T"), "ramp": 10.0, "seed": 6, "temperatures": 12,
        "profile": Profile(buffer_size=256, send_interval=10.0),
    })  # fmt: skip
    sup = listening.supervisor
    await trio.sleep(2)
    assert fleet.totals.registered == 10
    for dev in fleet.devices:
        assert await sup.subscribe(dev.endpoint, "/3303/11/5700") == Accepted()
    blocks_before, sends_before = fleet.totals.blocks_sent, fleet.totals.sends
    await trio.sleep(30)
    fleet_scope.cancel()
    await trio.sleep(5)
    totals = fleet.totals
    assert totals.sends >= 10 * 2 and totals.errors == 0 and totals.sends_refused == 0
    assert sup.statistics["sends"] == totals.sends
    # every Send in 3 blocks of 128
    assert totals.blocks_sent - blocks_before >= (totals.sends - sends_before) * 3
    sent = [n for n in view.take("notifications") if n["ct"] == "application/senml+cbor"]  # type: ignore[index]
    assert {n["path"] for n in sent} == {"/3303/11/5700"}  # type: ignore[index]
    assert {str(n["ep"]) for n in sent} == {d.endpoint for d in fleet.devices}  # type: ignore[index]
    for note in sent:
        [value] = content.decode(112, base64.b64decode(str(note["payload"])))  # type: ignore[index]
        assert value.path == "/3303/11/5700"
