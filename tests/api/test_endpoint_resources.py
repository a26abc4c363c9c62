"""`GET /v2/endpoints/{id}` and the paths device requests and subscriptions may name, for a
device registering resource-level links (Pelion's device client), one registering instances
only (Wakaama, Anjay, the simulator) and one registering absurd links (issue 14 item 1).
Loopback sockets, virtual time."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.coap.blockwise import Block
from dm_actor.coap.message import Message, decode, encode, path_options, query_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber

from .client import start_api
from .test_flow import online

if TYPE_CHECKING:
    from dm_actor.address import Address

PELION = b'</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="counter",</3303/0>'
GET = {"method": "GET"}


async def test_resource_level_links_are_listed_and_known(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="pelion", objects=PELION)
    async with api.client() as client:
        reply = await client.request("GET", "/v2/endpoints/pelion")
        assert reply.status == 200
        assert reply.json() == [
            {"uri": "/3/0/0", "obs": True, "type": ""},
            {"uri": "/3/0/1", "obs": False, "type": ""},
            {"uri": "/3200/0/5501", "obs": True, "rt": "counter", "type": ""},
            *({"uri": f"/3303/0/{rid}", "obs": rid != 5605, "type": ""}
              for rid in (5601, 5602, 5603, 5604, 5605, 5700, 5701)),
        ]  # fmt: skip
        for n, (uri, status) in enumerate([
            ("/3/0/0", 202), ("3/0/1", 202), ("/3", 202), ("/3/0", 202), ("/3200/0/5501", 202),
            ("/3303/0/5700", 202), ("/3/0/2", 404), ("/3/1", 404), ("/3200/0/5500", 404),
            ("/5/0/1", 404),
        ]):  # fmt: skip
            reply = await client.request(
                "POST", f"/v2/device-requests/pelion?async-id=r{n}", json={**GET, "uri": uri}
            )
            assert reply.status == status, uri
            if status == 404:
                assert reply.text == "URI_PATH_DOES_NOT_EXISTS"
        reply = await client.request("PUT", "/v2/subscriptions/pelion/3200/0/5501")
        assert reply.status in (200, 202)
        reply = await client.request("PUT", "/v2/subscriptions/pelion/3/0/5")
        assert (reply.status, reply.text) == (404, "URI_PATH_DOES_NOT_EXISTS")


async def test_instances_are_listed_as_their_models_resources(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="wakaama", objects=b'</>;rt="oma.lwm2m";ct=110,</3/0>,</2>')
    async with api.client() as client:
        listed = (await client.request("GET", "/v2/endpoints/wakaama")).json()
    assert listed[0] == {"uri": "/2", "obs": False, "type": ""}  # no instances: itself
    assert [r["uri"] for r in listed[1:]] == [f"/3/0/{rid}" for rid in range(23)]
    assert {r["uri"] for r in listed if not r["obs"]} == {
        "/2",
        "/3/0/4",
        "/3/0/5",
        "/3/0/12",
    }  # fmt: skip  (the executables)


async def register_in_blocks(server: Address, ep: str, links: bytes) -> int:
    """Register `ep` with `links` sent in Block1 blocks of 1024 bytes (RFC 7959, a new MID
    and token per block) from a fresh UDP socket; the code of the last answer."""
    code = 0
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        chunks = [links[i : i + 1024] for i in range(0, len(links), 1024)]
        for num, chunk in enumerate(chunks):
            block = Block(num, num + 1 < len(chunks), 6)
            options = (
                *path_options("/rd"),
                *query_options(f"ep={ep}&lt=300&lwm2m=1.1"),
                (OptionNumber.CONTENT_FORMAT.value, bytes([40])),
                (OptionNumber.BLOCK1.value, block.encode()),
            )
            options = tuple(sorted(options, key=lambda o: o[0]))
            token = bytes([num, len(ep)])
            msg = Message(MessageType.CON, Code.POST, 0x4000 + num, token, options, chunk)
            await sock.sendto(encode(msg), server)
            while True:
                answer = decode((await sock.recvfrom(65536))[0])
                if answer.token == token:
                    break
            code = answer.code
            if code != Code.CONTINUE:
                break
    return code


async def test_absurd_registers_are_answered_and_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    absurd = b",".join(
        [b"</%d/%d/%d/%d/%d/%d>" % ((i,) * 6) for i in range(100)]  # deeper than LwM2M
        + [b"</%d/0>,</0/%d>" % (70000 + i, 99999 + i) for i in range(50)]  # ids > 65535
        + [b'</3/0/%d>;obs;rt="%s"' % (i, b"x" * 40) for i in range(200)]
        + [b"</3303/%d>" % i for i in range(112)]
    )
    assert absurd.count(b",") + 1 == 512 and len(absurd) > 10_000
    assert await register_in_blocks(api.server.addr, "absurd", absurd) == Code.CREATED
    async with api.client() as client:
        reply = await client.request("GET", "/v2/endpoints/absurd")
        assert reply.status == 200
        listed = reply.json()
        assert len(listed) == 200 + 112 * 7
        assert listed[0] == {"uri": "/3/0/0", "obs": True, "rt": "x" * 40, "type": ""}
        reply = await client.request(
            "POST", "/v2/device-requests/absurd?async-id=a", json={**GET, "uri": "/1/1/1/1"}
        )
        assert (reply.status, reply.text) == (404, "URI_PATH_DOES_NOT_EXISTS")
    too_many = b",".join(b"</3/0/%d>;obs" % i for i in range(513))
    code = await register_in_blocks(api.server.addr, "absurd", too_many)
    assert code == Code.REQUEST_ENTITY_TOO_LARGE
    assert await register_in_blocks(api.server.addr, "absurd", PELION) == Code.CREATED
    async with api.client() as client:  # the server still serves, with the new links
        listed = (await client.request("GET", "/v2/endpoints/absurd")).json()
    assert listed[2] == {"uri": "/3200/0/5501", "obs": True, "rt": "counter", "type": ""}
