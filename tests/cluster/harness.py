"""The multi-process cluster harness: real `dm-actor serve` nodes on one real PostgreSQL.

- `Cluster`: N nodes (`python -m dm_actor serve --config node.toml`, each its own process,
  data directory and log) sharing one database of the session's PostgreSQL server
  (tests/store/postgres.py). Topology "A" (VIP-like): every node on 127.0.0.1 and the same
  CoAP port (SO_REUSEPORT); topology "B" (host-like): node i on 127.0.0.(i+1), each its own
  address. A node can be killed (SIGKILL), paused (SIGSTOP), resumed (SIGCONT), restarted;
  nodes can be added; `settled` waits until every slot's lease names a live node; the
  PostgreSQL server can be stopped with `-m immediate` and started again. A supervisor task
  (`supervise`) restarts a node that exited on its own, as systemd would, and notes the exit.
- `Device`: a small LwM2M device on its own UDP socket, built on dm_actor.coap: it registers
  (optionally in queue mode) with one chosen address, sends Updates, answers GET, PUT, POST
  (execute) and DELETE, deduplicates CON requests by (source, Message ID) as RFC 7252 4.5
  says, counts every execution by (method, path, payload), and records every datagram it
  receives with its arrival time and source address (topology B tells the sending node by
  it). It can delay its answers (executing at once) and sleep (dropping what arrives).
- The channel reader is tests/crash_channels.py's (`Inbox`, `start_consumer`): long poll or
  WebSocket on any chosen node.

Real time throughout (the nodes are other processes): every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import trio

from dm_actor.api.auth import application_id
from dm_actor.cluster.slots import home_slot, slot_of
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message, decode, encode, path_options, query_options, uint_bytes
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from tests.crash_channels import Inbox, start_consumer
from tests.daemon import Daemon, NotSent, free_ports, request

if TYPE_CHECKING:
    from pathlib import Path

    from tests.store.postgres import PostgresServer

__all__ = ["Inbox", "start_consumer"]  # the channel reader, for the scenarios

KEY = "ak_cluster"
SECRET = "test-secret"
SLOTS = 64
LEASE_TTL = 1.0

pytestmark_common = [
    pytest.mark.crash,
    # trio-websocket's client keeps its TCP socket when the server side vanishes (kill -9)
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

_CON = MessageType.CON.value
_NON = MessageType.NON.value
_ACK = MessageType.ACK.value
_RST = MessageType.RST.value
_URI_PATH = OptionNumber.URI_PATH.value
_CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
_LOCATION_PATH = OptionNumber.LOCATION_PATH.value
_METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE"}


# -- nodes ----------------------------------------------------------------------------------


@dataclass
class Exit:
    """A node's process that ended on its own (not killed by the test)."""

    node: str
    code: int
    at: float  # trio.current_time()


@dataclass
class Node:
    """One `dm-actor serve` process of the cluster."""

    name: str
    host: str
    coap_port: int
    http_port: int
    link_port: int
    daemon: Daemon
    stopped: bool = False  # SIGSTOPped
    down: bool = False  # killed by the test, not to be restarted by the supervisor
    ready: bool = False  # started and its HTTP port accepted a connection
    readies: int = 0  # times it became ready

    @property
    def coap(self) -> tuple[str, int]:
        return (self.host, self.coap_port)

    @property
    def http(self) -> tuple[str, int]:
        return (self.host, self.http_port)

    @property
    def pid(self) -> int:
        proc = self.daemon.proc
        assert proc is not None, f"node {self.name} is not running"
        return int(proc.pid)

    def running(self) -> bool:
        proc = self.daemon.proc
        return proc is not None and proc.poll() is None

    def log(self) -> str:
        return self.daemon.log.read_text(errors="replace")


