"""A mutation fuzzer at the server level: hostile datagrams and TCP messages into a real
`Supervisor` and its device actors, in virtual time.

The inputs are seeded from the real clients' bytes in `tests/vectors/` and from what the server
itself sends (its requests are answered, sometimes wrongly), then mutated: bit flips,
truncation, byte replacement, insertion, deletion, splicing, option delta and length extremes
(the 13/14/15 nibbles and their extended forms), token lengths 9-15, replays of earlier
Message IDs from bound addresses (peers that registered first), Registers with hostile `ep`,
`lt`, `b`, `lwm2m` values and link-format payloads, interleaved with valid Registers, Updates,
De-registers, commands submitted through the in-process API, ICMP unreachable reports, TCP
messages on connections that come and go, and a store whose commits are held back and then
released (a slow disk).

Inputs are fed in bursts, synchronously, exactly as the UDP endpoint hands a batch of up to 256
datagrams to `Supervisor.on_datagram`; the actors and the supervisor's tasks then run until
they are all blocked (`wait_all_tasks_blocked`), and sometimes the virtual clock moves on (so
retransmissions, lifetimes and reply caches expire).

The run is a series of episodes, each with a fresh supervisor. The invariant: no exception
leaves the supervisor (one would end the real process), bounded structures stay bounded, and
at the end of each episode a healthy device still registers (2.01) and has a command answered
(its AsyncIDResponse published). An episode that breaks it is a `Crash`, kept with the
concrete inputs of the episode; `minimize` cuts them down to a short reproducer by replaying
subsets (delta debugging).

Used by `tests/adversarial/test_fuzz_server.py` (a bounded run in CI) and `bench/fuzz.py` (the
long run, `--datagrams N`).
"""

from __future__ import annotations

import json
import logging
import random
import re
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

import dm_actor.actors.registrar as registrar_module
import dm_actor.actors.registry as registry_module
from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Accepted, Supervisor
from dm_actor.coap import framing_tcp
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message, decode, encode, path_options, uint_bytes
from dm_actor.config import Settings
from dm_actor.lwm2m.errors import Lwm2mError
from dm_actor.store.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

VECTORS = Path(__file__).resolve().parent.parent / "vectors"

Address = tuple[str, int]
#: One concrete input: ("udp", addr, bytes), ("tcp", conn, bytes of one frame),
#: ("close", conn, b""), ("icmp", addr, b""), ("submit", ep, "METHOD uri"), ("subscribe", ep,
#: b"path"), ("unsubscribe", ep, b"path"), ("gate",), ("commit",),
#: ("settle",), ("sleep", seconds)
Op = tuple[Any, ...]

_CON, _NON, _ACK, _RST = 0, 1, 2, 3
_POST, _GET, _PUT, _DELETE = 2, 1, 3, 4
_URI_QUERY, _CONTENT_FORMAT, _OBSERVE, _BLOCK2, _ETAG, _SIZE2 = 15, 12, 6, 23, 4, 28
# bytes that sit on the codec's decision points: nibbles 12..15, the payload marker, empty
_INTERESTING = (0x00, 0x01, 0x0C, 0x0D, 0x0E, 0x0F, 0xC0, 0xD0, 0xE0, 0xF0, 0xFF, 0x7F, 0x80)
_OBJECTS = b'</>;rt="oma.lwm2m";ct=110,</1/0>,</3/0>,</3303/0>,</3311/0>'

HOSTILE_EPS: tuple[bytes, ...] = (
    b"", b"a" * 64, b"b" * 255, b"c" * 1000, b"\x00", b"ep\x00x", b"../../etc/passwd", b"/",
    b"..", b"a/b", b"%00", b"%2F", b" ", b"\t", b"\r\n", b"\xc3\xa9", b"\xe2\x80\xae",
    b"\xff\xfe", b"\xc3", b"ep&lt=1", b"ep=x", b"*", b"sub:1", b"healthy", b"\x7f",
    b"<script>", b"'; DROP TABLE registrations; --", b"dev-0", b"dev-1",
)  # fmt: skip
HOSTILE_LT = (b"", b"0", b"-1", b"1", b"30", b"60", b"86400", b"4294967295", b"4294967296",
              b"99999999999999999999", b"abc", b"1e3", b" 60", b"0x10")  # fmt: skip
HOSTILE_B = (b"U", b"UQ", b"T", b"", b"Q", b"XYZ", b"S", b"N", b"TQ", b"UU", b"\x00")
HOSTILE_LWM2M = (b"1.0", b"1.1", b"1.2", b"2.0", b"", b"x", b"1.1.1", b"\xff")
HOSTILE_LINKS = (
    b"", b"<", b"</>", b"</3/0>" * 400, b"</65536/0>", b"</3/99999999999>", b'</3/0>;ver="',
    b"\xff\xfe", b"<//>", b"</3/0/0/0>", b"</a/b>", b"</3/0>,,,,", b"</0/0>,</1/0>", b",",
    b'</>;rt="oma.lwm2m";ct=110', b"</3/0>;" + b"a" * 500, b"</3>", b"</3/0>,</3/0>",
    b"</1/0>,</3/0>,</3303/0>,</3311/0>", b"</10>;ver=9.9", b"</3/0>;ct=\xff",
)  # fmt: skip
RESPONSE_CODES = (0x45, 0x44, 0x41, 0x42, 0x43, 0x80, 0x84, 0x85, 0x86, 0x8D, 0x8F, 0xA0,
                  0xA3, 0x5F, 0x7F, 0xFF, 0x00, 0x01, 0x02, 0xE1)  # fmt: skip
