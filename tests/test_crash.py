"""The crash tests: kill -9 a real daemon under a stream of commands, on every channel type.

A real `dm-actor serve --store sqlite` runs in a subprocess on fixed loopback ports and is
killed with SIGKILL and restarted on the same ports and data directory; simulated devices run
in this process; an application reads its notification channel (tests/crash_channels.py):
WebSocket and webhook with `include_uid`, or long poll. A POST answered 202 is a promise; one
whose connection broke after it was sent is "unknown" and never retried. Every test prints
accepted / answered / missing / repeated and asserts that every promise has its
AsyncIDResponse, and that a response arrives again only after a restart and only if it was
first received just before the kill (the channel's hand-over window, docs/operations.md).

Two tests, each once per channel type:

- `test_kill_9_after_the_nth_202_of_cached_reads` is issue 11's scenario: 20 fast, reliable
  devices (no loss, no Max-Age: 60 s of value cache), one client posting `GET /3/0/0` to
  device i % 20 one after another on a kept-alive connection (async-ids d0, d1, ...; a 429
  waits 5 ms and goes on), kill -9 after the Nth 202, restart at once, go on to 2N accepted.
  Most reads are answered from the cache: that 202 must be as durable as any.
- `test_kill_9_under_a_stream_of_commands_loses_and_duplicates_nothing` is issue 6's: a mixed
  fleet (U, UQ and T bindings, lossy, sleepy, short lifetimes) sent distinct writes (a PUT of
  a dimmer `/3311/k/5851`: the device's record of executed requests names the command) by two
  clients, plus fast reliable devices read over and over by a third (cache hits), while the
  daemon is killed at seeded random moments (sometimes again before it was ready). No UDP
  device may execute a command twice (the daemon resends an attempt that was in flight at the
  crash as the same CoAP exchange, so the device's deduplication answers it). CoAP over TCP
  has no deduplication (RFC 8323): a command in flight on a connection the crash broke may
  run twice there; that is counted and printed, not asserted.

Message IDs: a new request must never share its Message ID with one the previous process sent
the same device within EXCHANGE_LIFETIME (the device would answer it from its deduplication
cache without executing it). The server reserves MIDs per device in the store and a restarted
daemon starts past the reservation; the summary prints how many pairs of exchanges from two
processes fell within the window (with random first MIDs each would collide with probability
1/65536) and the test asserts that no MID was reused.

Real time throughout (the daemon is another process): every wait is bounded.
`DM_ACTOR_CRASH_SEED` picks another seed (it fixes the kill schedule, the commands and the
devices; what the kills interrupt depends on timing). `DM_ACTOR_CRASH_SCALE=k` runs k times as
many kills and commands (CI runs 1: about 2.5 minutes for the six tests on two cores).
"""

from __future__ import annotations

import base64
import gc
import itertools
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import pytest
import trio

from dm_actor.coap.numbers import Code, MessageType
from dm_actor.sim.client import TCP, Profile
from dm_actor.sim.fleet import Fleet, FleetConfig
from tests.api.client import HttpClient
from tests.crash_channels import (
    CHANNELS,
    WINDOWS,
    Inbox,
    Kill,
    Tally,
    blocks,
    start_consumer,
    tally,
)
from tests.daemon import Daemon, NotSent, Session, free_ports

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.sim.client import SimDevice

