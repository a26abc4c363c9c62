"""Issue 6's crash test: kill -9 a real daemon under a stream of commands, again and again.

A real `dm-actor serve --store sqlite` runs in a subprocess on fixed loopback ports; a mixed
fleet of simulated devices (U, UQ and T bindings, short lifetimes so they contact the server
often) runs in this process; a WebSocket channel registered with `include_uid` collects the
AsyncIDResponses; two clients POST one distinct command after another (a PUT of a dimmer
`/3311/k/5851`: each command has its own resource on its device, so the device's record of
executed requests names the command). Meanwhile the daemon is killed with SIGKILL at seeded
random moments and restarted on the same ports and data directory. A POST answered 202 is a
promise; one whose connection broke after it was sent is "unknown" and never retried.

At the end: every promised command has exactly one AsyncIDResponse (raw repeats of the same
`uid` after a restart are allowed and counted), and no UDP device executed a command twice
(the daemon resends an attempt that was in flight at the crash as the same CoAP exchange, so
the device's deduplication answers it). CoAP over TCP has no deduplication (RFC 8323): a
command in flight on a connection the crash broke may run twice there; that is counted and
printed, not asserted. Real time throughout (the daemon is another process): every wait is
bounded. `DM_ACTOR_CRASH_SEED` picks another seed (it fixes the kill schedule and the
commands; what the kills interrupt depends on timing).

Message IDs: a new request must never share its Message ID with one the previous process sent
the same device within EXCHANGE_LIFETIME (the device would answer it from its deduplication
cache without executing it). The server reserves MIDs per device in the store and a restarted
daemon starts past the reservation; the summary prints how many pairs of exchanges from two
processes fell within the window (with random first MIDs each would collide with probability
1/65536) and the test asserts that no MID was reused.
"""

from __future__ import annotations

import base64
import gc
import itertools
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from dm_actor.coap.numbers import Code, MessageType
from dm_actor.sim.client import TCP, Profile
from dm_actor.sim.fleet import Fleet, FleetConfig
from tests.api.client import WEBSOCKET_PATH as WEBSOCKET, HttpClient
from tests.daemon import Daemon, NotSent, free_ports, post

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.sim.client import SimDevice

pytestmark = pytest.mark.crash

SEED = int(os.environ.get("DM_ACTOR_CRASH_SEED", "6"))
KEY = "ak_crash"
DEVICES = 48
BINDINGS = ("U", "UQ", "T")
LIGHTS = 16  # distinct command slots per device
PAUSE = (0.08, 0.25)  # seconds between two POSTs of one client (two clients)
LIFETIME = 20  # an Update every 10 s
LOSS = 0.1  # of datagrams, each way: answers lost keep attempts in flight across kills
CYCLES = 10  # kill -9 and restart
UP = (0.4, 2.0)  # seconds up between kills
DOWN = (0.0, 0.6)  # seconds down before the restart
EARLY_KILL = 0.15  # chance that a restart is killed again before it is ready
DRAIN = 40.0  # seconds for the last responses after the last restart
SETTLE = 2.0  # then this long for late repeats
EXCHANGE_LIFETIME = 247.0
_CON = MessageType.CON.value
COMMAND = re.compile(r"/3311/\d+/5851")

SETTINGS = """\
[delivery]
# resend an attempt interrupted by a crash on the device's next contact, not 120 s later
resend_grace = 1.0
# the devices stay awake 5 s after an exchange; the server believes 4 s
awake_time = 4.0
"""


