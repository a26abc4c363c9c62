"""Stateful property test of the device machine (issue 12), beside the supervisor-level one.

Hypothesis drives one `DeviceMachine` in float time: commands submitted (GET, PUT, POST,
DELETE, Observe; random retry and expiry), time passing and timers firing, the device
answering what the machine sent (piggybacked, empty ACK then separate, errors, Resets,
in blocks, or not at all), notifications (stale, in blocks, ending), the device's own
requests and pings, its messages held in the network and delivered late, reordered or twice,
the store catching up (`durable`), the device moving to a new address or onto a TCP
connection, its connection closing, ICMP errors, another device taking its address, sweeps,
a new Register, and the end of the registration. No trio, no sockets: one example takes
milliseconds, so the default budget is several times the supervisor-level test's
(tests/actors/test_stateful.py).

Invariants after every step: every accepted command is in the queue, in flight, or finished
exactly once (never twice); the machine's attempt state agrees with its queue; at most one
request of the machine's own (besides notification fetches) is outstanding; never more than
20 unfinished commands; and, checked on every effect (`support.Driver`), no request leaves
between a `Hold` and `durable`, every request's Message ID is below the last reservation made
durable, and no Message ID names two exchanges within EXCHANGE_LIFETIME. After the end,
every accepted command has finished.

Profiles as in tests/conftest.py: "ci" (the default) runs `EXAMPLES_FACTOR` times its
`max_examples`; `pytest tests/device/test_machine_stateful.py --hypothesis-profile long`
runs many more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dm_actor.coap.blockwise import Block
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.numbers import Code
from dm_actor.delivery.queue import DeliveryPolicy, DeviceQueue, Verdict
from dm_actor.device.attempt import AttemptState, Link
from dm_actor.device.effects import DeviceRequest, Finished
from dm_actor.device.machine import DeviceMachine, MachineConfig
from tests.device.support import (
    ADDR,
    ADDR2,
    OBSERVE,
    PARAMS,
    RESEND_WINDOW,
    Driver,
    FakeDevice,
    command,
    registration,
    requests,
)

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.coap.message import Message

T = TypeVar("T")

#: the ci profile's budget times this (the supervisor-level test runs the profile's own)
EXAMPLES_FACTOR = 2
QUEUE = 20
ADDRS: tuple[Address, ...] = (ADDR, ADDR2, ("127.0.0.3", 5683))
PATHS = ("/3/0/1", "/3/0", "/3303/0/5700", "/3/0/1?pmin=5", "/3311/0/5850")
METHODS = ("GET", "GET", "PUT", "POST", "DELETE")


def echo(code: int, path: str) -> bytes:
    """What the device answers a request with: its method and path, so that an answer can
    never pass for another command's (the invariants check every 2.xx payload)."""
    return f"{code}:{path}".encode()


def long_body(code: int, path: str) -> bytes:
    """A value in 2 blocks of 64 bytes (szx 2)."""
    return (echo(code, path) + b"|" + bytes(range(100)))[:100]


def request_path(req: Message) -> str:
    return "/" + "/".join(req.uri_path)


_METHOD_CODES = {"GET": Code.GET, "PUT": Code.PUT, "POST": Code.POST, "DELETE": Code.DELETE}
#: Findings of this test not yet fixed in dm_actor/device/, each kept out of the random
#: examples while open and shown by its xfail(strict=True) test in test_machine.py. (Its
#: first, a UDP endpoint made after TCP starting at a random Message ID, was fixed in
#: bd909b7: the machine now passes its reservation's limit.)
OPEN_FINDINGS: frozenset[str] = frozenset()