class Cluster:
    """N nodes on one database; see the module's docstring."""

    def __init__(
        self,
        tmp_path: Path,
        pg: PostgresServer,
        dsn: str,
        topology: str = "B",
        *,
        cluster: bool = True,
        settings: str = "",
        slots: int = SLOTS,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        assert topology in ("A", "B"), topology
        self.tmp, self.pg, self.dsn, self.topology = tmp_path, pg, dsn, topology
        self.cluster, self.settings, self.slots, self.lease_ttl = (
            cluster,
            settings,
            slots,
            lease_ttl,
        )
        self.nodes: dict[str, Node] = {}
        self.exits: list[Exit] = []
        self.restarts: Counter[str] = Counter()
        self.coap_port = free_ports(1)[0]  # shared: every node's CoAP port (topology A: one socket)

    # -- building nodes ----------------------------------------------------------------

    def _config(self, node: Node) -> str:
        data = self.tmp / node.name / "data"
        lines = [
            "[server]",
            'store = "postgres"',
            f'dsn = "{self.dsn}"',
            f'host = "{node.host}"',
            f"coap_port = {node.coap_port}",
            f"http_port = {node.http_port}",
            f'data_dir = "{data}"',
            'log_level = "info"',
            "[security]",
            "coaps_port = 0",
            "[registration]",
            "retry_after = 1",  # the Max-Age of a 5.03 to a Register
            "[api]",
            f'keys = ["{KEY}"]',
        ]
        if self.cluster:
            lines += [
                "[cluster]",
                f'node = "{node.name}"',
                f'link = "{node.host}:{node.link_port}"',
                f"lease_ttl = {self.lease_ttl}",
                f"slots = {self.slots}",
                f'secret = "{SECRET}"',
            ]
        return "\n".join(lines) + "\n" + self.settings

    def add(self, name: str) -> Node:
        """A new node (not started): the next address in topology B, 127.0.0.1 in A."""
        assert name not in self.nodes, name
        index = len(self.nodes)
        host = f"127.0.0.{index + 1}" if self.topology == "B" else "127.0.0.1"
        http_port, link_port = free_ports(2)
        if not self.cluster:
            host = "127.0.0.1"
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "node.toml"
        daemon = Daemon(["--config", str(config)], (host, http_port), folder / "node.log")
        node = Node(name, host, self.coap_port, http_port, link_port, daemon)
        config.write_text(self._config(node))
        self.nodes[name] = node
        return node

    async def start(self, *names: str, limit: float = 30.0) -> None:
        """Add (when new) and start the named nodes, one after another, each until ready."""
        for name in names:
            node = self.nodes.get(name) or self.add(name)
            node.down = node.ready = False
            for attempt in range(4):
                await node.daemon.start()
                try:
                    with trio.fail_after(limit):
                        await node.daemon.ready()
                    break
                except RuntimeError as exc:  # a port taken since free_ports: others new ones
                    node.daemon.proc = None
                    if "already in use" not in str(exc) or node.readies or attempt == 3:
                        raise
                    self._new_ports(node)
            node.ready = True
            node.readies += 1

    def _new_ports(self, node: Node) -> None:
        """Other ports for a node that never started (one of its ports was taken meanwhile);
        the cluster's CoAP port too while no node ever started."""
        node.http_port, node.link_port = free_ports(2)
        if not any(n.readies for n in self.nodes.values()):
            self.coap_port = free_ports(1)[0]
            for other in self.nodes.values():
                other.coap_port = self.coap_port
                (self.tmp / other.name / "node.toml").write_text(self._config(other))
        node.daemon.http = node.http
        (self.tmp / node.name / "node.toml").write_text(self._config(node))

    async def kill(self, name: str) -> float:
        """kill -9 the node (it stays down until `restart`); when it was killed."""
        node = self.nodes[name]
        node.down, node.ready = True, False
        at = trio.current_time()
        await node.daemon.kill()
        node.stopped = False
        return at

    def pause(self, name: str) -> float:
        """SIGSTOP the node; when."""
        node = self.nodes[name]
        os.kill(node.pid, signal.SIGSTOP)
        node.stopped = True
        return trio.current_time()

    def resume(self, name: str) -> float:
        """SIGCONT the node; when."""
        node = self.nodes[name]
        os.kill(node.pid, signal.SIGCONT)
        node.stopped = False
        return trio.current_time()

    async def restart(self, name: str, limit: float = 30.0) -> None:
        node = self.nodes[name]
        await node.daemon.kill()
        node.daemon.proc = None
        await self.start(name, limit=limit)

    async def close(self) -> None:
        """Kill every node; print the end of their logs (pytest shows it when a test fails)."""
        with trio.CancelScope(shield=True):
            for node in self.nodes.values():
                node.down = True
                proc = node.daemon.proc
                if proc is not None and node.stopped and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                await node.daemon.kill()
        print(self.logs())

    async def supervise(self, *, restart: bool = True) -> None:
        """Until cancelled: note every node that exits on its own, and restart it (as systemd
        with Restart=always) unless `restart` is False."""
        while True:
            for node in list(self.nodes.values()):
                proc = node.daemon.proc
                if node.down or proc is None or proc.poll() is None:
                    continue
                self.exits.append(Exit(node.name, proc.returncode or 0, trio.current_time()))
                node.daemon.proc, node.ready = None, False
                if restart:
                    self.restarts[node.name] += 1
                    with contextlib.suppress(RuntimeError, trio.TooSlowError):
                        await self.start(node.name)
                else:
                    node.down = True
            await trio.sleep(0.05)

    # -- the lease table ---------------------------------------------------------------

    def _leases_now(self) -> dict[int, str | None]:
        """Each slot's live owner now (None: free or expired), read from the database."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as pg:
            row = pg.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_name LIKE 'slot_lease%' ORDER BY table_name LIMIT 1"
            ).fetchone()
            if row is None:
                return {}
            table = str(row[0])
            cur = pg.execute(f"SELECT * FROM {table}")  # a name from the catalog
            names = [d.name for d in cur.description or ()]
            rows = cur.fetchall()
            now = pg.execute("SELECT clock_timestamp()").fetchone()
        assert now is not None
        expiry = next(i for i, n in enumerate(names) if "expire" in n)
        slot_i, node_i = names.index("slot"), names.index("node")
        return {
            int(r[slot_i]): (r[node_i] if r[node_i] is not None and r[expiry] > now[0] else None)
            for r in rows
        }

    async def leases(self) -> dict[int, str | None]:
        """Each slot's owner as the database says (a lease that expired: None)."""
        try:
            return await trio.to_thread.run_sync(self._leases_now)
        except psycopg.OperationalError:
            return {}

    async def settled(
        self, nodes: tuple[str, ...] | None = None, *, balanced: bool = True, limit: float = 30.0
    ) -> dict[int, str | None]:
        """Wait until every slot is held by one of `nodes` (default: the running ones) and,
        when `balanced`, each of them holds at least floor(slots / len(nodes)); the table."""
        if not self.cluster:
            return {}
        names = nodes or tuple(n.name for n in self.nodes.values() if n.running() and not n.down)
        floor = self.slots // len(names)
        with trio.fail_after(limit):
            while True:
                table = await self.leases()
                held = Counter(table.values())
                if (len(table) == self.slots and all(o in names for o in table.values())
                        and (not balanced or all(held[n] >= floor for n in names))):  # fmt: skip
                    return table
                await trio.sleep(0.1)

    async def owner_of(self, endpoint: str) -> str | None:
        return (await self.leases()).get(slot_of(endpoint, self.slots))

    async def home_of(self, key: str = KEY) -> str | None:
        """The node hosting the application's channel (the owner of its home slot)."""
        return (await self.leases()).get(home_slot(application_id(key), self.slots))

    # -- PostgreSQL --------------------------------------------------------------------

    async def stop_postgres(self) -> None:
        await trio.to_thread.run_sync(self.pg.stop, "immediate")

    async def start_postgres(self) -> None:
        await trio.to_thread.run_sync(self.pg.start)

    # -- HTTP --------------------------------------------------------------------------

    async def command(
        self, node: str, endpoint: str, async_id: str, body: dict[str, Any], *,
        limit: float = 15.0,
    ) -> int | None:  # fmt: skip
        """POST a device request to `node`'s API; the status (None: unknown, the connection
        broke after the request left, or no answer within `timeout`; never resent). A node
        that refuses the connection: NotSent."""
        target = f"/v2/device-requests/{endpoint}?async-id={async_id}&retry=5&expiry-seconds=120"
        try:
            with trio.fail_after(limit):
                return (await request(self.nodes[node].http, "POST", target, KEY, body))[0]
        except NotSent:
            raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, Exception):
            return None

    async def command_retried(
        self, node: str, endpoint: str, async_id: str, body: dict[str, Any], refusals: Counter[int]
    ) -> int | None:
        """`command`, sent again with the same async-id after a 503 or a refused connection
        (nothing was accepted: safe to repeat), 0.2 s apart, for up to 10 s; the last status.
        Each refusal is counted in `refusals` by status (-1: connection refused)."""
        status: int | None = None
        with trio.move_on_after(10):
            while True:
                try:
                    status = await self.command(node, endpoint, async_id, body)
                except NotSent:
                    status = -1
                if status not in (503, -1):
                    return status
                refusals[status] += 1
                await trio.sleep(0.2)
        return status

    def logs(self, tail: int = 3000) -> str:
        """The end of every node's log (for an assertion's message)."""
        return "\n".join(f"--- {n.name} ---\n{n.log()[-tail:]}" for n in self.nodes.values())