CONTENT_FORMATS = (None, 0, 11542, 11543, 110, 112, 40, 60, 42, 1541, 11544, 65535, 0xFFFFFF)


# -- seeds --------------------------------------------------------------------------------------


def _records(transport: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if json.loads(lines[0])["transport"] == transport:
            records.extend(json.loads(line) for line in lines[1:] if line)
    return records


def udp_seeds() -> list[bytes]:
    """Every datagram of the UDP captures, both directions."""
    return [bytes.fromhex(str(r["hex"])) for r in _records("udp")]


def tcp_seeds() -> list[bytes]:
    """Every frame of the TCP capture (both directions), one frame's bytes each."""
    frames: list[bytes] = []
    by_direction: dict[int, bytes] = {}
    for r in _records("tcp"):
        key = int(r["src_port"])
        by_direction[key] = by_direction.get(key, b"") + bytes.fromhex(str(r["hex"]))
    for stream in by_direction.values():
        decoder = framing_tcp.StreamDecoder()
        decoder.receive_data(stream)
        try:
            while (msg := decoder.next_message()) is not None:
                frames.append(framing_tcp.encode(msg))
        except DecodeError:
            pass
    return frames


def response_payloads(seeds: Sequence[bytes]) -> list[bytes]:
    """The payloads of the devices' answers in the captures (TLV, SenML, text, ...)."""
    out: list[bytes] = []
    for data in seeds:
        try:
            msg = decode(data)
        except DecodeError:
            continue
        if msg.code >= 0x40 and msg.payload:
            out.append(msg.payload)
    return out or [b"42"]


# -- mutations ----------------------------------------------------------------------------------


class Mutator:
    """Byte-level mutations of one input (the header-aware ones know the CoAP layout)."""

    def __init__(self, rng: random.Random, seeds: Sequence[bytes]) -> None:
        self.rng = rng
        self.seeds = list(seeds)

    def mutate(self, data: bytes, *, tcp: bool = False) -> bytes:
        rng = self.rng
        kind = rng.randrange(11)
        if not data:
            return rng.randbytes(rng.randint(0, 12))
        b = bytearray(data)
        if kind == 0:  # bit flips
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del b[rng.randrange(len(b)) :]
        elif kind == 2:  # byte replacement, random or on a decision point
            for _ in range(rng.randint(1, 3)):
                pick = rng.randrange(256) if rng.random() < 0.5 else rng.choice(_INTERESTING)
                b[rng.randrange(len(b))] = pick
        elif kind == 3:  # insertion
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 6))
        elif kind == 4:  # deletion of a short run
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
        elif kind == 5:  # splicing with another seed
            other = rng.choice(self.seeds)
            b = bytearray(data[: rng.randrange(len(data) + 1)])
            b += other[rng.randrange(len(other) + 1) :]
        elif kind == 6:  # token length 9..15 (reserved), the rest unchanged
            b[0] = (b[0] & 0xF0) | rng.randint(9, 15)
        elif kind == 7:  # an option with an extreme delta or length
            return self._option_extreme(data, tcp=tcp)
        elif kind == 8:  # a flip in the header (the first 16 bytes)
            b[rng.randrange(min(16, len(b)))] ^= 1 << rng.randrange(8)
        elif kind == 9:  # the code byte: any class, signalling, empty
            b[min(len(b) - 1, 1)] = rng.randrange(256)
        else:  # random bytes after the header
            b = bytearray(data[:4] + rng.randbytes(rng.randint(0, 40)))
        return bytes(b)

    def _option_extreme(self, data: bytes, *, tcp: bool) -> bytes:
        rng = self.rng
        delta_nibble = rng.choice((12, 13, 14, 15))
        length_nibble = rng.choice((0, 12, 13, 14, 15))
        opt = bytearray((delta_nibble << 4 | length_nibble,))
        for nibble in (delta_nibble, length_nibble):
            if nibble == 13:
                opt.append(rng.choice((0, 1, 0xFE, 0xFF)))
            elif nibble == 14:
                opt += rng.choice((b"\x00\x00", b"\xff\xff", b"\xfe\xf2", b"\x01\x00"))
        value_len = rng.choice((0, 1, 13, 268, 269, 1024, 4000))
        opt += rng.randbytes(value_len) if rng.random() < 0.5 else b"\x00" * value_len
        if tcp:  # the frame's code and token, then the option (the length covers it)
            try:
                decoder = framing_tcp.StreamDecoder()
                decoder.receive_data(data)
                msg = decoder.next_message()
            except DecodeError:
                msg = None
            if msg is None:
                return data + bytes(opt)
            return tcp_frame(msg.code, msg.token, bytes(opt))
        tkl = data[0] & 0x0F
        at = min(len(data), 4 + min(tkl, 8))
        return data[:at] + bytes(opt) + data[at:]


# -- the fake transports ------------------------------------------------------------------------


class FakeConn:
    """A CoAP-over-TCP connection as the supervisor sees it; what is sent to it is kept."""

    __slots__ = ("frames", "index", "peer")

    def __init__(self, index: int, peer: Address) -> None:
        self.index = index
        self.peer = peer
        self.frames: deque[bytes] = deque(maxlen=16)

    def send_frame_nowait(self, frame: bytes) -> None:
        self.frames.append(frame)


