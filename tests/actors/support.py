"""A real server on loopback and small scripted LwM2M devices built on the CoAP core.

The devices speak real CoAP over their own UDP sockets (or TCP streams) and record every
request they execute, so tests can assert what the server did on the wire.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Supervisor
from dm_actor.coap import framing_tcp
from dm_actor.coap.blockwise import get_block, slice_block2
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.events import RequestFailed, RequestReceived, ResponseReceived
from dm_actor.coap.message import (
    Message,
    Option,
    decode,
    path_options,
    query_options,
    reset_for,
    uint_bytes,
)
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.config import Settings
from dm_actor.store.memory import MemoryStore
from dm_actor.transport.tcp import TcpListener
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.store.base import Store

OBJECTS = b"</1/0>,</3/0>,</3303/0>,</3311/0>"
Handler = Callable[[Message], tuple[int, bytes, int | None] | None]


@dataclass
class Server:
    sup: Supervisor
    addr: Address
    events: EventStream
    udp: UdpEndpoint
    tcp_addr: Address
    pending: list[tuple[str, object]] = field(default_factory=list)

    def take(self, kind: str | None = None) -> list[tuple[str, object]]:
        """The events published so far (of one kind), oldest first; the rest stay."""
        self.pending.extend((kind, item) for kind, item, _, _ in self.events.take())
        taken = [e for e in self.pending if kind is None or e[0] == kind]
        self.pending = [e for e in self.pending if not (kind is None or e[0] == kind)]
        return taken


async def start_server(
    nursery: trio.Nursery, settings: Settings | None = None, store: Store | None = None
) -> Server:
    events = EventStream()
    sup = Supervisor(settings or Settings(), events=events, store=store)
    await nursery.start(sup.run)
    udp = UdpEndpoint("127.0.0.1", 0, sup.on_datagram, sup.on_unreachable)
    addr = await nursery.start(udp.run)
    sup.attach_udp(udp.send)
    tcp = TcpListener(
        "127.0.0.1",
        0,
        sup.on_tcp_message,
        sup.on_tcp_closed,
        is_bound=lambda conn: conn in sup.by_conn,
    )
    tcp_addr = await nursery.start(tcp.run)
    return Server(sup, addr, events, udp, tcp_addr)


async def online(
    nursery: trio.Nursery,
    ep: str = "dev",
    settings: Settings | None = None,
    store: Store | None = None,
    **device: Any,
) -> tuple[Server, Device]:
    """A server and a UDP device `ep` registered with it (the registration event taken)."""
    server = await start_server(nursery, settings, store)
    dev = Device(server.addr, ep, **device)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    server.take()
    return server, dev


async def online_tcp(
    nursery: trio.Nursery,
    ep: str = "dev",
    settings: Settings | None = None,
    store: Store | None = None,
    **device: Any,
) -> tuple[Server, TcpDevice]:
    """A server and a TCP device `ep` connected and registered with it."""
    server = await start_server(nursery, settings, store)
    dev = TcpDevice(server.tcp_addr, ep, **device)
    await dev.connect(nursery)
    assert (await dev.register()).code == Code.CREATED
    server.take()
    return server, dev


async def settle() -> None:
    """Until idle: let every task run until all of them wait (for a datagram, a timer, the
    store), without moving the virtual clock. A `trio.sleep(0.01)` that only lets tasks run
    also lets 10 ms pass (and every timer due in them fire); keep `trio.sleep(n)` for "n
    seconds pass". A store writing in a worker thread counts as waiting: after `settle()`
    its commit may still be running."""
    await trio.testing.wait_all_tasks_blocked()


def responses(server: Server) -> dict[str, dict[str, object]]:
    """The AsyncIDResponses published so far, by async-id; fails on a second one for an id."""
    out: dict[str, dict[str, object]] = {}
    for _, item in server.take("async-responses"):
        assert isinstance(item, dict)
        key = str(item["id"])
        assert key not in out, f"two AsyncIDResponses for {key}"
        out[key] = item
    return out


@dataclass
class Executed:
    method: int
    path: str
    mid: int
    payload: bytes


@dataclass
class _Client:
    """What the UDP and TCP devices share: the LwM2M client side over one CoapEndpoint."""

    server: Address
    endpoint: str
    binding: str = "U"
    lifetime: int = 86400
    objects: bytes = OBJECTS
    handler: Handler | None = None
    answer: bool = True  # False: receive requests but never answer (a hung device)
    endpoint_type: str | None = None  # sent as `et` in the Register
    block_szx: int | None = None  # answer bodies over 16 << block_szx bytes in blocks
    broken_blocks: bool = False  # ... and always with the first block, whatever was asked
    observers: dict[str, bytes] = field(default_factory=dict)  # path -> the server's token
    observe_seq: int = 1
    executed: list[Executed] = field(default_factory=list)
    location: str = ""
    coap: CoapEndpoint = field(default_factory=CoapEndpoint)
    _responses: dict[bytes, Message] = field(default_factory=dict)
    _wake: trio.Event = field(default_factory=trio.Event)
    _scope: trio.CancelScope | None = None

    async def _flush(self) -> None:
        raise NotImplementedError

    def _events(self, now: float) -> None:
        while (event := self.coap.next_event()) is not None:
            if isinstance(event, RequestReceived):
                self._answer(event.request, now)
            elif isinstance(event, ResponseReceived | RequestFailed):
                # a failed request is given back as 0.00: no answer came
                response = event.response if isinstance(event, ResponseReceived) else None
                self._responses[event.token] = response or Message(0, 0)
                self._wake.set()
                self._wake = trio.Event()

    def _answer(self, req: Message, now: float) -> None:
        path = "/" + "/".join(req.uri_path)
        self.executed.append(Executed(req.code, path, req.mid, req.payload))
        if not self.answer:
            return
        result = self.handler(req) if self.handler else None
        code, payload, ct = result or _default_answer(req)
        options: tuple[Option, ...] = ()
        if ct is not None:
            options = ((OptionNumber.CONTENT_FORMAT, uint_bytes(ct)),)
        if req.observe == 0 and code < 0x60:
            self.observers[path] = req.token
            options = ((OptionNumber.OBSERVE, uint_bytes(self.observe_seq)), *options)
        elif req.observe == 1:
            self.observers.pop(path, None)
        if self.block_szx is not None:
            asked = get_block(req, OptionNumber.BLOCK2)
            if asked is not None or len(payload) > 16 << self.block_szx:
                asked = None if self.broken_blocks else asked
                block, payload = slice_block2(payload, asked, self.block_szx)
                options = tuple(sorted((*options, block.option(OptionNumber.BLOCK2))))
        self.coap.respond(req, code, options, payload, now)

    async def request(self, code: int, path: str, query: str = "", payload: bytes = b"") -> Message:
        options = path_options(path) + query_options(query)
        if payload:
            options += ((OptionNumber.CONTENT_FORMAT, uint_bytes(40)),)
        options = tuple(sorted(options, key=lambda o: o[0]))
        token = self.coap.send_request(code, options, payload, trio.current_time())
        await self._flush()
        while token not in self._responses:
            await self._wake.wait()
        return self._responses.pop(token)

    async def notify(
        self, path: str, payload: bytes, *, seq: int | None = None, confirmable: bool = False
    ) -> None:
        """Send a notification to the server's observation of `path` (text/plain); with
        `block_szx`, a long one as its first block (RFC 7959 2.6)."""
        if seq is None:
            self.observe_seq += 1
            seq = self.observe_seq
        options: tuple[Option, ...] = (
            (OptionNumber.OBSERVE, uint_bytes(seq)),
            (OptionNumber.CONTENT_FORMAT, uint_bytes(0)),
        )
        if self.block_szx is not None and len(payload) > 16 << self.block_szx:
            block, payload = slice_block2(payload, None, self.block_szx)
            options = tuple(sorted((*options, block.option(OptionNumber.BLOCK2))))
        self.coap.notify(
            self.observers[path], Code.CONTENT, options, payload, trio.current_time(),
            confirmable=confirmable,
        )  # fmt: skip
        await self._flush()

    async def register(self, lwm2m: str = "1.1") -> Message:
        query = f"ep={self.endpoint}&lt={self.lifetime}&lwm2m={lwm2m}&b={self.binding}"
        if self.endpoint_type is not None:
            query += f"&et={self.endpoint_type}"
        response = await self.request(Code.POST, "/rd", query, self.objects)
        if response.code == Code.CREATED:
            self.location = "/" + "/".join(response.location_path)
        return response

    async def update(self, query: str = "") -> Message:
        return await self.request(Code.POST, self.location, query)

    async def deregister(self) -> Message:
        return await self.request(Code.DELETE, self.location)


@dataclass
class Device(_Client):
    """A scripted LwM2M client over UDP."""

    reset: bool = False  # answer every request with a CoAP Reset
    loss: float = 0.0  # drop this share of datagrams in each direction (seeded)
    mute: bool = False  # execute and answer, but every datagram it sends is lost
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    arrivals: list[tuple[float, Message]] = field(default_factory=list)
    sock: trio.socket.SocketType | None = None
    _wait: trio.CancelScope | None = None  # the receive wait, cut short by a new timer

    async def start(self, nursery: trio.Nursery) -> None:
        """Open a fresh socket (a new source port, as a rebooted client has) and serve it."""
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await self.sock.bind(("127.0.0.1", 0))
        self.coap = CoapEndpoint(mid_start=0x1000 + len(self.executed))
        await nursery.start(self._serve)

    def close(self) -> None:
        """Close the socket like a sleeping queue-mode client: the server meets ICMP."""
        if self._scope is not None:
            self._scope.cancel()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = self.sock
        assert sock is not None
        with trio.CancelScope() as scope, sock:  # the socket closes when the device stops
            self._scope = scope
            task_status.started()
            while True:
                timer = self.coap.get_timer()
                with trio.CancelScope(deadline=float("inf") if timer is None else timer) as wait:
                    self._wait = wait
                    data, _ = await sock.recvfrom(65536)
                    if self.loss and self.rng.random() < self.loss:
                        continue
                    msg = decode(data)
                    self.arrivals.append((trio.current_time(), msg))
                    if self.reset and msg.code and msg.code < 32:
                        await sock.sendto(reset_for(msg.mid), self.server)
                        continue
                    self.coap.receive_datagram(data, trio.current_time())
                now = trio.current_time()
                timer = self.coap.get_timer()
                if timer is not None and timer <= now:
                    self.coap.handle_timer(now)
                self._events(now)
                await self._flush()

    async def _flush(self) -> None:
        timer = self.coap.get_timer()
        if self._wait is not None and timer is not None and timer < self._wait.deadline:
            self._wait.deadline = timer
        for out in self.coap.datagrams_to_send():
            if self.sock is None:  # closed (asleep): what it would have sent is lost
                return
            if not self.mute and not (self.loss and self.rng.random() < self.loss):
                await self.sock.sendto(out, self.server)

    def requests_at(self) -> list[float]:
        """Arrival times of the server's requests (retransmissions included)."""
        return [t for t, m in self.arrivals if m.code and m.code < 32]