def names_owned(
    table: dict[int, str | None], owners: set[str], count: int, prefix: str, slots: int = SLOTS
) -> list[str]:
    """`count` endpoint names `prefix-k` whose slots `owners` hold in `table` (in turn)."""
    names: list[str] = []
    k = 0
    while len(names) < count:
        name = f"{prefix}-{k}"
        k += 1
        if table.get(slot_of(name, slots)) in owners:
            names.append(name)
        assert k < 100_000, f"no endpoint name owned by {owners}"
    return names


def put(value: str, path: str = "/3311/0/5750") -> dict[str, Any]:
    """A device request body: PUT `value` (text) to `path` (the device counts it by value)."""
    import base64

    return {"method": "PUT", "uri": path, "content-type": "text/plain",
            "payload-b64": base64.b64encode(value.encode()).decode()}  # fmt: skip


def execute(argument: str, path: str = "/3311/0/5523") -> dict[str, Any]:
    """A device request body: Execute `path` with `argument` as its argument text."""
    import base64

    return {"method": "POST", "uri": path, "content-type": "text/plain",
            "payload-b64": base64.b64encode(argument.encode()).decode()}  # fmt: skip


# -- the device -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Datagram:
    """One datagram the device received: when (trio.current_time()), from where, what."""

    at: float
    source: tuple[str, int]
    message: Message | None