pytestmark = [
    pytest.mark.crash,
    # trio-websocket's client keeps its TCP socket when the server side vanishes (kill -9);
    # the garbage collector reports those sockets: collected at the end, while these hold
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

SEED = int(os.environ.get("DM_ACTOR_CRASH_SEED", "6"))
SCALE = max(1, int(os.environ.get("DM_ACTOR_CRASH_SCALE", "1")))
KEY = "ak_crash"
SETTLE = 2.0  # after the last answer, this long for late repeats
EXCHANGE_LIFETIME = 247.0
_CON = MessageType.CON.value
COMMAND = re.compile(r"/3311/\d+/5851")

# the mixed test
DEVICES = 48
BINDINGS = ("U", "UQ", "T")
LIGHTS = 16 * SCALE  # distinct command slots per device
PAUSE = (0.08, 0.25)  # seconds between two POSTs of one writing client (two clients)
LIFETIME = 20  # an Update every 10 s
LOSS = 0.1  # of datagrams, each way: answers lost keep attempts in flight across kills
FAST = 8  # fast, reliable devices, read over and over (mostly answered from the cache)
FAST_LIFETIME = 10  # an Update every 5 s: reachable again soon after a restart
FAST_PAUSE = 0.02  # seconds between two reads
CYCLES = 7 * SCALE  # kill -9 and restart
UP = (0.4, 2.0)  # seconds up between kills
DOWN = (0.0, 0.6)  # seconds down before the restart
EARLY_KILL = 0.15  # chance that a restart is killed again before it is ready
DRAIN = 40.0  # seconds for the last responses after the last restart

SETTINGS = """\
[delivery]
# resend an attempt interrupted by a crash on the device's next contact, not 120 s later
resend_grace = 1.0
# the devices stay awake 5 s after an exchange; the server believes 4 s
awake_time = 4.0
"""

# issue 11's scenario
SCENARIO_DEVICES = 20
SCENARIO_N = 300 * SCALE  # kill after the Nth 202, go on to 2N
SCENARIO_DRAIN = 60.0
SCENARIO_SETTINGS = ""  # the defaults


def daemon_for(tmp_path: Path, settings: str) -> tuple[Daemon, int]:
    """A daemon on two free ports with its own data directory; and its CoAP port."""
    coap_port, http_port, coaps_port = free_ports(3)  # (coaps: not the CoAP port + 1)
    (tmp_path / "settings.toml").write_text(settings)
    daemon = Daemon(
        ["--config", str(tmp_path / "settings.toml"), "--store", "sqlite", "--data-dir",
         str(tmp_path / "data"), "--host", "127.0.0.1", "--coap-port", str(coap_port),
         "--coaps-port", str(coaps_port),
         "--http-port", str(http_port), "--api-key", KEY, "--log-level", "info"],
        ("127.0.0.1", http_port), tmp_path / "daemon.log",
    )  # fmt: skip
    return daemon, coap_port


async def post(session: Session, target: str, body: object) -> int | None:
    """POST until it was sent (the daemon may be down); its status, None when unknown (the
    connection broke after the request left: never sent again)."""
    with trio.fail_after(20):
        while True:
            try:
                return (await session.request("POST", target, body))[0]
            except NotSent:
                await trio.sleep(0.02)  # the daemon is not up: nothing was sent, try again
            except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                return None


async def answered(inbox: Inbox, status: dict[str, int | None], limit: float) -> None:
    """Wait up to `limit` seconds until every promised command has its response."""
    with trio.move_on_after(limit):
        while not all(a in inbox.arrivals for a, s in list(status.items()) if s == 202):  # noqa: ASYNC110
            await trio.sleep(0.1)


def verdict(result: Tally, summary: str) -> None:
    assert not result.missing, f"lost: {blocks(result.missing)}\n{summary}"
    assert not result.second_uid, f"two responses: {result.second_uid}\n{summary}"
    assert not result.outside, f"repeated outside the window\n{summary}"
    assert not result.strays, f"responses to commands never sent: {result.strays}\n{summary}"


# -- issue 11's scenario: fast devices, repeated reads answered from the cache ---------------


@pytest.mark.parametrize("channel", CHANNELS)
async def test_kill_9_after_the_nth_202_of_cached_reads(tmp_path: Path, channel: str) -> None:
    try:
        await _scenario(tmp_path, channel)
    finally:
        gc.collect()


async def _scenario(tmp_path: Path, channel: str) -> None:
    daemon, coap_port = daemon_for(tmp_path, SCENARIO_SETTINGS)
    fleet = Fleet(FleetConfig(server=("127.0.0.1", coap_port), devices=SCENARIO_DEVICES,
                              lifetime=30, seed=SEED))  # fmt: skip
    inbox = Inbox(channel)
    status: dict[str, int | None] = {}
    kills: list[Kill] = []
    began = time.monotonic()
    try:
        with trio.fail_after(60 + SCENARIO_N / 20 + SCENARIO_DRAIN):
            await daemon.start()
            with trio.fail_after(20):
                await daemon.ready()
            async with trio.open_nursery() as nursery:
                await nursery.start(fleet.run)
                with trio.fail_after(20):
                    while fleet.totals.registered < SCENARIO_DEVICES:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await start_consumer(nursery, daemon.http, KEY, channel, inbox)
                async with Session(daemon.http, KEY) as session:
                    refused = await _post_reads(session, daemon, status, inbox, kills)
                posted = time.monotonic()
                await answered(inbox, status, SCENARIO_DRAIN)
                drained = time.monotonic()
                await trio.sleep(SETTLE)  # late repeats (and a long poll acknowledges)
                nursery.cancel_scope.cancel()
    finally:
        await daemon.kill()
    result = tally(inbox, status, kills, WINDOWS[channel])
    restored = [line for line in (tmp_path / "daemon.log").read_text().splitlines()
                if "restored" in line]  # fmt: skip
    summary = "\n".join([
        f"issue 11 scenario, seed {SEED}, channel {channel}, N {SCENARIO_N}: "
        f"{len(status)} POSTs ({dict(Counter(status.values()))}; 429s retried: {refused}), "
        f"commands for {posted - began:.1f} s, drained in {drained - posted:.1f} s, "
        f"{inbox.messages} messages, {inbox.connections} connections",
        result.line(channel),
        f"missing: {blocks(result.missing)}"[:400],
        *result.outside[:10],
        *restored,
        *(inbox.log[-15:] if result.missing or result.outside else ()),
    ])  # fmt: skip
    print(summary)
    verdict(result, summary)
    assert result.accepted == 2 * SCENARIO_N and len(kills) == 1, summary


async def _post_reads(
    session: Session,
    daemon: Daemon,
    status: dict[str, int | None],
    inbox: Inbox,
    kills: list[Kill],
) -> int:
    """GET /3/0/0 to device i % 20, one POST after another, until 2N are accepted; kill -9
    after the Nth 202 and restart at once. The number of 429s."""
    accepted = refused = 0
    for i in itertools.count():
        if accepted == 2 * SCENARIO_N:
            return refused
        async_id = f"d{i}"
        target = f"/v2/device-requests/sim-{i % SCENARIO_DEVICES}?async-id={async_id}"
        result = status[async_id] = await post(session, target, {"method": "GET", "uri": "/3/0/0"})
        if result == 429:
            refused += 1
            await trio.sleep(0.005)
        if result == 202:
            accepted += 1
            if accepted == SCENARIO_N:
                at, messages = trio.current_time(), inbox.messages
                await daemon.kill()
                await session.aclose()  # the client saw its server go: a new connection
                await daemon.start()
                kills.append(Kill(at, messages, trio.current_time()))
    raise AssertionError("unreachable")


# -- issue 6's test: lossy, sleepy devices sent writes, fast ones read, random kills ---------


@dataclass
class Ledger:
    """What the clients were told."""

    target: dict[str, tuple[str, str]] = field(default_factory=dict)  # async-id -> (ep, path)
    status: dict[str, int | None] = field(default_factory=dict)  # None: unknown

    def promised(self) -> list[str]:
        return [a for a, s in self.status.items() if s == 202]


async def post_commands(
    http: tuple[str, int],
    plan: list[tuple[str, str]],
    ledger: Ledger,
    rng: random.Random,
    stop: trio.Event,
) -> None:
    """POST the planned writes one by one until `stop`; never retry one that was sent."""
    async with Session(http, KEY) as session:
        while plan and not stop.is_set():
            endpoint, path = plan.pop()
            async_id = f"c{len(ledger.target)}"
            ledger.target[async_id] = (endpoint, path)
            value = base64.b64encode(b"%d" % rng.randrange(101)).decode()
            body = {"method": "PUT", "uri": path, "content-type": "text/plain",
                    "payload-b64": value}  # fmt: skip
            target = (
                f"/v2/device-requests/{endpoint}?async-id={async_id}&retry=10&expiry-seconds=600"
            )
            with trio.move_on_after(25) as late:
                ledger.status[async_id] = await post(session, target, body)
            if late.cancelled_caught:
                ledger.status[async_id] = None
                await session.aclose()
            await trio.sleep(rng.uniform(*PAUSE))


async def post_reads(
    http: tuple[str, int], endpoints: list[str], ledger: Ledger, stop: trio.Event
) -> None:
    """GET /3/0/0 of the fast devices in turn, one after another, until `stop` (most are
    answered from the value cache); a 429 waits 5 ms and goes on."""
    async with Session(http, KEY) as session:
        for i in itertools.count():
            if stop.is_set():
                return
            async_id = f"r{i}"
            endpoint = endpoints[i % len(endpoints)]
            ledger.target[async_id] = (endpoint, "/3/0/0")
            target = f"/v2/device-requests/{endpoint}?async-id={async_id}"
            with trio.move_on_after(25) as late:
                result = await post(session, target, {"method": "GET", "uri": "/3/0/0"})
            if late.cancelled_caught:
                result = None
                await session.aclose()
            ledger.status[async_id] = result
            await trio.sleep(0.005 if result == 429 else FAST_PAUSE)


async def crash_cycles(
    daemon: Daemon, rng: random.Random, log: list[str], kills: list[Kill], inbox: Inbox
) -> None:
    """Kill -9 the daemon at random moments and restart it, `CYCLES` times."""
    for cycle in range(CYCLES):
        await trio.sleep(rng.uniform(*UP))
        at, messages = trio.current_time(), inbox.messages
        await daemon.kill()
        down = rng.uniform(*DOWN)
        await trio.sleep(down)
        await daemon.start()
        kills.append(Kill(at, messages, trio.current_time()))
        early = rng.random() < EARLY_KILL
        if early:  # killed again while it loads the store and opens its sockets
            await trio.sleep(rng.uniform(0.0, 0.3))
            at, messages = trio.current_time(), inbox.messages
            await daemon.kill()
            await daemon.start()
            kills.append(Kill(at, messages, trio.current_time()))
        started = time.monotonic()
        with trio.fail_after(20):
            await daemon.ready()
        log.append(f"cycle {cycle}: down {down:.2f} s, early kill {early}, "
                   f"ready after {time.monotonic() - started:.2f} s")  # fmt: skip


class WatchedFleet(Fleet):
    """A fleet that also notes every CON PUT its UDP devices receive: (endpoint, Message ID,
    token) -> arrival times, to see the same exchange arrive again after a restart; and, for
    the report of a failure, every datagram of its UDP devices (the impairments apply after
    `send` and before `_deliver`: what is noted left the device or reached it). Its loss
    starts with `lossy`, so that the first registrations do not wait for retransmissions."""

    def __init__(self, config: FleetConfig) -> None:
        super().__init__(config)
        self.lossy = False  # the configured loss applies once this is set
        self.arrivals: defaultdict[tuple[str, int, bytes], list[float]] = defaultdict(list)
        self.traffic: defaultdict[str, list[str]] = defaultdict(list)

    def _deliver(self, dev: SimDevice, data: bytes, now: float) -> None:
        if len(data) >= 4 and (data[0] >> 4) & 3 == _CON and data[1] == Code.PUT:
            token = data[4 : 4 + (data[0] & 0xF)]
            self.arrivals[dev.endpoint, (data[2] << 8) | data[3], token].append(now)
        self._note(dev, "in ", data, now)
        super()._deliver(dev, data, now)

    def _impair(self) -> list[float]:
        return super()._impair() if self.lossy else [0.0]

    def send(self, device: SimDevice, data: bytes) -> None:
        if device.transport != TCP:
            self._note(device, "out", data, self._now)
        super().send(device, data)

    def _note(self, dev: SimDevice, way: str, data: bytes, now: float) -> None:
        if len(data) >= 4:
            kind = ["CON", "NON", "ACK", "RST"][(data[0] >> 4) & 3]
            token = data[4 : 4 + (data[0] & 0xF)].hex()
            self.traffic[dev.endpoint].append(
                f"{now:.2f} {way} {kind} {data[1] >> 5}.{data[1] & 31:02d} "
                f"mid={(data[2] << 8) | data[3]} token={token}"
            )


def resent_across_restart(fleet: WatchedFleet, kills: list[float]) -> int:
    """Exchanges that reached a device again after a kill (the same Message ID and token)."""
    return sum(
        any(a < k < b for k in kills)
        for times in fleet.arrivals.values()
        for a, b in itertools.pairwise(times)
    )


def reused_mids(fleet: WatchedFleet) -> int:
    """Message IDs the server used for two different exchanges with one device within
    EXCHANGE_LIFETIME: the device would answer the second from its deduplication cache."""
    seen: dict[tuple[str, int], list[tuple[float, bytes]]] = defaultdict(list)
    for (endpoint, mid, token), times in fleet.arrivals.items():
        seen[endpoint, mid].append((times[0], token))
    return sum(
        b[0] - a[0] < EXCHANGE_LIFETIME
        for uses in seen.values()
        for a, b in itertools.pairwise(sorted(uses))
    )


def mid_exposure(fleet: WatchedFleet, kills: list[float]) -> int:
    """Pairs of exchanges with one UDP device that two daemon processes started within
    EXCHANGE_LIFETIME, the older one still among the device's last 8 (its deduplication
    cache): each pair shares its Message ID with probability 1/65536."""
    starts: defaultdict[str, list[float]] = defaultdict(list)
    for (endpoint, _, _), times in fleet.arrivals.items():
        starts[endpoint].append(times[0])
    pairs = 0
    for times in starts.values():
        times.sort()
        for i, b in enumerate(times):
            pairs += sum(
                b - a < EXCHANGE_LIFETIME and any(a < k < b for k in kills)
                for a in times[max(0, i - 8) : i]
            )
    return pairs


def executions(fleet: Fleet) -> dict[tuple[str, str], list[float]]:
    """(endpoint, path) -> when the device executed a command's PUT."""
    done: dict[tuple[str, str], list[float]] = defaultdict(list)
    for dev in fleet.devices:
        for e in dev.executed or ():
            if e.code == Code.PUT and COMMAND.fullmatch(e.path):
                done[dev.endpoint, e.path].append(e.at)
    return done


def twice(times: list[float]) -> bool:
    """Executed more than once within EXCHANGE_LIFETIME."""
    times = sorted(times)
    return any(b - a < EXCHANGE_LIFETIME for a, b in itertools.pairwise(times))


@pytest.mark.parametrize("channel", CHANNELS)
async def test_kill_9_under_a_stream_of_commands_loses_and_duplicates_nothing(
    tmp_path: Path, channel: str
) -> None:
    try:
        await _crash_test(tmp_path, channel)
    finally:
        gc.collect()


async def _crash_test(tmp_path: Path, channel: str) -> None:
    rng = random.Random(SEED)  # the kills
    commands = random.Random(SEED + 1)  # the plan and the payloads
    daemon, coap_port = daemon_for(tmp_path, SETTINGS)
    http = daemon.http
    fleet = WatchedFleet(FleetConfig(
        server=("127.0.0.1", coap_port), devices=DEVICES, bindings=BINDINGS, lifetime=LIFETIME,
        ramp=200.0, loss=LOSS, seed=SEED, source_addresses=40, lights=LIGHTS,
        profile=Profile(awake=5.0, sleep=3.0, record=True, retry_base=0.5, retry_max=2.0),
    ))  # fmt: skip
    fast = Fleet(FleetConfig(
        server=("127.0.0.1", coap_port), devices=FAST, lifetime=FAST_LIFETIME, seed=SEED + 2,
        prefix="fast", source_base="127.0.1.2", source_addresses=FAST,
        profile=Profile(retry_base=0.5, retry_max=2.0),
    ))  # fmt: skip
    ledger = Ledger()
    inbox = Inbox(channel)
    cycles: list[str] = []
    kills: list[Kill] = []
    began = time.monotonic()
    try:
        with trio.fail_after(150 + 20 * CYCLES):
            await daemon.start()
            with trio.fail_after(20):
                await daemon.ready()
            async with trio.open_nursery() as nursery:
                await nursery.start(fleet.run)
                await nursery.start(fast.run)
                with trio.fail_after(20):
                    while fleet.totals.registered < DEVICES or fast.totals.registered < FAST:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await start_consumer(nursery, http, KEY, channel, inbox)
                fleet.lossy = True  # registered without loss: no Register waits 15 s for it
                plan = [(d.endpoint, f"/3311/{k}/5851") for d in fleet.devices
                        for k in range(LIGHTS)]  # fmt: skip
                commands.shuffle(plan)
                stop = trio.Event()
                async with trio.open_nursery() as clients:
                    for _ in range(2):
                        clients.start_soon(post_commands, http, plan, ledger, commands, stop)
                    clients.start_soon(post_reads, http, [d.endpoint for d in fast.devices],
                                       ledger, stop)  # fmt: skip
                    await crash_cycles(daemon, rng, cycles, kills, inbox)
                    stop.set()
                commands_done = time.monotonic()
                await answered(inbox, ledger.status, DRAIN)
                drained = time.monotonic()
                pending = await queues(http, ledger, inbox)  # the daemon's view of unanswered
                await trio.sleep(SETTLE)  # late repeats (and a long poll acknowledges)
                nursery.cancel_scope.cancel()
    finally:
        await daemon.kill()

    result = tally(inbox, ledger.status, kills, WINDOWS[channel])
    promised = ledger.promised()
    writes = [a for a in promised if COMMAND.fullmatch(ledger.target[a][1])]
    reads = [a for a in promised if not COMMAND.fullmatch(ledger.target[a][1])]
    unknown = [a for a, s in ledger.status.items() if s is None]
    refused = Counter(s for s in ledger.status.values() if s not in (None, 202))
    outcome = {a: copies[0].outcome for a, copies in inbox.arrivals.items()}
    done = executions(fleet)
    tcp = {d.endpoint for d in fleet.devices if d.transport == TCP}
    double_udp = {k: v for k, v in done.items() if twice(v) and k[0] not in tcp}
    double_tcp = {k: v for k, v in done.items() if twice(v) and k[0] in tcp}
    not_run = [a for a in writes if outcome.get(a) == "200" and ledger.target[a] not in done]
    misplaced = [k for k in done if k not in set(ledger.target.values())]
    detail = [
        f"{a} -> {ledger.target[a]}: executed at {done.get(ledger.target[a])}; the device's "
        f"last datagrams:\n    " + "\n    ".join(fleet.traffic[ledger.target[a][0]][-30:])
        for a in result.missing if a in writes
    ]  # fmt: skip
    at = [k.at for k in kills]
    read_200 = sum(outcome.get(a) == "200" for a in reads)
    cached = read_200 - fast.totals.requests  # the rest were read from the devices
    exposure = mid_exposure(fleet, at)
    reused = reused_mids(fleet)
    summary = "\n".join([
        f"crash test, seed {SEED}, channel {channel}: {len(kills)} kills (kill -9), "
        f"{daemon.starts} starts, {inbox.connections} connections, {inbox.messages} messages; "
        f"commands for {commands_done - began:.1f} s, drained in {drained - commands_done:.1f} s",
        *cycles,
        f"POSTs: {len(ledger.status)}, promised (202) {len(promised)} ({len(writes)} writes, "
        f"{len(reads)} reads of fast devices, "
        f"{read_200} of them answered 200, {cached} of those from the value cache), unknown "
        f"(connection broke) {len(unknown)}, refused {dict(refused)}",
        result.line(channel),
        f"unknown POSTs answered {sum(a in inbox.arrivals for a in unknown)}; statuses "
        f"{dict(Counter(outcome[a] for a in promised if a in outcome))}",
        f"devices: {sum(len(v) for v in done.values())} executions of {len(done)} writes; "
        f"executed twice within {EXCHANGE_LIFETIME:.0f} s: UDP {len(double_udp)}, "
        f"TCP {len(double_tcp)} (no deduplication on TCP); answered 200 but never executed "
        f"{len(not_run)}; resent as the same exchange after a restart "
        f"{resent_across_restart(fleet, at)}",
        f"Message IDs: {exposure} pairs of exchanges from two processes within the device's "
        f"deduplication window (with random first MIDs {exposure / 65536:.4f} collisions "
        f"expected), Message IDs reused {reused}",
        f"fleet {fleet.totals.as_dict()}; fast devices {fast.totals.as_dict()}",
        f"events delivered {dict(inbox.kinds)}",
        f"device states (transport, queue, state): "
        f"{dict(Counter((d.transport, d.queue, d.state) for d in fleet.devices))}",
        f"kills at {[round(k, 2) for k in at]}",
        f"missing: {blocks(result.missing)}"[:400],
        *result.outside[:10],
        *pending,
        *detail,
        *(inbox.log[-20:] if result.missing else ()),
    ])  # fmt: skip
    print(summary)
    verdict(result, summary)
    assert len(kills) >= CYCLES and len(writes) >= 10 * CYCLES and cached >= 5 * CYCLES, summary
    assert not reused, f"a Message ID reused within EXCHANGE_LIFETIME\n{summary}"
    assert not double_udp, f"executed twice: {double_udp}\n{summary}"
    assert not misplaced, f"executed where never sent: {misplaced}\n{summary}"
    assert not not_run, f"answered, never executed: {not_run}\n{summary}"


async def queues(http: tuple[str, int], ledger: Ledger, inbox: Inbox) -> list[str]:
    """The daemon's view of the devices of commands still unanswered (for the report)."""
    waiting = sorted({ledger.target[a][0] for a in ledger.promised() if a not in inbox.arrivals})
    out = []
    async with HttpClient(http, KEY) as client:
        for endpoint in waiting:
            reply = await client.request("GET", f"/v2/device-requests/{endpoint}")
            out.append(f"{endpoint}: {reply.status} {reply.text}")
    return out