@dataclass
class Ledger:
    """What the clients were told, and what the channel delivered."""

    target: dict[str, tuple[str, str]] = field(default_factory=dict)  # async-id -> (ep, path)
    status: dict[str, int | None] = field(default_factory=dict)  # None: unknown
    uids: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    outcome: dict[str, str] = field(default_factory=dict)  # async-id -> its status, error
    raw: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # events of each kind delivered
    connections: int = 0
    ws_log: list[str] = field(default_factory=list)
    answered: trio.Event = field(default_factory=trio.Event)

    def promised(self) -> list[str]:
        return [a for a, s in self.status.items() if s == 202]

    def receive(self, item: dict[str, Any]) -> None:
        self.raw += 1
        self.uids[str(item["id"])].add(str(item["uid"]))
        self.outcome[str(item["id"])] = f"{item['status']} {item.get('error', '')}".strip()
        self.check()

    def record(self, async_id: str, status: int | None) -> None:
        self.status[async_id] = status
        self.check()

    def check(self) -> None:
        """`answered` is set exactly while every promised command has its response."""
        if all(a in self.uids for a in self.promised()):
            self.answered.set()
        elif self.answered.is_set():
            self.answered = trio.Event()


async def collect(http: tuple[str, int], ledger: Ledger) -> None:
    """The channel's client: connect, read AsyncIDResponses, reconnect after every crash.

    It owns its TCP stream (trio-websocket's client leaves it open when the server goes first)
    and bounds the opening handshake (trio-websocket 0.12 waits for ever when the connection
    breaks before the server accepted the upgrade: a daemon killed at that moment).
    """
    while True:
        ledger.ws_log.append(f"{trio.current_time():.2f} connect")
        try:
            stream = await trio.open_tcp_stream(*http)
            async with stream, trio.open_nursery() as nursery:
                with trio.fail_after(3):
                    ws = await wrap_client_stream(
                        nursery, stream, http[0], WEBSOCKET, subprotocols=["wss", f"pelion_{KEY}"]
                    )
                ledger.connections += 1
                ledger.ws_log.append(f"{trio.current_time():.2f} connected")
                try:
                    while True:
                        message = json.loads(await ws.get_message())
                        for kind, items in message.items():
                            ledger.kinds[kind] += len(items)
                        for item in message.get("async-responses", ()):
                            ledger.receive(item)
                finally:
                    nursery.cancel_scope.cancel()
        except* (ConnectionClosed, OSError, trio.BrokenResourceError, trio.TooSlowError) as group:
            ledger.ws_log.append(f"{trio.current_time():.2f} {group.exceptions!r}"[:160])
        await trio.sleep(0.05)


async def post_commands(
    http: tuple[str, int],
    plan: list[tuple[str, str]],
    ledger: Ledger,
    rng: random.Random,
    stop: trio.Event,
) -> None:
    """POST the planned commands one by one until `stop`; never retry one that was sent."""
    while plan and not stop.is_set():
        endpoint, path = plan.pop()
        async_id = f"c{len(ledger.target)}"
        ledger.target[async_id] = (endpoint, path)
        body = {"method": "PUT", "uri": path, "content-type": "text/plain",
                "payload-b64": base64.b64encode(b"%d" % rng.randrange(101)).decode()}  # fmt: skip
        target = f"/v2/device-requests/{endpoint}?async-id={async_id}&retry=10&expiry-seconds=600"
        status: int | None = None
        while not stop.is_set():
            with trio.move_on_after(5):
                try:
                    status = await post(http, target, KEY, body)
                except NotSent:
                    await trio.sleep(0.05)  # the daemon is down: nothing was sent, try again
                    continue
                except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                    pass  # broken after sending: unknown, not retried
            break
        ledger.record(async_id, status)
        await trio.sleep(rng.uniform(*PAUSE))


async def crash_cycles(
    daemon: Daemon, rng: random.Random, log: list[str], kills: list[float]
) -> None:
    """Kill -9 the daemon at random moments and restart it, `CYCLES` times."""
    for cycle in range(CYCLES):
        await trio.sleep(rng.uniform(*UP))
        kills.append(trio.current_time())
        await daemon.kill()
        down = rng.uniform(*DOWN)
        await trio.sleep(down)
        await daemon.start()
        early = rng.random() < EARLY_KILL
        if early:  # killed again while it loads the store and opens its sockets
            await trio.sleep(rng.uniform(0.0, 0.3))
            kills.append(trio.current_time())
            await daemon.kill()
            await daemon.start()
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


