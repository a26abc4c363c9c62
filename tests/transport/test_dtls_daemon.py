"""CoAP over DTLS against the running server (`app.serve`): the coaps socket, the session
addresses, the identity rules, Connection ID across an address change, revocation.

Real loopback sockets and the real clock (a handshake is a few datagrams); the client is the
project's own `DtlsClient` (tests/dtls has python-mbedtls and libcoap against the machine).
"""

from __future__ import annotations

import socket
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from dm_actor import app
from dm_actor.actors.commands import Accepted
from dm_actor.address import is_session
from dm_actor.coap.message import Message, decode, encode, path_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.config import load_settings, parse_settings
from dm_actor.dtls import (
    ApplicationData,
    DatagramToSend,
    DtlsClient,
    HandshakeFailed,
    SessionClosed,
)
from dm_actor.transport.dtls import RELEASE_GRACE

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from pathlib import Path

    from dm_actor.address import Address

WAIT = 5.0  # a hang guard: loopback answers in microseconds
KEY = bytes(range(16))


class SecureDevice:
    """A device speaking CoAP over DTLS from one UDP socket (which it can change)."""

    def __init__(self, server: Address, identity: str, key: bytes = KEY, cid: bool = True):
        self.server = server
        self.dtls = DtlsClient(server, identity.encode(), key, connection_id=b"" if cid else None)
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.mid = 0x100
        self.closed_by_server = False

    async def open(self) -> None:
        await self.sock.bind(("127.0.0.1", 0))

    async def handshake(self) -> bool:
        """True once the session is established (False: the server refused it)."""
        await self._out(self.dtls.connect(trio.current_time()))
        with trio.fail_after(WAIT):
            while self.dtls.session is None:
                data = await self.sock.recv(65535)
                events = self.dtls.receive(data, trio.current_time())
                await self._out(events)
                if any(isinstance(e, HandshakeFailed) for e in events):
                    return False
        return True

    async def _out(self, events: Sequence[object]) -> None:
        for e in events:
            if isinstance(e, DatagramToSend):
                await self.sock.sendto(e.data, self.server)

    async def send(self, msg: Message) -> None:
        await self.sock.sendto(self.dtls.send(encode(msg)), self.server)

    async def receive(self) -> Message | None:
        """The next CoAP message from the server, or None after `WAIT` (or a close)."""
        with trio.move_on_after(WAIT):
            while True:
                data = await self.sock.recv(65535)
                for e in self.dtls.receive(data, trio.current_time()):
                    if isinstance(e, ApplicationData):
                        return decode(e.data)
                    if isinstance(e, SessionClosed):
                        self.closed_by_server = True
                        return None
        return None

    async def request(self, msg: Message) -> Message:
        await self.send(msg)
        reply = await self.receive()
        assert reply is not None
        return reply

    def register(self, ep: str, lifetime: int = 300) -> Message:
        self.mid += 1
        return Message(
            MessageType.CON,
            Code.POST,
            self.mid,
            b"\x01",
            (
                *path_options("rd"),
                (OptionNumber.CONTENT_FORMAT.value, b"\x28"),
                (OptionNumber.URI_QUERY.value, f"ep={ep}".encode()),
                (OptionNumber.URI_QUERY.value, f"lt={lifetime}".encode()),
                (OptionNumber.URI_QUERY.value, b"b=U"),
            ),
            b"</3/0>,</3303/0>",
        )

    def update(self, location: str) -> Message:
        self.mid += 1
        return Message(MessageType.CON, Code.POST, self.mid, b"\x02", path_options(location))

    async def move(self) -> None:
        """A new socket (a new source port): what a NAT rebinding looks like to the server."""
        self.sock.close()
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await self.sock.bind(("127.0.0.1", 0))


def _location(reply: Message) -> str:
    return "/".join(v.decode() for n, v in reply.options if n == OptionNumber.LOCATION_PATH)


_OPEN: list[SecureDevice] = []


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[app.Listening]:
    settings = load_settings(None, host="127.0.0.1", coap_port=0, store="memory")
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    yield listening
    while _OPEN:
        _OPEN.pop().sock.close()


async def _device(
    server: app.Listening, identity: str, key: bytes = KEY, *, at: Address | None = None
) -> SecureDevice:
    assert server.coaps is not None
    dev = SecureDevice(at or server.coaps, identity, key)
    _OPEN.append(dev)
    await dev.open()
    return dev