@dataclass
class Device:
    """A small LwM2M device on its own UDP socket (see the module's docstring).

    Attributes:
        server: where it sends its Register and Updates.
        delay: seconds between executing a request and sending its answer.
        asleep: drop (but record) every datagram while set (queue mode's sleep).
    """

    name: str
    server: tuple[str, int]
    queue: bool = False
    lifetime: int = 300
    delay: float = 0.0
    asleep: bool = False
    received: list[Datagram] = field(default_factory=list)
    executed: Counter[tuple[str, str, bytes]] = field(default_factory=Counter)
    requests: list[tuple[float, tuple[str, int], str, str, bytes]] = field(default_factory=list)
    location: str | None = None
    ignore: set[tuple[str, int]] = field(default_factory=set)  # sources recorded, not answered
    transmissions: Counter[str] = field(default_factory=Counter)  # per own request kind
    _sock: socket.socket | None = None
    _dedup: dict[tuple[tuple[str, int], int], bytes | None] = field(default_factory=dict)
    _waiting: dict[bytes, trio.MemorySendChannel[Message]] = field(default_factory=dict)
    _acked: set[int] = field(default_factory=set)
    _mid: int = field(default_factory=lambda: random.randrange(0x10000))
    _nursery: trio.Nursery | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        host, port = self._sock.getsockname()[:2]
        return (str(host), int(port))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the socket and answer what arrives, until cancelled."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(("127.0.0.1", 0))
        with trio.socket.from_stdlib_socket(self._sock) as sock:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    data, source = await sock.recvfrom(65536)
                    self._receive(data, (str(source[0]), int(source[1])))

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _receive(self, data: bytes, source: tuple[str, int]) -> None:
        now = trio.current_time()
        try:
            msg: Message | None = decode(data)
        except DecodeError:
            msg = None
        self.received.append(Datagram(now, source, msg))
        if msg is None or self.asleep or source in self.ignore:
            return
        if msg.mtype == _ACK or (msg.code >= 64 and msg.mtype in (_CON, _NON)):
            if msg.mtype == _ACK:
                self._acked.add(msg.mid)
            if msg.mtype == _CON:  # a separate response: acknowledge it
                self._send(encode(Message(_ACK, 0, msg.mid)), source)
            waiting = self._waiting.get(msg.token)
            if msg.code >= 64 and waiting is not None:
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    waiting.send_nowait(msg)
            return
        if msg.mtype == _RST or msg.code == 0:
            if msg.mtype == _CON:  # a CoAP ping
                self._send(encode(Message(_RST, 0, msg.mid)), source)
            return
        self._request(msg, source, now)

    def _request(self, msg: Message, source: tuple[str, int], now: float) -> None:
        key = (source, msg.mid)
        if key in self._dedup:  # a duplicate: the cached answer again (or nothing yet)
            cached = self._dedup[key]
            if cached is not None:
                self._send(cached, source)
            return
        self._dedup[key] = None
        method = _METHODS.get(msg.code, str(msg.code))
        path = "/" + "/".join(msg.uri_path)
        self.requests.append((now, source, method, path, msg.payload))
        if method == "GET":
            code, payload = Code.CONTENT.value, b"0"
        else:
            self.executed[(method, path, msg.payload)] += 1
            code = {"PUT": Code.CHANGED, "POST": Code.CHANGED, "DELETE": Code.DELETED}.get(
                method, Code.CHANGED
            ).value
            payload = b""
        options = ((_CONTENT_FORMAT, uint_bytes(ContentFormat.TEXT.value)),) if payload else ()
        mtype, mid = (_ACK, msg.mid) if msg.mtype == _CON else (_NON, self._next_mid())
        reply = encode(Message(mtype, code, mid, msg.token, options, payload))
        if self.delay > 0 and self._nursery is not None:
            self._nursery.start_soon(self._answer_later, key, reply, source, self.delay)
        else:
            self._dedup[key] = reply
            self._send(reply, source)

    async def _answer_later(
        self, key: tuple[tuple[str, int], int], reply: bytes, source: tuple[str, int], delay: float
    ) -> None:
        await trio.sleep(delay)
        self._dedup[key] = reply
        if not self.asleep:
            self._send(reply, source)

    def _send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self._sock is not None
        with contextlib.suppress(OSError):
            self._sock.sendto(data, to)

    async def _exchange(
        self, kind: str, options: tuple[tuple[int, bytes], ...], payload: bytes,
        attempts: int = 5,
    ) -> Message | None:  # fmt: skip
        """A CON POST to the server, retransmitted (2 s, doubling) until answered; the
        response, or None after `attempts` transmissions."""
        token = os.urandom(4)
        mid = self._next_mid()
        data = encode(Message(_CON, Code.POST.value, mid, token, options, payload))
        send, receive = trio.open_memory_channel[Message](4)
        self._waiting[token] = send
        try:
            timeout = 2.0
            for _ in range(attempts):
                if mid not in self._acked:
                    self._send(data, self.server)
                    self.transmissions[kind] += 1
                with trio.move_on_after(timeout):
                    return await receive.receive()
                timeout *= 2
            return None
        finally:
            del self._waiting[token]

    async def register(self, attempts: int = 5, refusals: int = 5) -> Message | None:
        """Register (each Register retransmitted up to `attempts` times); a 5.03 is tried
        again after its Max-Age (at most 5 s), at most `refusals` times, as a client does."""
        query = f"ep={self.name}&lt={self.lifetime}&lwm2m=1.1&b=U" + ("&Q" if self.queue else "")
        options = (
            *path_options("rd"),
            (_CONTENT_FORMAT, uint_bytes(ContentFormat.LINK_FORMAT.value)),
            *query_options(query),
        )
        for _ in range(refusals):
            answer = await self._exchange("register", options, b"</3311/0>,</3/0>", attempts)
            if answer is None or answer.code != Code.SERVICE_UNAVAILABLE.value:
                break
            self.transmissions["register 5.03"] += 1
            await trio.sleep(min(answer.max_age, 5))
        if answer is not None and answer.code == Code.CREATED.value:
            self.location = "/".join(answer.location_path)
        return answer

    async def update(self, attempts: int = 5) -> Message | None:
        assert self.location is not None, "not registered"
        answer = await self._exchange("update", path_options(self.location), b"", attempts)
        return answer

    def poke(self, to: tuple[str, int]) -> None:
        """Send one Update to `to` once, never retransmitted nor awaited."""
        assert self.location is not None, "not registered"
        options = path_options(self.location)
        self._send(
            encode(Message(_CON, Code.POST.value, self._next_mid(), os.urandom(4), options)), to
        )

    def requests_from(
        self, source: tuple[str, int] | None = None, after: float = 0.0, value: str | None = None
    ) -> list[Datagram]:
        """The requests (not answers) received from `source` (any) after `after` (carrying
        `value`, if given), answered or not."""
        return [d for d in self.received if (source is None or d.source == source)
                and d.at > after and d.message is not None and 0 < d.message.code < 32
                and (value is None or d.message.payload == value.encode())]  # fmt: skip

    def trace(self, value: str) -> list[str]:
        """Every datagram received carrying `value`: when, from where, type, MID, token."""
        return [f"{d.at:.2f} {d.source[0]}:{d.source[1]} t{d.message.mtype} mid {d.message.mid} "
                f"token {d.message.token.hex()}" for d in self.received
                if d.message is not None and d.message.payload == value.encode()]  # fmt: skip

    def executions(self, value: str) -> int:
        """How many times a request carrying `value` (PUT or Execute) was executed."""
        return sum(n for (_, _, payload), n in self.executed.items() if payload == value.encode())

    def sources(self) -> Counter[tuple[str, int]]:
        return Counter(d.source for d in self.received)