@dataclass
class TcpDevice(_Client):
    """A scripted LwM2M client over CoAP-over-TCP (RFC 8323): CSM first, then requests."""

    binding: str = "T"
    stream: trio.SocketStream | None = None

    async def connect(self, nursery: trio.Nursery) -> None:
        self.stream = await trio.open_tcp_stream(*self.server[:2])
        self.coap = CoapEndpoint(reliable=True, token_seed=len(self.executed) * 1000 + 7)
        await self.stream.send_all(framing_tcp.encode(framing_tcp.csm()))
        await nursery.start(self._serve)

    async def disconnect(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        stream = self.stream
        assert stream is not None
        decoder = framing_tcp.StreamDecoder()
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            while data := await stream.receive_some(65536):
                decoder.receive_data(data)
                while (msg := decoder.next_message()) is not None:
                    if msg.code >= 0xE0:  # signalling: the server's CSM
                        continue
                    self.coap.receive_message(msg, trio.current_time())
                self._events(trio.current_time())
                await self._flush()

    async def _flush(self) -> None:
        assert self.stream is not None
        for out in self.coap.datagrams_to_send():
            await self.stream.send_all(out)


def _default_answer(req: Message) -> tuple[int, bytes, int | None]:
    if req.code == Code.GET:
        return Code.CONTENT, b"42", 0
    if req.code in (Code.PUT, Code.POST):
        return Code.CHANGED, b"", None
    return Code.DELETED, b"", None


class GatedStore(MemoryStore):
    """A memory store whose writes become durable when the test commits them (or, while
    `open`, as soon as someone waits for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = False
        self.commits = 0
        self.committed = 0  # the writes committed so far (a mark is a count of writes)
        self._committed = trio.Event()

    def commit(self) -> None:
        self.commits += 1
        self.committed = self.writes
        self._committed.set()
        self._committed = trio.Event()

    def mark(self) -> int:
        return self.writes

    def is_durable(self, mark: int) -> bool:
        return mark <= self.committed

    def backlog(self) -> int:
        return self.writes - self.committed

    async def durable(self, mark: int | None = None) -> None:
        target = self.writes if mark is None else mark
        if self.open and not self.is_durable(target):
            self.commit()
        while not self.is_durable(target):
            await self._committed.wait()
