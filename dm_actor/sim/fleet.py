"""A fleet of simulated devices driven by one Trio task, one epoll set and one timer heap.

Owns the sockets, the impairments and the scheduling of every `SimDevice` of a run:

- Devices without queue mode over UDP share sockets. Each shared socket is bound to
  `0.0.0.0:P` and hosts up to `source_addresses` devices, one per source address
  `127.0.0.2`, `127.0.0.3`, ...: a datagram is sent with `IP_PKTINFO` naming the device's
  source address, and a datagram received is routed by its destination address (`IP_PKTINFO`
  again). The server sees each device at its own `(address, port)`, and 100k devices need a
  few hundred file descriptors.
- Queue-mode UDP devices own a socket while they are awake, bound to their source address,
  and close it when they sleep, so that the server meets ICMP port-unreachable as it does
  with real clients. A sleeping device holds no descriptor.
- TCP devices own a non-blocking stream socket (connected without a task).
- All these sockets are registered in one `select.epoll` object; the fleet's only task waits
  for that epoll descriptor with `trio.lowlevel.wait_readable`, then drains whatever is ready
  in batches. There is no task and no sleeping timer per device: a heap of
  `(deadline, seq, device)` entries, lazily invalidated, drives every retransmission, Update,
  sleep, wake and notification check.

Over DTLS (`FleetConfig.dtls`, UDP bindings only) each device shakes hands with the
server's coaps socket (the project's own `DtlsClient`, PSK per device: `dm_actor.sim.secure`)
before its Register; the handshake's flights are retransmitted from the same timer heap, and
once established a device keeps only the `Session` (a few hundred bytes): every datagram it
sends is sealed here and every one it receives opened here, so `SimDevice` never knows. A
failed handshake or a session the server ends counts as a lost connection (the device
retries after its back-off, with a new handshake). A device asleep keeps its session and
comes back with it on a new socket (its Connection ID lets the server find it; without
Connection IDs it shakes hands again).

Optional loss, duplication and delay apply to every datagram in both directions, drawn from
a `random.Random(seed)`; device values and identities come from a second one.

Linux only (epoll, IP_PKTINFO). Never imports the server: it is reached over sockets only.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import math
import random
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from dm_actor.dtls import (
    DatagramToSend,
    DtlsClient,
    HandshakeFailed,
    LocalProtocolError,
    Session,
    SessionEstablished,
)
from dm_actor.dtls.record import ContentType
from dm_actor.sim.client import OWN_UDP, SHARED_UDP, TCP, Profile, SimDevice, Totals
from dm_actor.sim.objects import World
from dm_actor.sim.secure import derived_key, open_records

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dm_actor.dtls import Event

#: <linux/in.h>: IP_PKTINFO; Python 3.11 does not export it.
_IP_PKTINFO = 8
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLLERRHUP = select.EPOLLERR | select.EPOLLHUP
_INF = math.inf
_APPLICATION_DATA = ContentType.APPLICATION_DATA.value
#: what a binding letter combination means: (transport, queue mode)
BINDINGS: dict[str, tuple[int, bool]] = {
    "U": (SHARED_UDP, False),
    "UQ": (OWN_UDP, True),
    "T": (TCP, False),
    "TQ": (TCP, True),
}


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What to simulate.

    Attributes:
        server: the server's UDP address (an IP literal and a port).
        tcp_server: its CoAP-over-TCP address (default: `server`).
        devices: how many devices.
        bindings: binding of device i is `bindings[i % len(bindings)]` (U, UQ, T, TQ).
        lifetime: the registration lifetime every device asks for.
        ramp: first Registers per second (0: all at once).
        loss: probability a datagram is dropped, in each direction.
        duplicate: probability a datagram is sent twice.
        delay: a datagram is held for a uniform 0..delay seconds.
        seed: seeds device values, Message IDs, tokens and impairments.
        source_base: the first source address; devices use consecutive addresses.
        source_addresses: how many source addresses (devices per shared socket).
        prefix: endpoint names are `{prefix}-{index}`.
        temperatures: `/3303` instances per device.
        lights: `/3311` instances per device.
        sample_period: sensors change every this many seconds.
        profile: device behaviour (awake/sleep, notifications, retries).
        batch: datagrams drained from one socket per wake-up.
        dtls: CoAP over DTLS 1.2 with PSK (`server` is then the coaps address; U and UQ
            bindings only).
        psk_secret: over DTLS, device NAME's PSK identity is NAME and its key
            HMAC-SHA256(psk_secret, NAME)[:16] (`secure.derived_key`)...
        psk_table: ...unless this maps NAME to its (identity, key) (a credentials CSV).
        connection_id: over DTLS, offer RFC 9146 Connection IDs.
    """

    server: tuple[str, int]
    tcp_server: tuple[str, int] | None = None
    devices: int = 100
    bindings: tuple[str, ...] = ("U",)
    lifetime: int = 86400
    ramp: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    seed: int = 0
    source_base: str = "127.0.0.2"
    source_addresses: int = 254
    prefix: str = "sim"
    temperatures: int = 1
    lights: int = 1
    sample_period: float = 5.0
    profile: Profile = field(default_factory=Profile)
    batch: int = 256
    dtls: bool = False
    psk_secret: bytes = b""
    psk_table: Mapping[str, tuple[str, bytes]] | None = None
    connection_id: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.bindings) - set(BINDINGS)
        if unknown or not self.bindings:
            raise ValueError(f"bindings must be among {sorted(BINDINGS)}, not {sorted(unknown)}")
        if self.devices < 0 or self.source_addresses < 1:
            raise ValueError("devices must be >= 0 and source_addresses >= 1")
        for name in ("loss", "duplicate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be within [0, 1)")
        if self.delay < 0 or self.ramp < 0:
            raise ValueError("delay and ramp must not be negative")
        if self.dtls:
            if any(BINDINGS[b][0] == TCP for b in self.bindings):
                raise ValueError("DTLS devices use UDP bindings only (U, UQ)")
            if not self.psk_secret and self.psk_table is None:
                raise ValueError("DTLS needs a PSK secret or a table of credentials")