async def register_all(devices: list[Device], limit: float = 20.0) -> None:
    """Register every device (in parallel); fails when one is not answered 2.01."""
    codes: dict[str, int | None] = {}

    async def one(device: Device) -> None:
        answer = await device.register()
        codes[device.name] = None if answer is None else answer.code

    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            for device in devices:
                nursery.start_soon(one, device)
    bad = {n: c for n, c in codes.items() if c != Code.CREATED.value}
    assert not bad, f"Registers not answered 2.01: {bad}"


async def wait_for(predicate: Any, limit: float, step: float = 0.05) -> bool:
    """Poll `predicate()` until true or `timeout` s passed; whether it became true."""
    with trio.move_on_after(limit):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(step)
        return True
    return False


# -- the verdict ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the application was told (async-id -> POST status; None: unknown) and which
    device and value each command carries."""

    status: dict[str, int | None] = field(default_factory=dict)  # -1: connection refused
    target: dict[str, tuple[Device, str]] = field(default_factory=dict)
    at: dict[str, float] = field(default_factory=dict)  # when the POST was answered
    sent: dict[str, float] = field(default_factory=dict)  # when it was sent (post_stream)
    via: dict[str, str] = field(default_factory=dict)  # the node it was posted to (post_stream)

    def accepted(self) -> list[str]:
        return [a for a, s in self.status.items() if s == 202]

    def note(self, async_id: str, device: Device, value: str, status: int | None) -> None:
        self.status[async_id] = status
        self.target[async_id] = (device, value)
        self.at[async_id] = trio.current_time()

    def odd(self, since: float = 0.0) -> list[tuple[str, str, float, int | None]]:
        """The POSTs answered neither 202 nor 503: (async-id, node, sent - since, status)."""
        return [(a, self.via.get(a, "?"), round(self.sent.get(a, self.at[a]) - since, 2), s)
                for a, s in self.status.items() if s not in (202, 503)]  # fmt: skip

    def between(self, start: float, end: float, answered: bool = False) -> Counter[int | None]:
        """The statuses of the POSTs sent (or, `answered`, answered) between `start` and `end`."""
        when = self.at if answered or not self.sent else self.sent
        return Counter(s for a, s in self.status.items() if start <= when[a] <= end)


async def post_stream(
    cluster: Cluster, devices: list[Device], ledger: Ledger, stop: trio.Event,
    pause: float = 0.1, prefix: str = "s",
) -> None:  # fmt: skip
    """Until `stop`: every `pause` s a PUT to the next device in turn, posted to the next node
    that became ready once and was not killed (one that exited on its own is still tried:
    refused, -1), each in its own task (one that waits for a store does not hold the others
    back; at most 64 at once); every answer noted (never resent). Returns when all answered."""
    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(64)
        i = 0
        while not stop.is_set():
            live = [n for n in cluster.nodes.values() if not n.down and n.readies]
            node, device = live[i % len(live)], devices[i % len(devices)]
            nursery.start_soon(
                _post_one, cluster, node.name, device, f"{prefix}{i}", ledger, limiter
            )
            i += 1
            await trio.sleep(pause)


async def _post_one(
    cluster: Cluster, node: str, device: Device, async_id: str, ledger: Ledger,
    limiter: trio.CapacityLimiter,
) -> None:  # fmt: skip
    async with limiter:
        ledger.sent[async_id], ledger.via[async_id] = trio.current_time(), node
        try:
            status = await cluster.command(node, device.name, async_id, put(async_id))
        except NotSent:
            status = -1
        ledger.note(async_id, device, async_id, status)


def distinct_slots(count: int, prefix: str, slots: int = SLOTS) -> list[str]:
    """`count` endpoint names `prefix-k` whose slots all differ."""
    names: dict[int, str] = {}
    k = 0
    while len(names) < count:
        names.setdefault(slot_of(f"{prefix}-{k}", slots), f"{prefix}-{k}")
        k += 1
    return list(names.values())


def verdict(ledger: Ledger, inbox: Inbox, summary: str = "") -> str:
    """Assert the invariants of every scenario: each accepted async-id has exactly one
    AsyncIDResponse, and its command ran exactly once on its device; a command refused ran
    never, one whose status is unknown at most once; no response to a command never sent.
    The summary line (printed by the caller)."""
    accepted = ledger.accepted()
    missing = [a for a in accepted if not inbox.arrivals.get(a)]
    repeated = {a: [(round(x.at, 2), x.message) for x in c]
                for a, c in inbox.arrivals.items() if len(c) > 1}  # fmt: skip
    strays = [a for a in inbox.arrivals if a not in ledger.status]
    runs = {a: d.executions(v) for a, (d, v) in ledger.target.items()}
    twice = {a: n for a, n in runs.items() if n > 1}
    not_run = [a for a in accepted if runs[a] != 1]
    refused_ran = [a for a, s in ledger.status.items() if s not in (202, None) and runs[a]]
    line = (f"{len(ledger.status)} POSTs {dict(Counter(ledger.status.values()))}; accepted "
            f"{len(accepted)}, answered {len(accepted) - len(missing)}, missing {missing[:20]}, "
            f"repeated {repeated}, strays {strays}, executed twice {twice}, accepted but not run "
            f"once {not_run[:20]}, refused yet run {refused_ran}, {inbox.kinds}")  # fmt: skip
    traces = [f"{a} to {ledger.target[a][0].name}: {ledger.target[a][0].trace(ledger.target[a][1])}"
              for a in {*missing, *twice, *not_run}]  # fmt: skip
    full = "\n".join([line, *traces, summary])
    assert not missing, f"lost AsyncIDResponses: {full}"
    assert not repeated, f"AsyncIDResponses received twice: {full}"
    assert not strays, f"responses to commands never sent: {full}"
    assert not twice, f"executed twice: {full}"
    assert not not_run, f"accepted, answered, but not executed exactly once: {full}"
    assert not refused_ran, f"refused, yet executed: {full}"
    return line