async def _registered(server: app.Listening) -> tuple[SecureDevice, str, Address | None]:
    """sensor-1 with credentials, registered over its session: (device, location, the
    address the server binds it to)."""
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", KEY)
    dev = await _device(server, "id-1")
    assert await dev.handshake()
    location = _location(await dev.request(dev.register("sensor-1")))
    return dev, location, sup.by_endpoint["sensor-1"].addr


async def test_a_device_with_credentials_registers_over_dtls_and_gets_commands(
    server: app.Listening,
) -> None:
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", KEY)
    dev = await _device(server, "id-1")
    assert await dev.handshake()
    reply = await dev.request(dev.register("sensor-1"))
    assert reply.code == Code.CREATED
    actor = sup.by_endpoint["sensor-1"]
    assert actor.addr is not None and is_session(actor.addr)  # known by its session
    # a command reaches it over the session, and its answer is taken
    accepted = await sup.submit("sensor-1", "GET", "/3/0/0", async_id="a1")
    assert isinstance(accepted, Accepted)
    request = await dev.receive()
    assert request is not None and request.code == Code.GET
    await dev.send(Message(MessageType.ACK, Code.CONTENT, request.mid, request.token, (), b"acme"))
    with trio.fail_after(WAIT):
        while len(sup.by_endpoint["sensor-1"].machine.queue):  # noqa: ASYNC110 (no event for it)
            await trio.sleep(0.01)


async def test_identity_of_another_endpoint_is_refused_and_nothing_changes(
    server: app.Listening,
) -> None:
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", KEY)
    sup.provisioning.set("sensor-2", "id-2", KEY[::-1])
    dev = await _device(server, "id-2", key=KEY[::-1])
    assert await dev.handshake()
    reply = await dev.request(dev.register("sensor-1"))
    assert reply.code == Code.FORBIDDEN
    assert "sensor-1" not in sup.by_endpoint


async def test_endpoint_with_credentials_is_refused_over_plain_coap(
    server: app.Listening,
) -> None:
    server.supervisor.provisioning.set("sensor-1", "id-1", KEY)
    dev = await _device(server, "x", at=server.coap_udp)
    with dev.sock:
        await dev.sock.sendto(encode(dev.register("sensor-1")), server.coap_udp)
        with trio.fail_after(WAIT):
            reply = decode(await dev.sock.recv(65535))
    assert reply.code == Code.FORBIDDEN
    assert "sensor-1" not in server.supervisor.by_endpoint


async def test_a_plain_update_of_a_secured_registration_is_refused_and_does_not_rebind(
    server: app.Listening,
) -> None:
    sup = server.supervisor
    dev, location, bound = await _registered(server)
    # someone who learnt the registration id sends an Update over plain CoAP
    spy = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with spy:
        await spy.bind(("127.0.0.1", 0))
        await spy.sendto(encode(dev.update(location)), server.coap_udp)
        with trio.fail_after(WAIT):
            reply = decode(await spy.recv(65535))
    assert reply.code == Code.FORBIDDEN
    assert sup.by_endpoint["sensor-1"].addr == bound


async def test_connection_id_keeps_the_session_across_an_address_change(
    server: app.Listening,
) -> None:
    sup = server.supervisor
    dev, location, bound = await _registered(server)
    await dev.move()  # no new handshake: the next record carries the CID
    reply = await dev.request(dev.update(location))
    assert reply.code == Code.CHANGED
    assert sup.by_endpoint["sensor-1"].addr == bound  # the same session address
    # and the server's next request goes to the new socket address
    await sup.submit("sensor-1", "GET", "/3/0/0", async_id="a2")
    request = await dev.receive()
    assert request is not None and request.code == Code.GET


async def test_removing_credentials_closes_the_session_and_ends_the_registration(
    server: app.Listening,
) -> None:
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", KEY)
    dev = await _device(server, "id-1")
    assert await dev.handshake()
    assert (await dev.request(dev.register("sensor-1"))).code == Code.CREATED
    sup.provisioning.remove("sensor-1")
    assert await dev.receive() is None and dev.closed_by_server
    assert "sensor-1" not in sup.by_endpoint
    assert server.dtls is not None and server.dtls.sessions() == 0