@dataclass(slots=True)
class NetStatistics:
    """Datagram counters of a fleet (TCP frames count as sent/received too)."""

    sent: int = 0
    received: int = 0
    lost: int = 0  # dropped by the loss impairment
    duplicated: int = 0
    send_failures: int = 0  # the kernel refused (full buffer, closed peer)
    stray: int = 0  # datagrams not from the server, or for no device


@dataclass(slots=True)
class DtlsCounters:
    """DTLS counters of a fleet (all zero without DTLS)."""

    handshakes: int = 0  # sessions established
    handshake_failures: int = 0  # refused (alert) or timed out
    sessions_closed: int = 0  # ended by the server (close_notify or a fatal alert)
    records_dropped: int = 0  # records that did not open (replays, bad tags, leftovers)
    unsent: int = 0  # datagrams a device sent with no session (dropped)
    no_credentials: int = 0  # devices without credentials in the table (never connect)


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Fleet:
    """Simulated devices talking to one server. Start it with
    `await nursery.start(fleet.run)`; it runs until cancelled.

    `devices` is filled when `run` has started; `totals` and `net` count as it goes.
    """

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.profile = config.profile
        self.server = config.server
        self.tcp_server = config.tcp_server or config.server
        self.world = World(random.Random(config.seed), config.sample_period)
        self.totals = Totals()
        self.net = NetStatistics()
        self.dtls = DtlsCounters()
        self.devices: list[SimDevice] = []
        self.started_at = 0.0
        #: seconds from the start until every device was registered at once (first time)
        self.all_registered_at: float | None = None
        self._rng = random.Random(config.seed ^ 0x5EED)
        self._impaired = bool(config.loss or config.duplicate or config.delay)
        base = int(ipaddress.IPv4Address(config.source_base))
        self._ips = [str(ipaddress.IPv4Address(base + i)) for i in range(config.source_addresses)]
        self._pktinfo = [
            [(socket.IPPROTO_IP, _IP_PKTINFO, _PKTINFO.pack(0, socket.inet_aton(ip), b"\0" * 4))]
            for ip in self._ips
        ]
        self._base = base
        self._epoll: select.epoll | None = None
        self._shared: dict[int, tuple[socket.socket, list[SimDevice | None]]] = {}
        self._own: dict[int, SimDevice] = {}  # fd -> device with its own socket
        self._connecting: set[int] = set()
        self._pending: dict[int, bytearray] = {}  # fd -> TCP bytes the kernel did not take
        self._refused: list[SimDevice] = []
        self._shared_sock: socket.socket | None = None  # the one being filled
        self._shared_port = 0
        self._heap: list[tuple[float, int, SimDevice, tuple[bool, bytes] | None]] = []
        self._seq = itertools.count()
        self._now = 0.0
        self._secure = config.dtls

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Create the devices and shared sockets, then drive everything until cancelled.

        Every socket is closed when this returns.
        """
        self._epoll = select.epoll()
        try:
            self._create_devices(trio.current_time())
            # the clock of the run starts once the devices exist (100k take about a second)
            now = self._now = self.started_at = trio.current_time()
            self.world.epoch = time.time() - now
            ramp = self.config.ramp
            for dev in self.devices:
                dev.next_at = now + (dev.index / ramp if ramp else 0.0)
                self._schedule(dev)
            task_status.started()
            await self._loop()
        finally:
            self._close_all()

    def _create_devices(self, now: float) -> None:
        c = self.config
        shared = 0
        addresses = c.source_addresses
        table: list[SimDevice | None] = []
        for i in range(c.devices):
            transport, queue = BINDINGS[c.bindings[i % len(c.bindings)]]
            dev = SimDevice(self, self.profile, self.world, i, f"{c.prefix}-{i}",
                            transport=transport, queue=queue, lifetime=c.lifetime,
                            start_at=now, temperatures=c.temperatures,
                            lights=c.lights)  # fmt: skip
            if transport == SHARED_UDP:
                offset = shared % addresses
                if offset == 0:
                    table = [None] * addresses
                    self._open_shared(table)
                dev.sock = self._shared_sock
                dev.port = self._shared_port
                table[offset] = dev
                dev.src = offset
                shared += 1
            else:
                dev.src = i % addresses
            self.devices.append(dev)

    def _open_shared(self, table: list[SimDevice | None]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
            sock.bind(("0.0.0.0", 0))
            assert self._epoll is not None
            self._epoll.register(sock.fileno(), _EPOLLIN)
        except BaseException:
            sock.close()
            raise
        self._shared[sock.fileno()] = (sock, table)
        self._shared_sock = sock
        self._shared_port = int(sock.getsockname()[1])

    async def _loop(self) -> None:
        assert self._epoll is not None
        epfd = self._epoll.fileno()
        wait_readable = trio.lowlevel.wait_readable
        heap = self._heap
        busy = False
        while True:
            if busy:
                await trio.lowlevel.checkpoint()
            else:
                with trio.move_on_at(heap[0][0] if heap else _INF):
                    await wait_readable(epfd)
            now = self._now = trio.current_time()
            busy = self._poll(now)
            while self._refused:
                dev = self._refused.pop()
                dev.on_closed(now)
                self._schedule(dev)
            busy = self._run_due(now) or busy
            if self.all_registered_at is None and self.totals.registered >= len(self.devices):
                self.all_registered_at = now - self.started_at

    def _schedule(self, dev: SimDevice) -> None:
        at = dev.deadline()
        handshake = dev.dtls
        if handshake is not None and type(handshake) is DtlsClient:
            timer = handshake.get_timer()
            if timer is not None and timer < at:
                at = timer
        if at != dev.due:
            dev.due = at
            if at < _INF:
                heapq.heappush(self._heap, (at, next(self._seq), dev, None))

    def _run_due(self, now: float, limit: int = 4096) -> bool:
        """Fire what is due; True when more is due than `limit` allowed."""
        heap = self._heap
        pop = heapq.heappop
        for _ in range(limit):
            if not heap or heap[0][0] > now:
                return False
            at, _, dev, item = pop(heap)
            if item is None:
                if dev.due != at:
                    continue  # superseded
                dev.due = _INF
                handshake = dev.dtls
                if handshake is not None and type(handshake) is DtlsClient:
                    self._handshake(dev, handshake, handshake.handle_timer(now), now)
                dev.on_timer(now)
            elif item[0]:
                self._transmit(dev, item[1])
                continue
            elif dev.sock is not None:
                self._receive(dev, item[1], now)
            self._schedule(dev)
        return bool(heap) and heap[0][0] <= now

    def _poll(self, now: float) -> bool:
        """Drain the sockets epoll reports ready; True when some may have more."""
        assert self._epoll is not None
        events = self._epoll.poll(0, 1024)
        more = len(events) == 1024
        for fd, mask in events:
            entry = self._shared.get(fd)
            if entry is not None:
                more = self._drain_shared(entry[0], entry[1], now) or more
                continue
            dev = self._own.get(fd)
            if dev is None:
                continue
            if dev.transport == TCP:
                self._tcp_event(dev, fd, mask, now)
            else:
                more = self._drain_own(dev, now) or more
            self._schedule(dev)
        return more

    def _drain_shared(self, sock: socket.socket, table: list[SimDevice | None], now: float) -> bool:
        server = self.server
        base = self._base
        recvmsg = sock.recvmsg
        net = self.net
        for _ in range(self.config.batch):
            try:
                data, ancdata, _, addr = recvmsg(2048, 64)
            except BlockingIOError:
                return False
            except OSError:
                continue
            dev = None
            if addr == server:
                for level, kind, raw in ancdata:
                    if level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
                        offset = int.from_bytes(raw[8:12], "big") - base
                        if 0 <= offset < len(table):
                            dev = table[offset]
            if dev is None:
                net.stray += 1
                continue
            self._deliver(dev, data, now)
            self._schedule(dev)
        return True

    def _drain_own(self, dev: SimDevice, now: float) -> bool:
        server = self.server
        for _ in range(self.config.batch):
            sock = dev.sock
            if sock is None:
                return False
            try:
                data, addr = sock.recvfrom(2048)
            except BlockingIOError:
                return False
            except OSError:
                continue
            if addr != server:
                self.net.stray += 1
                continue
            self._deliver(dev, data, now)
        return True

    def _deliver(self, dev: SimDevice, data: bytes, now: float) -> None:
        self.net.received += 1
        if self._impaired:
            copies = self._impair()
            for extra in copies:
                if extra:
                    heapq.heappush(self._heap, (now + extra, next(self._seq), dev, (False, data)))
                else:
                    self._receive(dev, data, now)
            return
        self._receive(dev, data, now)

    def _receive(self, dev: SimDevice, data: bytes, now: float) -> None:
        if not self._secure:
            dev.on_datagram(data, now)
            return
        state = dev.dtls
        if state is None:
            self.dtls.records_dropped += 1  # for a session the device no longer has
        elif type(state) is DtlsClient:
            self._handshake(dev, state, state.receive(data, now), now)
        else:
            assert isinstance(state, Session)
            plaintexts, closed, dropped = open_records(state, data)
            self.dtls.records_dropped += dropped
            for plaintext in plaintexts:
                dev.on_datagram(plaintext, now)
                if dev.dtls is not state:
                    return  # (it rebooted)
            if closed:
                self.dtls.sessions_closed += 1
                dev.dtls = None
                dev.on_closed(now)

    # -- DTLS ----------------------------------------------------------------------------------

    def _connect(self, dev: SimDevice) -> bool:
        """Over DTLS: True when the device has a session it may use now; else a handshake
        starts (or the device has no credentials) and `on_connected` / `on_closed` follows."""
        state = dev.dtls
        reusable = self.config.connection_id or dev.transport == SHARED_UDP
        if type(state) is Session and not state.closed and reusable:
            return True
        c = self.config
        name = dev.endpoint
        if c.psk_table is not None and name in c.psk_table:
            identity, key = c.psk_table[name]
            identity_bytes = identity.encode()
        elif c.psk_secret:
            identity_bytes, key = name.encode(), derived_key(c.psk_secret, name)
        else:
            self.dtls.no_credentials += 1
            dev.dtls = None
            self._refused.append(dev)
            return False
        client = DtlsClient(self.server, identity_bytes, key,
                            connection_id=b"" if c.connection_id else None)  # fmt: skip
        dev.dtls = client
        self._handshake(dev, client, client.connect(self._now), self._now)
        return False

    def _handshake(
        self, dev: SimDevice, client: DtlsClient, events: list[Event], now: float
    ) -> None:
        for event in events:
            kind = type(event)
            if kind is DatagramToSend:
                assert isinstance(event, DatagramToSend)
                self._send_datagram(dev, event.data)
            elif kind is SessionEstablished:
                if dev.dtls is not client:
                    return
                self.dtls.handshakes += 1
                dev.dtls = client.session  # the handshake's state goes; the keys stay
                dev.on_connected(now)
            elif kind is HandshakeFailed:
                if dev.dtls is not client:
                    return
                self.dtls.handshake_failures += 1
                dev.dtls = None
                dev.on_closed(now)

    def _impair(self) -> list[float]:
        """The delays of the copies of one datagram that get through (none when lost)."""
        c = self.config
        rng = self._rng
        if c.loss and rng.random() < c.loss:
            self.net.lost += 1
            return []
        copies = 1
        if c.duplicate and rng.random() < c.duplicate:
            self.net.duplicated += 1
            copies = 2
        return [rng.uniform(0.0, c.delay) if c.delay else 0.0 for _ in range(copies)]

    # -- TCP ---------------------------------------------------------------------------------

    def _tcp_event(self, dev: SimDevice, fd: int, mask: int, now: float) -> None:
        sock = dev.sock
        assert sock is not None and self._epoll is not None
        if fd in self._connecting:
            if not mask & (_EPOLLOUT | _EPOLLERRHUP):
                return
            self._connecting.discard(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.close(dev)
                dev.on_closed(now)
                return
            self._epoll.modify(fd, _EPOLLIN)
            dev.on_connected(now)
            return
        if mask & _EPOLLOUT and fd in self._pending:
            self._flush_pending(dev, sock, fd)
        if not mask & (_EPOLLIN | _EPOLLERRHUP):
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(dev)
            dev.on_closed(now)
            return
        self.net.received += 1
        dev.on_stream_data(data, now)

    def _tcp_write(self, dev: SimDevice, sock: socket.socket, data: bytes) -> None:
        fd = sock.fileno()
        pending = self._pending.get(fd)
        if pending is not None or fd in self._connecting:
            if pending is None:
                self._pending[fd] = bytearray(data)
            else:
                pending += data
            return
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self._pending[fd] = bytearray(data[n:])
            assert self._epoll is not None
            self._epoll.modify(fd, _EPOLLIN | _EPOLLOUT)

    def _flush_pending(self, dev: SimDevice, sock: socket.socket, fd: int) -> None:
        pending = self._pending[fd]
        try:
            n = sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self.net.send_failures += 1
            return
        del pending[:n]
        if not pending:
            del self._pending[fd]
            assert self._epoll is not None
            self._epoll.modify(fd, _EPOLLIN)

    # -- the Network protocol the devices use ---------------------------------------------------

    def send(self, device: SimDevice, data: bytes) -> None:
        """Send from a device to the server, through the impairments (UDP only); over DTLS,
        sealed on the device's session (dropped when it has none)."""
        if self._secure:
            session = device.dtls
            if type(session) is not Session:
                self.dtls.unsent += 1
                return
            try:
                data = session.seal(_APPLICATION_DATA, data)
            except LocalProtocolError:  # closed
                self.dtls.unsent += 1
                return
        self._send_datagram(device, data)

    def _send_datagram(self, device: SimDevice, data: bytes) -> None:
        if self._impaired and device.transport != TCP:
            for extra in self._impair():
                if extra:
                    entry = (self._now + extra, next(self._seq), device, (True, data))
                    heapq.heappush(self._heap, entry)
                else:
                    self._transmit(device, data)
            return
        self._transmit(device, data)

    def _transmit(self, dev: SimDevice, data: bytes) -> None:
        sock = dev.sock
        if sock is None:
            return  # closed meanwhile (asleep, rebooting): lost, as on a real device
        transport = dev.transport
        try:
            if transport == SHARED_UDP:
                sock.sendmsg([data], self._pktinfo[dev.src], 0, self.server)
            elif transport == OWN_UDP:
                sock.sendto(data, self.server)
            else:
                self._tcp_write(dev, sock, data)
        except OSError as exc:
            self.net.send_failures += 1
            if transport == TCP and exc.errno != errno.EAGAIN:
                self.close(dev)
                self._refused.append(dev)
            return
        self.net.sent += 1

    def open(self, device: SimDevice) -> bool:
        """A device's own socket: UDP bound to its address (the same port again if it is
        free), or a TCP connection started without blocking."""
        transport = device.transport
        if transport == SHARED_UDP:
            return self._connect(device) if self._secure else True
        assert self._epoll is not None
        ip = self._ips[device.src]
        if transport == OWN_UDP:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.bind((ip, device.port))
            except OSError:
                sock.bind((ip, 0))  # taken meanwhile: a new port, as after a NAT rebinding
            device.port = int(sock.getsockname()[1])
            self._adopt(device, sock, _EPOLLIN)
            return self._connect(device) if self._secure else True
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((ip, 0))
            err = sock.connect_ex(self.tcp_server)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._refused.append(device)
            return False
        self._adopt(device, sock, _EPOLLIN | _EPOLLOUT)
        self._connecting.add(sock.fileno())
        return False

    def _adopt(self, device: SimDevice, sock: socket.socket, mask: int) -> None:
        assert self._epoll is not None
        fd = sock.fileno()
        self._epoll.register(fd, mask)
        self._own[fd] = device
        device.sock = sock

    def close(self, device: SimDevice) -> None:
        """Close a device's own socket (a no-op for shared sockets and closed ones)."""
        sock = device.sock
        if sock is None or device.transport == SHARED_UDP:
            return
        fd = sock.fileno()
        if self._epoll is not None:
            self._epoll.unregister(fd)
        del self._own[fd]
        self._connecting.discard(fd)
        self._pending.pop(fd, None)
        sock.close()
        device.sock = None

    def _close_all(self) -> None:
        for dev in list(self._own.values()):
            self.close(dev)
        for sock, _ in self._shared.values():
            sock.close()
        self._shared.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