class _Endpoints:
    """The machine's `new_endpoint`, seeded: without `mid_start`, a random first Message ID,
    as the server's (`Registry.new_coap_endpoint`)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.made: list[CoapEndpoint] = []

    def __call__(self, reliable: bool, mid_start: int | None, name: str = "") -> CoapEndpoint:
        start = self.rng.getrandbits(16) if mid_start is None else mid_start
        endpoint = CoapEndpoint(
            PARAMS,
            reliable=reliable,
            rng=self.rng,
            mid_start=start,
            token_seed=len(self.made) << 24,
            dedup_limit=16,
        )
        self.made.append(endpoint)
        return endpoint


@dataclass
class _Held:
    """A message of the device in the network, for the transport it was sent on."""

    data: bytes | Message
    transport: object


class MachineWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.accepted: dict[str, object] = {}
        self.outstanding: list[tuple[Message, object]] = []  # the server's requests, unanswered
        self.acked: list[tuple[Message, object]] = []  # ACKed: a separate response is owed
        self.network: list[_Held] = []
        #: the observations the device notifies on: (token, path), transport
        self.observations: list[tuple[tuple[bytes, str], object]] = []
        self.seq = 10
        self.ended = False
        self.stalled = False  # the store is behind: `durable` waits for `catch_up`

    # -- set-up and helpers -----------------------------------------------------------------

    @initialize(
        seed=st.integers(0, 2**16),
        mid_start=st.none() | st.sampled_from([0, 1000, 65400, 65535]),
        tcp=st.booleans(),
        queue_mode=st.booleans(),
        restored=st.lists(st.sampled_from([-10.0, -200.0, -300.0]), max_size=3),
    )
    def setup(
        self,
        seed: int,
        mid_start: int | None,
        tcp: bool,
        queue_mode: bool,
        restored: list[float],
    ) -> None:
        """A registered device; after a restart (`mid_start` set, the store's reservation),
        with commands restored from the store, some decided `restored` seconds ago (rule 7.2:
        resent as the same exchange inside the device's EXCHANGE_LIFETIME)."""
        config = MachineConfig(
            new_endpoint=_Endpoints(seed), resend_window=RESEND_WINDOW, registration_grace=0.0
        )
        queue = DeviceQueue(DeliveryPolicy(queue_length=QUEUE), queue_mode=queue_mode, now=0.0)
        reg = registration(queue_mode=queue_mode)
        conn = object() if tcp else None
        self.m = DeviceMachine(
            config, reg, queue, addr=None if tcp else ADDR, conn=conn, mid_start=mid_start
        )
        self.d = Driver(self.m)
        self.dev = FakeDevice(tcp=tcp)
        if mid_start is None:
            return
        for i, decided_at in enumerate(restored):
            cmd = command("POST", "/3/0/4", now=decided_at, expiry=3600.0)
            cmd.mid, cmd.token = (mid_start - 1 - i) & 0xFFFF, b"old%d" % i
            cmd.exchange_at = decided_at
            self.d.restored_mids.add(cmd.mid)
            queue.queue.append(cmd)  # (as the supervisor restores them)
            self.accepted[cmd.async_id] = cmd
        self.m.pump(0.0)
        self.take()

    def transport(self) -> object:
        """What the device's messages reach this machine through: its message layer and
        connection (a new UDP address keeps the layer: answers from there still count)."""
        m = self.m
        return (m.coap, m.conn)  # (compared by identity: neither defines __eq__)

    def take(self) -> None:
        """Carry out the effects as the actor does: answer the device's requests at once."""
        d, m = self.d, self.m
        while True:
            mark = len(d.log)
            d.take(self.now)
            if d.held and not self.stalled:
                d.durable(self.now)  # (the actor's wait for the store, which keeps up,
                if not self.ended:  # then its next step)
                    m.settle(self.now)
                    d.take(self.now)
            new = d.log[mark:]
            where = self.transport()
            # (what was sent on a transport the machine has left cannot be answered to it)
            self.outstanding = self._current(self.outstanding)
            self.acked = self._current(self.acked)
            self.observations = self._current(self.observations)
            if not new:
                return
            for req in requests(new):
                self.outstanding = [
                    (r, t) for r, t in self.outstanding if r.token != req.token or t != where
                ]
                self.outstanding.append((req, where))
            for effect in new:
                if isinstance(effect, Finished) and effect.outcome.payload:
                    cmd = effect.command
                    mine = echo(_METHOD_CODES[cmd.method], cmd.uri.partition("?")[0])
                    assert effect.outcome.payload.startswith(mine), (cmd, effect.outcome)
                if isinstance(effect, DeviceRequest):
                    m.respond(effect.request, Code.CHANGED, (), self.now)

    def settle(self) -> None:
        """The actor's step ends: `settle`, and carry out. Then rule 4.1 holds: a command
        never attempted, at the head, for a device awake and reachable, is in flight (unless
        the store is behind)."""
        m = self.m
        m.settle(self.now)
        self.take()
        q = m.queue
        if self.ended or m.held or not m.has_transport() or q.in_flight is not None:
            return
        head = q.queue[0] if q.queue else None
        if head is not None and head.last_attempt_at is None and q.awake(self.now):
            raise AssertionError(f"rule 4.1: {head} waits on a device awake and reachable")

    def feed(self, data: bytes | Message) -> None:
        if isinstance(data, bytes):
            self.m.receive_datagram(data, self.now)
        else:
            self.m.receive_message(data, self.now)
        self.settle()

    def send(self, data: bytes | Message, hold: bool) -> None:
        """The device sends `data`: now, or into the network (for `release`)."""
        if hold:
            self.network.append(_Held(data, self.transport()))
        else:
            self.feed(data)

    def tcp(self) -> bool:
        return self.m.conn is not None

    # -- the server's side -------------------------------------------------------------------

    @rule(
        method=st.sampled_from(METHODS),
        path=st.sampled_from(PATHS),
        retry=st.integers(0, 3),
        expiry=st.sampled_from([60.0, 300.0, 3600.0]),
        observe=st.booleans(),
        start=st.booleans(),
    )
    def submit(
        self, method: str, path: str, retry: int, expiry: float, observe: bool, start: bool
    ) -> None:
        """A command (also after the end: it must finish at once with 429, unsent)."""
        mark = len(self.d.log)
        observe = observe and method == "GET" and "?" not in path
        payload = b"" if method in ("GET", "DELETE") else b"v"
        cmd = command(method, path, payload, now=self.now, expiry=expiry, retry=retry,
                      observe=observe)  # fmt: skip
        verdict = self.m.submit(cmd, self.now, start=start)
        if verdict is Verdict.ACCEPTED:
            self.accepted[cmd.async_id] = cmd
        else:
            assert verdict is Verdict.QUEUE_IS_FULL
            assert len(self.m.queue) == QUEUE
        self.take()
        if self.ended:
            assert not requests(self.d.log[mark:])

    @precondition(lambda self: not self.ended)
    @rule()
    def stall(self) -> None:
        """The store falls behind: holds last until `catch_up`."""
        self.stalled = True

    @precondition(lambda self: not self.ended)
    @rule()
    def catch_up(self) -> None:
        """The store makes every write durable, and keeps up from now on."""
        self.stalled = False
        self.d.durable(self.now)
        self.settle()

    @rule(seconds=st.sampled_from([0.5, 2.5, 10.0, 45.0, 130.0, 250.0]))
    def sleep(self, seconds: float) -> None:
        """Time passes; every timer due meanwhile fires at its time (the store keeps up).
        (Also after the end, when the machine must have no timer and send nothing.)"""
        end = self.now + seconds
        m = self.m
        mark = len(self.d.log)
        if self.ended:
            assert m.get_timer() is None
        while (timer := m.get_timer()) is not None and timer <= end:
            self.now = max(self.now, timer)
            m.handle_timer(self.now)
            self.settle()
        self.now = end
        self.settle()
        if self.ended:
            assert not requests(self.d.log[mark:])

    @precondition(lambda self: not self.ended)
    @rule(kind=st.sampled_from(["settle"] * 8 + ["sweep"] * 8 + ["reregistered"] * 3 + ["end"]))
    def server(self, kind: str) -> None:
        """The actor settles, the sweep runs (rule 5.2), the device registers again (rule
        8.1: its observations are gone), or the registration ends (rules 8.2, 8.3)."""
        m = self.m
        if kind == "sweep":
            m.sweep(self.now)
        elif kind == "reregistered":
            m.reregistered(registration(queue_mode=m.queue.queue_mode, now=self.now), self.now)
            self.observations.clear()
        elif kind == "end":
            m.end(self.now)
            self.ended = True
        if not self.ended:
            self.settle()
        self.take()

    # -- the transport ------------------------------------------------------------------------

    @precondition(lambda self: not self.ended)
    @rule(
        kind=st.sampled_from(["udp", "udp", "tcp", "close", "icmp", "taken"]),
        addr=st.sampled_from(ADDRS),
        rarely=st.integers(0, 2),
    )
    def transport_changes(self, kind: str, addr: Address, rarely: int) -> None:
        """A message from the device at `addr` (a new address, or back from TCP); a new TCP
        connection, whose first message is an Update; the connection closes; an ICMP error;
        another device registers from this one's address. (Drawn a third as often as the
        other rules: each of these ends what is in flight.)"""
        m = self.m
        if rarely:
            return
        if kind == "udp":
            m.bind(addr, None, self.now)
            self.dev.tcp = False
            self.feed(self.dev.ping())
        elif kind == "tcp":
            m.bind(None, object(), self.now)
            self.dev.tcp = True
            self.feed(self.dev.request(Code.POST, "/rd/abc"))
        elif kind == "close" and m.conn is not None:
            m.lose_connection()
            m.connection_closed(self.now)
        elif kind in ("icmp", "taken") and m.conn is None and m.addr is not None:
            if kind == "taken":
                m.lose_address()
            m.unreachable(self.now)
            self.settle()
        self.take()

    # -- the device's side ----------------------------------------------------------------------

    def _current(self, items: list[tuple[T, object]]) -> list[tuple[T, object]]:
        where = self.transport()
        return [(r, t) for r, t in items if t == where]

    @precondition(lambda self: not self.ended and self.outstanding)
    @rule(
        pick=st.integers(0, 7),
        how=st.sampled_from(
            ["ok", "ok", "ok", "error", "ack", "reset", "drop", "blocks", "blocks", "twice"]
        ),
        hold=st.booleans(),
        max_age=st.sampled_from([0, 0, 60]),
    )
    def answer(self, pick: int, how: str, hold: bool, max_age: int) -> None:
        current = self._current(self.outstanding)
        if not current:
            return
        req, where = current[pick % len(current)]
        self.outstanding.remove((req, where))
        dev = self.dev
        path = request_path(req)
        tcp = self.tcp()
        observe = None
        if req.option(OBSERVE) == b"":
            self.seq += 1
            observe = self.seq
        if how == "drop":
            return
        if how == "reset" and not tcp:
            self.send(dev.reset(req), hold)
        elif how == "ack" and not tcp:
            self.send(dev.ack(req), hold)
            self.acked.append((req, where))
        elif how == "error":
            self.send(dev.answer(req, Code.NOT_FOUND), hold)
        elif how == "blocks" and req.code == Code.GET:
            self.send(dev.in_blocks(req, long_body(req.code, path), observe=observe), hold)
        else:
            data = dev.answer(req, Code.CONTENT if req.code == Code.GET else Code.CHANGED,
                              echo(req.code, path), max_age=max_age,
                              observe=observe)  # fmt: skip
            self.send(data, hold)
            if how == "twice":
                self.send(data, True)
        if observe is not None and how not in ("error", "reset", "ack"):
            self.observations.append(((req.token, path), where))

    @precondition(lambda self: not self.ended and self.outstanding)
    @rule(pick=st.integers(0, 7), blocks=st.booleans())
    def answer_at_once(self, pick: int, blocks: bool) -> None:
        """(the common cases, drawn more often)"""
        self.answer(pick, "blocks" if blocks else "ok", hold=False, max_age=0)

    @precondition(lambda self: not self.ended and self.acked)
    @rule(pick=st.integers(0, 3), hold=st.booleans(), blocks=st.booleans())
    def separate(self, pick: int, hold: bool, blocks: bool) -> None:
        current = self._current(self.acked)
        if not current or self.tcp():
            return
        req, where = current[pick % len(current)]
        self.acked.remove((req, where))
        if blocks and req.code == Code.GET:
            body = long_body(req.code, request_path(req))
            self.send(self.dev.in_blocks(req, body, separate=True), hold)
        else:
            self.send(self.dev.separate(req, payload=echo(req.code, request_path(req))), hold)

    @precondition(lambda self: not self.ended and self.observations)
    @rule(
        pick=st.integers(0, 3),
        stale=st.booleans(),
        blocks=st.booleans(),
        con=st.booleans(),
        ends=st.booleans(),
        hold=st.booleans(),
    )
    def notify(
        self, pick: int, stale: bool, blocks: bool, con: bool, ends: bool, hold: bool
    ) -> None:
        current = self._current(self.observations)
        if not current:
            return
        (token, path), _ = current[pick % len(current)]
        self.seq += 1
        seq = self.seq - 5 if stale else self.seq
        con = con and not self.tcp()
        if ends:
            data = self.dev.notification(token, None, b"", code=Code.NOT_FOUND, con=con)
        elif blocks:
            data = self.dev.notification(token, seq, long_body(Code.GET, path)[:64], con=con,
                                         block=Block(0, more=True, szx=2))  # fmt: skip
        else:
            data = self.dev.notification(token, seq, echo(Code.GET, path) + b"#%d" % seq, con=con)
        self.send(data, hold)

    @precondition(lambda self: not self.ended)
    @rule(ping=st.booleans(), hold=st.booleans())
    def device_request(self, ping: bool, hold: bool) -> None:
        """The device speaks: an Update (a contact), or a CoAP ping (UDP)."""
        if ping and not self.tcp():
            self.send(self.dev.ping(), hold)
        else:
            self.send(self.dev.request(Code.POST, "/rd/abc"), hold)

    @precondition(lambda self: not self.ended and self.network)
    @rule(reverse=st.booleans(), duplicate=st.booleans(), count=st.integers(1, 4))
    def release(self, reverse: bool, duplicate: bool, count: int) -> None:
        """Deliver held messages (reordered, duplicated); those sent on a transport the
        device has left since do not reach this machine."""
        held, self.network = self.network[:count], self.network[count:]
        for item in reversed(held) if reverse else held:
            if item.transport != self.transport():
                continue
            self.feed(item.data)
            if duplicate:
                self.feed(item.data)

    @precondition(lambda self: self.ended)
    @rule(pick=st.integers(0, 7))
    def late_answer(self, pick: int) -> None:
        """After the end: a late answer to something the machine sent finishes nothing and
        makes it send no request."""
        mark = len(self.d.log)
        current = self._current(self.outstanding)
        if current:
            req, _ = current[pick % len(current)]
            code = Code.CONTENT if req.code == Code.GET else Code.CHANGED
            self.feed(self.dev.answer(req, code, b"late"))
        assert not requests(self.d.log[mark:])
        assert not any(isinstance(e, Finished) for e in self.d.log[mark:])

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def every_accepted_command_is_queued_in_flight_or_finished_once(self) -> None:
        if not hasattr(self, "m"):
            return
        queue = self.m.queue
        unfinished = {c.async_id for c in queue.queue}
        if queue.in_flight is not None:
            unfinished.add(queue.in_flight.async_id)
        finished = set(self.d.finished)
        assert all(n == 1 for n in self.d.finished.values())
        assert unfinished.isdisjoint(finished)
        assert unfinished | finished == set(self.accepted)
        assert len(unfinished) <= QUEUE
        if self.ended:
            assert not unfinished

    @invariant()
    def the_attempt_agrees_with_the_queue(self) -> None:
        if not hasattr(self, "m"):
            return
        m = self.m
        assert (m.attempt is AttemptState.IDLE) == (m.queue.in_flight is None)
        if m.held:
            assert self.d.held

    @invariant()
    def at_most_one_request_of_its_own_is_outstanding(self) -> None:
        """Rule 2.2 (notification fetches aside: they are the device's answers' rest)."""
        if not hasattr(self, "m"):
            return
        m = self.m
        exchanges = set(m.coap._by_token or ())
        exchanges -= set(m._fetches or ())
        assert len(exchanges) <= 1, exchanges
        if exchanges and not self.ended:
            assert m.attempt in (AttemptState.SENT, AttemptState.ACKED, AttemptState.IN_BLOCKS)

    def teardown(self) -> None:
        if not hasattr(self, "m"):
            return
        if not self.ended and self.m.link is not Link.ENDED:
            self.m.end(self.now)
            self.ended = True
            self.take()
        self.every_accepted_command_is_queued_in_flight_or_finished_once()
        assert sum(isinstance(e, Finished) for e in self.d.log) == len(self.accepted)


MachineWorld.TestCase.settings = settings(
    max_examples=settings().max_examples * EXAMPLES_FACTOR,  # (the loaded profile's)
    stateful_step_count=50,
    report_multiple_bugs=False,
)
TestMachineWorld = MachineWorld.TestCase