@dataclass
class Peer:
    """A client address (UDP) or connection (TCP) and what the fuzzer knows about it."""

    addr: Address
    conn: FakeConn | None = None
    mid: int = 0
    ep: bytes = b"dev"
    location: tuple[str, ...] = ()
    history: deque[bytes] = field(default_factory=lambda: deque(maxlen=64))
    requests: deque[Message] = field(default_factory=lambda: deque(maxlen=8))
    observations: deque[bytes] = field(default_factory=lambda: deque(maxlen=8))

    def next_mid(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid


@contextmanager
def seeded_secrets(rng: random.Random) -> Iterator[None]:
    """The supervisor's registration ids, Message IDs and tokens from `rng` (reproducible)."""

    class _Secrets:
        @staticmethod
        def randbits(k: int) -> int:
            return rng.getrandbits(k)

        @staticmethod
        def token_hex(n: int = 6) -> str:
            return rng.randbytes(n).hex()

    namespaces = [vars(registry_module), vars(registrar_module)]  # the modules that draw
    saved = [namespace["secrets"] for namespace in namespaces]
    for namespace in namespaces:
        namespace["secrets"] = _Secrets
    try:
        yield
    finally:
        for namespace, module in zip(namespaces, saved, strict=True):
            namespace["secrets"] = module


class GateStore(MemoryStore):
    """A memory store whose commits the fuzzer holds back (a slow disk) and releases."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.committed = 0
        self._event = trio.Event()

    def commit(self) -> None:
        self.committed = self.writes
        self._event.set()
        self._event = trio.Event()

    def mark(self) -> int:
        return self.writes

    def is_durable(self, mark: int) -> bool:
        return not self.gated or mark <= self.committed

    def backlog(self) -> int:
        return 0 if not self.gated else self.writes - self.committed

    async def durable(self, mark: int | None = None) -> None:
        target = self.writes if mark is None else mark
        while not self.is_durable(target):
            await self._event.wait()

    def open(self) -> None:
        self.gated = False
        self.commit()


# -- results ------------------------------------------------------------------------------------


@dataclass
class Crash:
    """An episode that broke the invariant: what was raised, and the inputs that led there."""

    signature: str
    traceback: str
    ops: list[Op]
    seed: int

    def reproducer(self, limit: int = 80) -> str:
        lines = [f"{len(self.ops)} inputs (seed {self.seed}):"]
        lines.extend("  " + describe(op) for op in self.ops[:limit])
        if len(self.ops) > limit:
            lines.append(f"  ... {len(self.ops) - limit} more")
        return "\n".join(lines)


def describe(op: Op) -> str:
    kind = op[0]
    if kind in ("udp", "tcp"):
        return f"{kind} {op[1]} {op[2].hex()}"
    return " ".join(str(x) for x in op)


@dataclass
class Totals:
    datagrams: int = 0  # UDP datagrams handed to on_datagram
    tcp_messages: int = 0  # messages handed to on_tcp_message
    episodes: int = 0
    bursts: int = 0
    submits: int = 0
    healthy_checks: int = 0
    decode_errors: int = 0
    registrations: int = 0
    device_errors: int = 0  # a device's bytes ended its registration (DecodeError, Lwm2mError)
    peer_errors: int = 0  # the supervisor's count of contained exceptions (both kinds)
    #: exceptions that escaped (the process would have ended) or bugs the crash boundary
    #: contained (signature starting "contained"), or a broken invariant
    crashes: list[Crash] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        return self.datagrams + self.tcp_messages

    def signatures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.crashes:
            out[c.signature] = out.get(c.signature, 0) + 1
        return out


class InvariantBroken(AssertionError):
    """A bound was exceeded or the healthy device was not served."""


def signature(exc: BaseException) -> str:
    """What identifies a crash: the innermost exception's type, message without numbers,
    and the innermost frame in dm_actor."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if "/dm_actor/" in frame.filename:
            where = f"{Path(frame.filename).name}:{frame.name}"
    text = re.sub(r"\d+", "N", re.sub(r"\b[0-9a-f]{6,}\b", "H", str(exc)))[:120]
    return f"{type(exc).__name__}: {text} @ {where}"


# -- one episode --------------------------------------------------------------------------------


class Episode:
    """One supervisor, its actors, and a stream of hostile inputs (generated or replayed)."""

    def __init__(self, rng: random.Random, seeds: list[bytes], tcp: list[bytes],
                 payloads: list[bytes], peers: int = 8) -> None:  # fmt: skip
        self.rng = rng
        self.mutator = Mutator(rng, seeds)
        self.seeds = seeds
        self.tcp_seeds = tcp
        self.payloads = payloads
        self.store = GateStore()
        self.events = EventStream()
        self.sup = Supervisor(Settings(), store=self.store, events=self.events)
        self.sup.attach_udp(self._udp_send)
        self.contained: list[tuple[str, str]] = []  # (signature, traceback) of contained bugs
        self.crash_at: int | None = None  # inputs executed when the first bug was contained
        self.device_errors = 0  # DecodeError / Lwm2mError a device's bytes caused (expected)
        original = getattr(self.sup.registry, "contain", None)
        if original is not None:

            def contain(actor: Any, exc: Exception, where: str) -> None:
                if isinstance(exc, DecodeError | Lwm2mError):
                    self.device_errors += 1
                else:
                    text = "".join(traceback.format_exception(exc))
                    self.contained.append((signature(exc), f"while handling {where}:\n{text}"))
                    if self.crash_at is None:
                        self.crash_at = len(self.ops)
                original(actor, exc, where)

            self.sup.registry.contain = contain  # type: ignore[method-assign]
        self.sent: dict[Address, deque[bytes]] = {}
        self.peers = [Peer(("127.0.0.1", 40000 + i), mid=rng.randrange(65536),
                           ep=b"dev-%d" % (i % 5)) for i in range(peers)]  # fmt: skip
        self.conns: list[FakeConn] = []
        self.tcp_peers: list[Peer] = []
        self.ops: list[Op] = []
        self.totals = Totals()
        self.answers: list[dict[str, object]] = []  # the healthy device's AsyncIDResponses
        self.watched: set[Any] = set()  # addresses whose datagrams `healthy` reads itself
        self.addresses: set[Any] = set()  # every UDP source address used so far
        self._submit_no = 0
        self._pending_between: list[Op] = []
        self._stormed = False  # at most one storm per episode
        self._nursery: trio.Nursery | None = None

    def _udp_send(self, data: bytes, addr: Any) -> None:
        box = self.sent.get(addr)
        if box is None:
            box = self.sent[addr] = deque(maxlen=16)
        box.append(data)

    # -- executing concrete inputs ---------------------------------------------------------

    async def execute(self, op: Op) -> None:
        """Run one concrete input against the supervisor (recorded for a reproducer)."""
        self.ops.append(op)
        kind = op[0]
        sup = self.sup
        if kind == "udp":
            self.totals.datagrams += 1
            self.addresses.add(op[1])
            sup.on_datagram(op[2], op[1])
        elif kind == "tcp":
            conn = self._conn(op[1])
            decoder = framing_tcp.StreamDecoder()
            decoder.receive_data(op[2])
            try:
                msg = decoder.next_message()
            except DecodeError:
                return  # the listener Aborts such a stream: the supervisor never sees it
            if msg is None or msg.code == 0 or msg.code >= 0xE0:
                return  # incomplete, empty or signalling: the listener's business
            self.totals.tcp_messages += 1
            sup.on_tcp_message(conn, msg)
        elif kind == "close":
            sup.on_tcp_closed(self._conn(op[1]))
        elif kind == "icmp":
            sup.on_unreachable(op[1])
        elif kind == "submit":
            method, _, uri = op[2].partition(" ")
            assert self._nursery is not None
            self._submit_no += 1
            self.totals.submits += 1
            self._nursery.start_soon(self._submit, op[1], method, uri, f"f{self._submit_no}")
        elif kind == "subscribe":
            assert self._nursery is not None
            self._nursery.start_soon(self._subscribe, op[1], op[2].decode())
        elif kind == "unsubscribe":
            self.sup.unsubscribe(op[1], op[2].decode(), "fuzz")
        elif kind == "commit":
            self.store.commit()
        elif kind == "gate":
            self.store.gated = True
        elif kind == "settle":
            await self.settle()
        elif kind == "sleep":
            await trio.sleep(op[1])
            await self.settle()

    def _conn(self, index: int) -> FakeConn:
        while len(self.conns) <= index:
            n = len(self.conns)
            self.conns.append(FakeConn(n, ("127.0.0.3", 30000 + n)))
        return self.conns[index]

    async def _submit(self, ep: str, method: str, uri: str, async_id: str) -> None:
        payload = b"1" if method in ("PUT", "POST") else b""
        await self.sup.submit(ep, method, uri, async_id=async_id, payload=payload,
                              content_format=0 if payload else None)  # fmt: skip

    async def _subscribe(self, ep: str, path: str) -> None:
        await self.sup.subscribe(ep, path, "fuzz")

    async def settle(self) -> None:
        """Let the actors and the supervisor's tasks run until all are blocked, then read
        what was sent and check the bounds."""
        await trio.testing.wait_all_tasks_blocked()
        self._collect()
        self.check_bounds()

    def _collect(self) -> None:
        by_addr = {p.addr: p for p in self.peers}
        for addr, box in self.sent.items():
            peer = by_addr.get(addr)
            if peer is None:
                if addr not in self.watched:
                    box.clear()
                continue
            while box:
                self._learn(peer, box.popleft())
        for peer in self.tcp_peers:
            assert peer.conn is not None
            frames = peer.conn.frames
            while frames:
                decoder = framing_tcp.StreamDecoder()
                decoder.receive_data(frames.popleft())
                msg = decoder.next_message()
                if msg is not None:
                    self._learn_msg(peer, msg)
        for kind, item, _, _ in self.events.take(100_000):
            if (
                kind == "async-responses"
                and isinstance(item, dict)
                and str(item.get("id", "")).startswith("health")
            ):
                self.answers.append(item)

    def _learn(self, peer: Peer, data: bytes) -> None:
        try:
            msg = decode(data)
        except DecodeError as exc:  # the server must only send what decodes
            raise InvariantBroken(f"the server sent an undecodable datagram {data.hex()}") from exc
        self._learn_msg(peer, msg)

    def _learn_msg(self, peer: Peer, msg: Message) -> None:
        if msg.code == 0x41 and msg.location_path:
            peer.location = msg.location_path
        elif 1 <= msg.code <= 31:
            peer.requests.append(msg)
            if msg.observe == 0:
                peer.observations.append(msg.token)

    def check_bounds(self) -> None:
        sup = self.sup
        if len(sup._replies) > sup._reply_cache_size:
            raise InvariantBroken(f"reply cache {len(sup._replies)} > {sup._reply_cache_size}")
        for actor in sup.by_endpoint.values():
            if len(actor.mailbox) > sup.mailbox_size:
                raise InvariantBroken(f"mailbox of {actor.endpoint!r}: {len(actor.mailbox)}")
        addresses = len(self.addresses)
        if len(sup.by_addr) > addresses:
            raise InvariantBroken(f"{len(sup.by_addr)} bound addresses > {addresses}")

    # -- the healthy device ------------------------------------------------------------------

    async def healthy(self, n: int) -> None:
        """A well-behaved device registers and a command to it is answered.

        Raises:
            InvariantBroken: no 2.01, no request, or no AsyncIDResponse.
        """
        self.store.open()
        await self.settle()
        addr = ("127.0.0.9", 9000 + n % 1000)
        ep = f"healthy-{n}"
        reg = register_message(0x2000 + n % 1000, b"hl", f"ep={ep}&lt=86400&lwm2m=1.1&b=U")
        self.sent.pop(addr, None)
        self.watched.add(addr)
        self.addresses.add(addr)
        self.sup.on_datagram(reg, addr)
        await self.settle()
        answers = [decode(d) for d in self.sent.get(addr, ())]
        if not any(m.code == 0x41 for m in answers):
            raise InvariantBroken(f"healthy device {ep}: no 2.01 (got {answers})")
        self.sent[addr].clear()
        result = await self.sup.submit(ep, "GET", "/3/0/0", async_id=f"health{n}")
        if not isinstance(result, Accepted):
            raise InvariantBroken(f"healthy device {ep}: command refused {result}")
        await self.settle()
        requests = [m for m in map(decode, self.sent.get(addr, ())) if m.code == _GET]
        if not requests:
            raise InvariantBroken(f"healthy device {ep}: the command was not sent")
        req = requests[-1]
        self.sup.on_datagram(encode(Message(_ACK, 0x45, req.mid, req.token,
                                            ((_CONTENT_FORMAT, b""),), b"ok")), addr)  # fmt: skip
        await self.settle()
        for item in self.answers:
            if item.get("id") == f"health{n}":
                if item.get("status") != 200:
                    raise InvariantBroken(f"healthy device {ep}: answered {item}")
                self.totals.healthy_checks += 1
                self.sup.on_datagram(
                    encode(Message(_CON, _DELETE, 0x3000 + n % 1000, b"hd",
                                   path_options("/" + "/".join(answers[0].location_path)))),
                    addr,
                )  # fmt: skip
                await self.settle()
                return
        raise InvariantBroken(f"healthy device {ep}: no AsyncIDResponse")

    # -- generating inputs -------------------------------------------------------------------

    async def run(self, count: int, *, seed: int) -> None:
        """`count` generated datagrams/messages, then the healthy check."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.sup.run)
            with seeded_secrets(random.Random(seed)):
                for peer in self.peers:  # bind every peer's address first
                    await self.execute(("udp", peer.addr, self._register(peer, valid=True)))
                await self.execute(("settle",))
                target = self.totals.inputs + count
                while self.totals.inputs < target:
                    for op in self.burst():
                        await self.execute(op)
                    self.totals.bursts += 1
                    await self.execute(("settle",))
                    self._between()
                    for op in self._pending_between:
                        await self.execute(op)
                await self.healthy(seed)
            nursery.cancel_scope.cancel()

    async def replay(self, ops: Sequence[Op], seed: int) -> None:
        """Run recorded inputs (a reproducer) on this fresh episode, then the healthy check."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.sup.run)
            with seeded_secrets(random.Random(seed)):
                for op in ops:
                    await self.execute(op)
                await self.settle()
                await self.healthy(seed)
            nursery.cancel_scope.cancel()

    def _between(self) -> None:
        """What happens between bursts: time passes, commands come, the disk stalls."""
        rng = self.rng
        ops: list[Op] = []
        r = rng.random()
        if r < 0.15:
            ops.append(("sleep", round(rng.expovariate(1.0), 3)))
        elif r < 0.18:
            ops.append(("sleep", rng.choice((30.0, 94.0, 248.0, 400.0))))
        if rng.random() < 0.25:
            eps = list(self.sup.by_endpoint)
            if eps:
                ep = rng.choice(eps)
                method = rng.choice(("GET", "GET", "PUT", "POST", "DELETE"))
                uri = rng.choice(("/3/0/0", "/3/0", "/3303/0/5700", "/3311/0/5850", "/1/0/1",
                                  "/3/0/4", "/3/0/9?pmin=1", "/5/0/1", "/3/0/0/0"))  # fmt: skip
                ops.append(("submit", ep, f"{method} {uri}"))
        if rng.random() < 0.1:
            eps = list(self.sup.by_endpoint)
            if eps:
                path = rng.choice((b"/3/0/0", b"/3303/0", b"/3303/0/5700", b"/3/0", b"/1/0/1"))
                kind = "subscribe" if rng.random() < 0.8 else "unsubscribe"
                ops.append((kind, rng.choice(eps), path))
        if self.store.gated and rng.random() < 0.4:
            ops.append(("commit",))
        elif not self.store.gated and rng.random() < 0.05:
            ops.append(("gate",))
        self._pending_between = ops

    def burst(self) -> list[Op]:
        rng = self.rng
        r = rng.random()
        if r < 0.35:
            return self._peer_burst(rng.choice(self.peers))
        if r < 0.45:
            return self._tcp_burst()
        if r < 0.53:  # a new peer: its Register waits for admission while it sends more
            new = Peer(("127.0.0.5", 20000 + rng.randrange(4096)), mid=rng.randrange(65536),
                       ep=rng.choice((b"dev-1", b"new-1", b"new-2")))  # fmt: skip
            return self._peer_burst(new)
        if r < 0.532 and not self._stormed:  # a registration storm past the admission bound
            self._stormed = True
            return self._storm(4200)
        out: list[Op] = []
        for _ in range(rng.randint(1, 64)):
            peer = rng.choice(self.peers)
            if rng.random() < 0.2:  # a fresh address (no actor: the registrar's path)
                peer = Peer(("127.0.0.2", 50000 + rng.randrange(512)), mid=rng.randrange(65536))
                if rng.random() < 0.4:
                    data = self._register(peer, valid=False)
                else:
                    data = self.mutator.mutate(rng.choice(self.seeds))
                out.append(("udp", peer.addr, data))
                continue
            out.append(("udp", peer.addr, self._udp_input(peer)))
            if rng.random() < 0.02:
                out.append(("icmp", peer.addr))
        return out

    def _storm(self, count: int) -> list[Op]:
        """`count` new devices register at once, each from its own address."""
        base = self.rng.randrange(1000)
        return [
            ("udp", ("127.0.0.4", 1024 + i),
             register_message(i & 0xFFFF, b"s", f"ep=storm-{base}-{i}&lt=300&lwm2m=1.1&b=U"))
            for i in range(count)
        ]  # fmt: skip

    def _peer_burst(self, peer: Peer) -> list[Op]:
        """One bound peer sends a run: new Message IDs and replays of earlier ones (a
        retransmission storm during a slow commit is one of these)."""
        rng = self.rng
        out: list[Op] = []
        if rng.random() < 0.5:
            out.append(("udp", peer.addr, self._register(peer, valid=True)))
        for _ in range(rng.randint(1, 60)):
            r = rng.random()
            if r < 0.3 and peer.history:
                out.append(("udp", peer.addr, rng.choice(peer.history)))
            elif r < 0.5:
                out.append(("udp", peer.addr, self._request(peer)))
            else:
                out.append(("udp", peer.addr, self._udp_input(peer)))
        return out

    def _udp_input(self, peer: Peer) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.12:
            data = self._register(peer, valid=rng.random() < 0.5)
        elif r < 0.25:
            data = self._update(peer)
        elif r < 0.3:
            data = self._deregister(peer)
        elif r < 0.5 and peer.requests:
            data = self._answer(peer)
        elif r < 0.55 and peer.observations:
            data = self._notification(peer)
        elif r < 0.65 and peer.history:  # a replay of an earlier Message ID
            old = rng.choice(peer.history)
            data = old if rng.random() < 0.6 else self.mutator.mutate(old)
        elif r < 0.75:
            data = self._request(peer)
        else:
            data = self.mutator.mutate(rng.choice(self.seeds))
        if rng.random() < 0.25:
            data = self.mutator.mutate(data)
        peer.history.append(data)
        return data

    def _tcp_burst(self) -> list[Op]:
        rng = self.rng
        out: list[Op] = []
        if not self.tcp_peers or rng.random() < 0.1:
            index = len(self.tcp_peers)
            conn = self._conn(index)
            self.tcp_peers.append(Peer(conn.peer, conn=conn, ep=rng.choice((b"dev-0", b"tcp-1"))))
        peer = rng.choice(self.tcp_peers)
        assert peer.conn is not None
        index = peer.conn.index
        for _ in range(rng.randint(1, 20)):
            r = rng.random()
            if r < 0.15:
                query = f"ep={peer.ep.decode()}&lt=86400&lwm2m=1.1&b=T"
                msg = decode(register_message(0, b"t%d" % rng.randrange(99), query))
            elif r < 0.3 and peer.location:
                msg = Message(0, _POST, 0, b"u", path_options("/" + "/".join(peer.location)))
            elif r < 0.5 and peer.requests:
                req = peer.requests.popleft()
                msg = Message(0, rng.choice(RESPONSE_CODES[:12]), 0, req.token,
                              self._response_options(), rng.choice(self.payloads))  # fmt: skip
            else:
                frame = rng.choice(self.tcp_seeds)
                out.append(("tcp", index, self.mutator.mutate(frame, tcp=True)))
                continue
            frame = framing_tcp.encode(msg)
            if rng.random() < 0.3:
                frame = self.mutator.mutate(frame, tcp=True)
            out.append(("tcp", index, frame))
        if rng.random() < 0.1:
            out.append(("close", index))
            self.tcp_peers.remove(peer)
            self.conns[index] = FakeConn(index, ("127.0.0.3", 31000 + rng.randrange(9999)))
        return out

    # -- message builders --------------------------------------------------------------------

    def _register(self, peer: Peer, *, valid: bool) -> bytes:
        rng = self.rng
        token = rng.randbytes(rng.randint(0, 8))
        if valid:
            query = (f"ep={peer.ep.decode()}&lt={rng.choice((60, 300, 86400))}"
                     f"&lwm2m=1.1&b={rng.choice(('U', 'UQ'))}")  # fmt: skip
            data = register_message(peer.next_mid(), token, query, _OBJECTS)
        else:
            params: list[bytes] = []
            if rng.random() < 0.9:
                params.append(b"ep=" + rng.choice(HOSTILE_EPS))
            if rng.random() < 0.7:
                params.append(b"lt=" + rng.choice(HOSTILE_LT))
            if rng.random() < 0.7:
                params.append(b"b=" + rng.choice(HOSTILE_B))
            if rng.random() < 0.7:
                params.append(b"lwm2m=" + rng.choice(HOSTILE_LWM2M))
            if rng.random() < 0.1:
                params.append(b"Q")
            if rng.random() < 0.1:
                params.append(b"et=" + rng.choice(HOSTILE_EPS))
            if rng.random() < 0.1:
                params.append(b"ep=" + rng.choice(HOSTILE_EPS))  # a repeated parameter
            rng.shuffle(params)
            options: list[tuple[int, bytes]] = [(11, b"rd")]
            options += [(_URI_QUERY, p) for p in params]
            if rng.random() < 0.8:
                options.append((_CONTENT_FORMAT, uint_bytes(rng.choice((40, 40, 0, 110, 60)))))
            options.sort(key=lambda o: o[0])
            mtype = _CON if rng.random() < 0.85 else _NON
            payload = rng.choice(HOSTILE_LINKS)
            data = encode(Message(mtype, _POST, peer.next_mid(), token, tuple(options), payload))
        peer.history.append(data)
        return data

    def _update(self, peer: Peer) -> bytes:
        rng = self.rng
        location = peer.location or ("rd", rng.randbytes(6).hex())
        if rng.random() < 0.1:  # another peer's registration: an address change, or a thief
            other = rng.choice(self.peers)
            location = other.location or location
        options: list[tuple[int, bytes]] = [(11, s.encode()) for s in location]
        if rng.random() < 0.3:
            options.append((_URI_QUERY, b"lt=" + rng.choice(HOSTILE_LT)))
        if rng.random() < 0.1:
            options.append((_URI_QUERY, b"b=" + rng.choice(HOSTILE_B)))
        payload = b""
        if rng.random() < 0.1:
            payload = rng.choice(HOSTILE_LINKS)
            options.append((_CONTENT_FORMAT, b"\x28"))
        options.sort(key=lambda o: o[0])
        token = rng.randbytes(rng.randint(0, 8))
        return encode(Message(_CON, _POST, peer.next_mid(), token, tuple(options), payload))

    def _deregister(self, peer: Peer) -> bytes:
        location = peer.location or ("rd", "x")
        options = tuple((11, s.encode()) for s in location)
        return encode(Message(_CON, _DELETE, peer.next_mid(), b"d", options))

    def _request(self, peer: Peer) -> bytes:
        """A request with a new Message ID that is not the registration interface."""
        rng = self.rng
        path = rng.choice(("/rd", "/bs", "/dp", "/", "/3/0", "/.well-known/core", "/rd/x/y"))
        code = rng.choice((_GET, _PUT, _POST, _DELETE, 5, 7, 31))
        mtype = rng.choice((_CON, _CON, _NON))
        return encode(Message(mtype, code, peer.next_mid(), rng.randbytes(rng.randint(0, 8)),
                              path_options(path), rng.choice((b"", b"x"))))  # fmt: skip

    def _response_options(self) -> tuple[tuple[int, bytes], ...]:
        rng = self.rng
        options: list[tuple[int, bytes]] = []
        cf = rng.choice(CONTENT_FORMATS)
        if cf is not None:
            options.append((_CONTENT_FORMAT, uint_bytes(cf)))
        if rng.random() < 0.2:
            options.append((_OBSERVE, uint_bytes(rng.randrange(1 << 24))))
        if rng.random() < 0.2:  # Block2: any number, more flag, size exponent (7 is reserved)
            value = rng.randrange(1 << 20) << 4 | rng.randrange(2) << 3 | rng.randrange(8)
            options.append((_BLOCK2, uint_bytes(value)))
        if rng.random() < 0.1:
            options.append((_ETAG, rng.randbytes(rng.randint(0, 9))))
        if rng.random() < 0.1:
            options.append((_SIZE2, uint_bytes(rng.randrange(1 << 32))))
        if rng.random() < 0.05:
            options.append((14, uint_bytes(rng.randrange(1 << 32))))  # Max-Age
        options.sort(key=lambda o: o[0])
        return tuple(options)

    def _answer(self, peer: Peer) -> bytes:
        """An answer to one of the server's requests to this peer: right or wrong."""
        rng = self.rng
        req = peer.requests[-1] if rng.random() < 0.7 else rng.choice(peer.requests)
        r = rng.random()
        if r < 0.1:
            return encode(Message(_RST, 0, req.mid, b""))
        if r < 0.2:  # an empty ACK, then (later) a separate CON response
            peer.requests.append(req)
            return encode(Message(_ACK, 0, req.mid, b""))
        mtype = _ACK if r < 0.85 else rng.choice((_CON, _NON))
        mid = req.mid if mtype == _ACK else peer.next_mid()
        asked = req.option(_BLOCK2)
        if asked is not None or rng.random() < 0.25:  # a well-formed block (mostly)
            value = int.from_bytes(asked or b"", "big")
            num, szx = value >> 4, (value & 7) if asked else rng.randint(0, 6)
            more = rng.random() < (0.7 if num < 3 else 0.3)
            options = [(_CONTENT_FORMAT, uint_bytes(rng.choice((0, 11542, 110, 42))))]
            options.append((_BLOCK2, uint_bytes(num << 4 | more << 3 | szx)))
            if rng.random() < 0.5:
                options.append((_ETAG, b"e" if rng.random() < 0.9 else b"f"))
            if rng.random() < 0.3:
                options.append((_SIZE2, uint_bytes(rng.choice((64, 1000, 1 << 20, 1 << 30)))))
            if req.observe == 0 and rng.random() < 0.5:
                options.append((_OBSERVE, uint_bytes(rng.randrange(1 << 24))))
            options.sort(key=lambda o: o[0])
            size = 16 << szx if more else rng.randint(0, 16 << szx)
            payload = (rng.choice(self.payloads) * (size // 8 + 1))[:size]
            code = 0x45 if rng.random() < 0.9 else rng.choice(RESPONSE_CODES)
            return encode(Message(mtype, code, mid, req.token, tuple(options), payload))
        payload = rng.choice(self.payloads) if rng.random() < 0.8 else rng.randbytes(20)
        code = rng.choice(RESPONSE_CODES)
        return encode(Message(mtype, code, mid, req.token, self._response_options(), payload))

    def _notification(self, peer: Peer) -> bytes:
        rng = self.rng
        token = rng.choice(peer.observations)
        options = [(_OBSERVE, uint_bytes(rng.randrange(1 << 24)))]
        options += [o for o in self._response_options() if o[0] != _OBSERVE]
        options.sort(key=lambda o: o[0])
        mtype = rng.choice((_NON, _CON))
        return encode(Message(mtype, 0x45, peer.next_mid(), token, tuple(options),
                              rng.choice(self.payloads)))  # fmt: skip


def tcp_frame(code: int, token: bytes, body: bytes) -> bytes:
    """A CoAP-over-TCP frame around `body` (options and payload, already encoded)."""
    n, tkl = len(body), len(token) & 0x0F
    if n < 13:
        head = bytes((n << 4 | tkl, code))
    elif n < 269:
        head = bytes((0xD0 | tkl, n - 13, code))
    elif n < 65805:
        head = bytes((0xE0 | tkl, (n - 269) >> 8, (n - 269) & 0xFF, code))
    else:
        head = bytes((0xF0 | tkl,)) + (n - 65805).to_bytes(4, "big") + bytes((code,))
    return head + token + body


def register_message(mid: int, token: bytes, query: str, payload: bytes = _OBJECTS) -> bytes:
    options = [(11, b"rd"), (_CONTENT_FORMAT, b"\x28")]
    options += [(_URI_QUERY, p.encode()) for p in query.split("&")]
    options.sort(key=lambda o: o[0])
    return encode(Message(_CON, _POST, mid, token, tuple(options), payload))


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Fuzzer:
    """Episodes of `episode` inputs each, until `total` inputs (or `deadline`, Trio time
    of the real clock: pass None in virtual time)."""

    seed: int = 0x10
    episode: int = 2000
    peers: int = 8
    totals: Totals = field(default_factory=Totals)
    seeds: list[bytes] = field(default_factory=udp_seeds)
    tcp: list[bytes] = field(default_factory=tcp_seeds)

    def __post_init__(self) -> None:
        self.payloads = response_payloads(self.seeds)

    def new_episode(self, seed: int) -> Episode:
        return Episode(random.Random(seed), self.seeds, self.tcp, self.payloads, self.peers)

    async def run(self, total: int, *, wall_limit: float | None = None,
                  stop_after_crashes: int = 1000) -> Totals:  # fmt: skip
        import time

        started = time.monotonic()
        n = 0
        with quiet():
            while self.totals.inputs < total and len(self.totals.crashes) < stop_after_crashes:
                if wall_limit is not None and time.monotonic() - started > wall_limit:
                    break
                seed = self.seed * 1_000_003 + n
                n += 1
                ep = self.new_episode(seed)
                try:
                    await ep.run(min(self.episode, total - self.totals.inputs), seed=seed)
                except Exception as exc:
                    text = "".join(traceback.format_exception(exc))
                    self.totals.crashes.append(Crash(signature(exc), text, ep.ops, seed))
                else:
                    for sig, text in ep.contained[:1]:
                        ops = ep.ops[: ep.crash_at]
                        self.totals.crashes.append(Crash("contained " + sig, text, ops, seed))
                self._add(ep)
        return self.totals

    def _add(self, ep: Episode) -> None:
        t, e = self.totals, ep.totals
        t.datagrams += e.datagrams
        t.tcp_messages += e.tcp_messages
        t.bursts += e.bursts
        t.submits += e.submits
        t.healthy_checks += e.healthy_checks
        t.episodes += 1
        t.decode_errors += ep.sup.statistics.get("decode_errors", 0)
        t.registrations += ep.sup.statistics.get("registrations", 0)
        t.peer_errors += ep.sup.statistics.get("peer_errors", 0)
        t.device_errors += ep.device_errors

    async def crashes(self, ops: Sequence[Op], seed: int) -> str | None:
        """The crash signature of replaying `ops` on a fresh episode, None if it survives."""
        ep = self.new_episode(seed)
        try:
            with quiet():
                await ep.replay(ops, seed)
        except Exception as exc:
            return signature(exc)
        if ep.contained:
            return "contained " + ep.contained[0][0]
        return None

    async def minimize(self, crash: Crash, budget: int = 400, seconds: float = 60.0) -> Crash:
        """Delta debugging: the shortest subsequence of the crash's inputs found within
        `budget` replays (and `seconds` of real time) that still crashes the same way."""
        import time

        ops = list(crash.ops)
        want = crash.signature
        tries = 0
        granularity = 2
        end = time.monotonic() + seconds
        while len(ops) >= 2 and tries < budget and time.monotonic() < end:
            size = max(1, len(ops) // granularity)
            reduced = False
            for start in range(0, len(ops), size):
                candidate = ops[:start] + ops[start + size :]
                tries += 1
                if await self.crashes(candidate, crash.seed) == want:
                    ops = candidate
                    granularity = max(granularity - 1, 2)
                    reduced = True
                    break
                if tries >= budget:
                    break
            if not reduced:
                if size == 1:
                    break
                granularity = min(len(ops), granularity * 2)
        ep = self.new_episode(crash.seed)
        text = crash.traceback
        try:
            with quiet():
                await ep.replay(ops, crash.seed)
        except Exception as exc:
            text = "".join(traceback.format_exception(exc))
        else:
            text = ep.contained[0][1] if ep.contained else text
        return Crash(want, text, ops, crash.seed)


@contextmanager
def quiet() -> Iterator[None]:
    """The server's logging off while fuzzing: every refusal would be a line (and the
    crash boundary's tracebacks are collected by the fuzzer itself)."""
    logger = logging.getLogger("dm_actor")
    level, logger.level = logger.level, logging.CRITICAL + 1
    try:
        yield
    finally:
        logger.setLevel(level)