async def test_wrong_key_gets_no_session(server: app.Listening) -> None:
    server.supervisor.provisioning.set("sensor-1", "id-1", KEY)
    dev = await _device(server, "id-1", key=b"\x00" * 16)
    assert not await dev.handshake()
    assert server.dtls is not None and server.dtls.sessions() == 0


async def test_plain_coap_can_be_switched_off(nursery: trio.Nursery) -> None:
    settings = parse_settings(
        '[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n'
        "[security]\nplain_coap = false\n"
    )
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    assert listening.plain_udp is None and listening.plain_tcp is None
    assert listening.coaps is not None and listening.coaps[1] != 0
    with pytest.raises(RuntimeError):
        _ = listening.coap_udp


async def test_after_a_restart_a_dtls_device_is_found_again_when_it_comes_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The session does not survive the restart (the server cannot start a handshake): the
    device's registration and its queued command do; the device shakes hands again, updates
    its registration, and gets the command on the new session."""
    text = f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\ndata_dir = "{tmp_path}"\n'

    async def start() -> tuple[trio.CancelScope, app.Listening]:
        scope = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
            with scope:
                await app.serve(parse_settings(text), http=False, task_status=task_status)

        return scope, await nursery.start(serve)

    scope, first = await start()
    first.supervisor.provisioning.set("sensor-1", "id-1", KEY)
    await first.supervisor.store.durable()
    dev = await _device(first, "id-1")
    assert await dev.handshake()
    location = _location(await dev.request(dev.register("sensor-1")))
    await first.supervisor.store.durable()
    scope.cancel()
    await trio.sleep(0.1)  # (the first server's tasks end)

    _, second = await start()
    sup = second.supervisor
    assert "sensor-1" in sup.by_endpoint  # restored, without an address to send to
    assert sup.by_endpoint["sensor-1"].addr is None
    accepted = await sup.submit("sensor-1", "GET", "/3/0/0", async_id="after")
    assert isinstance(accepted, Accepted)
    assert second.coaps is not None
    dev2 = await _device(second, "id-1")  # the same device: new handshake, its Update
    assert await dev2.handshake()
    await dev2.send(dev2.update(location))
    # the Update's 2.04 (held until stored) and the command, in either order
    got = [await dev2.receive(), await dev2.receive()]
    assert sorted(m.code for m in got if m is not None) == [Code.GET, Code.CHANGED]


async def test_a_new_handshake_of_the_same_identity_keeps_the_device_and_ends_the_old_session(
    server: app.Listening,
) -> None:
    """A device that lost its state (a reboot) or its address without a Connection ID shakes
    hands again from a new port: it is still the same device (same session address, no new
    Register needed), and its old session ends: sessions stay one per identity."""
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", KEY)
    first = await _device(server, "id-1")
    assert await first.handshake()
    assert (await first.request(first.register("sensor-1"))).code == Code.CREATED
    bound = sup.by_endpoint["sensor-1"].addr
    for _ in range(5):  # (each time a new socket: sessions must not pile up)
        again = await _device(server, "id-1")
        assert await again.handshake()
    assert server.dtls is not None and server.dtls.sessions() == 1
    assert await first.receive() is None and first.closed_by_server  # its close_notify
    assert sup.by_endpoint["sensor-1"].addr == bound
    await sup.submit("sensor-1", "GET", "/3/0/0", async_id="after-reboot")
    request = await again.receive()  # the newest session gets it, without an Update
    assert request is not None and request.code == Code.GET


async def test_a_device_that_registers_again_on_its_session_keeps_it(
    server: app.Listening,
) -> None:
    """A session whose registration ended is closed a little later (`RELEASE_GRACE`), not
    when the device registered again on it meanwhile."""
    sup = server.supervisor
    dev, location, _ = await _registered(server)
    dev.mid += 1
    deregister = Message(MessageType.CON, Code.DELETE, dev.mid, b"\x03", path_options(location))
    assert (await dev.request(deregister)).code == Code.DELETED
    assert (await dev.request(dev.register("sensor-1"))).code == Code.CREATED
    await trio.sleep(RELEASE_GRACE + 0.5)
    assert server.dtls is not None and server.dtls.sessions() == 1
    await sup.submit("sensor-1", "GET", "/3/0/0", async_id="still-there")
    request = await dev.receive()
    assert request is not None and request.code == Code.GET