# trio-websocket's client keeps its TCP socket when the server side vanishes (here: kill -9);
# the garbage collector reports those sockets: collected here, while the filters hold
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_kill_9_under_a_stream_of_commands_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    try:
        await _crash_test(tmp_path)
    finally:
        gc.collect()


async def _crash_test(tmp_path: Path) -> None:
    rng = random.Random(SEED)  # the kills
    commands = random.Random(SEED + 1)  # the plan and the payloads
    coap_port, http_port = free_ports(2)
    http = ("127.0.0.1", http_port)
    (tmp_path / "settings.toml").write_text(SETTINGS)
    daemon = Daemon(
        ["--config", str(tmp_path / "settings.toml"), "--store", "sqlite", "--data-dir",
         str(tmp_path / "data"), "--host", "127.0.0.1", "--coap-port", str(coap_port),
         "--http-port", str(http_port), "--api-key", KEY, "--log-level", "info"],
        http, tmp_path / "daemon.log",
    )  # fmt: skip
    fleet = WatchedFleet(FleetConfig(
        server=("127.0.0.1", coap_port), devices=DEVICES, bindings=BINDINGS, lifetime=LIFETIME,
        ramp=200.0, loss=LOSS, seed=SEED, source_addresses=40, lights=LIGHTS,
        profile=Profile(awake=5.0, sleep=3.0, record=True, retry_base=0.5, retry_max=2.0),
    ))  # fmt: skip
    ledger = Ledger()
    cycles: list[str] = []
    kills: list[float] = []
    began = time.monotonic()
    try:
        with trio.fail_after(150):
            await daemon.start()
            with trio.fail_after(20):
                await daemon.ready()
            await open_channel(http)
            async with trio.open_nursery() as nursery:
                await nursery.start(fleet.run)
                nursery.start_soon(collect, http, ledger)
                with trio.fail_after(20):
                    while fleet.totals.registered < DEVICES:  # noqa: ASYNC110 (a counter)
                        await trio.sleep(0.05)
                fleet.lossy = True  # registered without loss: no Register waits 15 s for it
                plan = [(d.endpoint, f"/3311/{k}/5851") for d in fleet.devices
                        for k in range(LIGHTS)]  # fmt: skip
                commands.shuffle(plan)
                stop = trio.Event()
                async with trio.open_nursery() as clients:
                    for _ in range(2):
                        clients.start_soon(post_commands, http, plan, ledger, commands, stop)
                    await crash_cycles(daemon, rng, cycles, kills)
                    stop.set()
                commands_done = time.monotonic()
                with trio.move_on_after(DRAIN):
                    await ledger.answered.wait()
                drained = time.monotonic()
                pending = await queues(http, ledger)  # what the daemon says of unanswered ones
                await trio.sleep(SETTLE)
                nursery.cancel_scope.cancel()
    finally:
        await daemon.kill()

    promised = ledger.promised()
    unknown = [a for a, s in ledger.status.items() if s is None]
    refused = Counter(s for s in ledger.status.values() if s not in (None, 202))
    missing = [a for a in promised if a not in ledger.uids]
    duplicated = {a: ledger.uids[a] for a in promised if len(ledger.uids[a]) > 1}
    distinct = sum(len(u) for u in ledger.uids.values())
    done = executions(fleet)
    tcp = {d.endpoint for d in fleet.devices if d.transport == TCP}
    double_udp = {k: v for k, v in done.items() if twice(v) and k[0] not in tcp}
    double_tcp = {k: v for k, v in done.items() if twice(v) and k[0] in tcp}
    not_run = [a for a in promised
               if ledger.outcome.get(a) == "200" and ledger.target[a] not in done]  # fmt: skip
    strays = [a for a in ledger.uids if a not in ledger.target]
    misplaced = [k for k in done if k not in set(ledger.target.values())]
    detail = [
        f"{a} -> {ledger.target[a]}: executed at {done.get(ledger.target[a])}; the device's "
        f"last datagrams:\n    " + "\n    ".join(fleet.traffic[ledger.target[a][0]][-30:])
        for a in missing
    ]
    exposure = mid_exposure(fleet, kills)
    reused = reused_mids(fleet)
    summary = "\n".join([
        f"crash test, seed {SEED}: {len(kills)} kills (kill -9), {daemon.starts} starts, "
        f"{ledger.connections} WebSocket connections; commands for "
        f"{commands_done - began:.1f} s, drained in {drained - commands_done:.1f} s",
        *cycles,
        f"POSTs: {len(ledger.status)}, promised (202) {len(promised)}, unknown (connection "
        f"broke) {len(unknown)}, refused {dict(refused)}",
        f"AsyncIDResponses: {ledger.raw} raw, {distinct} distinct uids, raw repeats "
        f"{ledger.raw - distinct}; promised answered {len(promised) - len(missing)}, "
        f"missing {len(missing)}, duplicated (two uids) {len(duplicated)}; "
        f"unknown POSTs answered {sum(a in ledger.uids for a in unknown)}; "
        f"statuses {dict(Counter(ledger.outcome[a] for a in promised if a in ledger.outcome))}",
        f"devices: {sum(len(v) for v in done.values())} executions of {len(done)} commands; "
        f"executed twice within {EXCHANGE_LIFETIME:.0f} s: UDP {len(double_udp)}, "
        f"TCP {len(double_tcp)} (no deduplication on TCP); answered 200 but never executed "
        f"{len(not_run)}; resent as the same exchange after a restart "
        f"{resent_across_restart(fleet, kills)}",
        f"Message IDs: {exposure} pairs of exchanges from two processes within the device's "
        f"deduplication window (with random first MIDs {exposure / 65536:.4f} collisions "
        f"expected), Message IDs reused {reused}",
        f"fleet {fleet.totals.as_dict()}; events delivered {dict(ledger.kinds)}",
        f"device states (transport, queue, state): "
        f"{dict(Counter((d.transport, d.queue, d.state) for d in fleet.devices))}",
        f"kills at {[round(k, 2) for k in kills]}",
        *pending,
        *detail,
        *(ledger.ws_log[-20:] if missing else ()),
    ])  # fmt: skip
    print(summary)
    assert len(kills) >= CYCLES and len(promised) >= 100, summary
    assert not missing, f"lost: {missing}\n{summary}"
    assert not duplicated, f"two responses: {duplicated}\n{summary}"
    assert not strays, f"responses to commands never sent: {strays}\n{summary}"
    assert not reused, f"a Message ID reused within EXCHANGE_LIFETIME\n{summary}"
    assert not double_udp, f"executed twice: {double_udp}\n{summary}"
    assert not misplaced, f"executed where never sent: {misplaced}\n{summary}"
    assert not not_run, f"answered, never executed: {not_run}\n{summary}"


async def open_channel(http: tuple[str, int]) -> None:
    """The WebSocket channel, every item with its `uid`."""
    async with HttpClient(http, KEY) as client:
        reply = await client.request(
            "PUT",
            "/v2/notification/websocket",
            json={"serialization": {"cfg": {"include_uid": True}}},
        )
    assert reply.status == 201, reply


async def queues(http: tuple[str, int], ledger: Ledger) -> list[str]:
    """The daemon's view of the devices of commands still unanswered (for the report)."""
    waiting = sorted({ledger.target[a][0] for a in ledger.promised() if a not in ledger.uids})
    out = []
    async with HttpClient(http, KEY) as client:
        for endpoint in waiting:
            reply = await client.request("GET", f"/v2/device-requests/{endpoint}")
            out.append(f"{endpoint}: {reply.status} {reply.text}")
    return out
