"""A simulated fleet against a running dm_actor over loopback, in virtual time.

The server's view (the events it publishes) must match what the fleet did: registrations,
one AsyncIDResponse per command with the device's answer, every notification, and commands
to sleeping queue-mode devices delivered once when they wake.
"""

from __future__ import annotations

import base64
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from dm_actor.lwm2m import content
from dm_actor.sim.client import OWN_UDP, SHARED_UDP, SLEEPING, TCP, Profile
from dm_actor.sim.fleet import Fleet, FleetConfig

if TYPE_CHECKING:
    from dm_actor.sim.client import SimDevice

SETTINGS = '[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n'


class View:
    """The events the server published, by kind."""

    def __init__(self, events: EventStream) -> None:
        self.events = events
        self.seen: list[tuple[str, object]] = []

    def take(self, kind: str) -> list[object]:
        self.seen.extend((k, item) for k, item, _, _ in self.events.take(1_000_000))
        taken = [item for k, item in self.seen if k == kind]
        self.seen = [(k, item) for k, item in self.seen if k != kind]
        return taken


async def start(
    nursery: trio.Nursery, config: dict[str, object]
) -> tuple[app.Listening, View, Fleet, trio.CancelScope]:
    events = EventStream(capacity=1_000_000)
    settings = parse_settings(SETTINGS)
    listening: app.Listening = await nursery.start(
        partial(app.serve, settings, events=events, http=False)
    )
    udp, tcp = listening.coap_udp[:2], listening.coap_tcp[:2]
    fleet = Fleet(FleetConfig(server=udp, tcp_server=tcp, **config))  # type: ignore[arg-type]
    scope = trio.CancelScope()

    async def run_fleet(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await fleet.run(task_status=task_status)

    await nursery.start(run_fleet)
    return listening, View(events), fleet, scope


def executed(dev: SimDevice, path: str) -> list[float]:
    return [e.at for e in dev.executed or () if e.path == path]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_mixed_fleet_registers_answers_notifies_sleeps_and_wakes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, view, fleet, fleet_scope = await start(nursery, {
        "devices": 300, "bindings": ("U", "UQ", "T", "TQ"), "ramp": 100.0, "lifetime": 600,
        "sample_period": 10.0, "seed": 11, "source_addresses": 50,
        "profile": Profile(awake=60.0, sleep=120.0, record=True),
    })  # fmt: skip
    sup = listening.supervisor
    devices = {d.endpoint: d for d in fleet.devices}
    kinds = Counter(d.transport for d in fleet.devices)
    assert kinds == {SHARED_UDP: 75, OWN_UDP: 75, TCP: 150}
    await trio.sleep(4)

    # registrations: every device once, from its own (address, port) or connection
    assert fleet.totals.registered == 300 and fleet.totals.errors == 0
    registered = view.take("registrations")
    assert sorted(str(r["ep"]) for r in registered) == sorted(devices)  # type: ignore[index]
    shared = {(str(d.src), d.port) for d in fleet.devices if d.transport == SHARED_UDP}
    assert len(shared) == 75 and len({port for _, port in shared}) == 2  # 50 addresses a socket

    # commands: one AsyncIDResponse each, with the device's answer; executed exactly once
    for ep in devices:
        assert await sup.submit(ep, "GET", "/3/0/0", async_id=f"get-{ep}") == Accepted()
    await trio.sleep(10)
    answers = {str(r["id"]): r for r in view.take("async-responses")}  # type: ignore[index]
    assert sorted(answers) == sorted(f"get-{ep}" for ep in devices)
    # (the devices announce SenML JSON, `</>;ct=110`: a read without accept asks for it)
    assert {(r["status"], r["ct"]) for r in answers.values()} == {(200, "application/senml+json")}  # type: ignore[index]
    values = {
        str(v.value)
        for r in answers.values()
        for v in content.decode(110, base64.b64decode(str(r["payload"])))  # type: ignore[index]
    }
    assert values == {"dm-actor"}
    assert all(len(executed(d, "/3/0/0")) == 1 for d in devices.values())

    # notifications: every device observes its temperature
    for ep in devices:
        assert await sup.subscribe(ep, "/3303/0/5700") == Accepted()
    await trio.sleep(40)
    assert fleet.totals.notifications > 300
    first_values = view.take("notifications")
    assert {str(n["ep"]) for n in first_values} == set(devices)  # type: ignore[index]
    assert fleet.totals.sleeping == 0

    # queue mode: asleep 60 s after the last request, sockets and connections closed
    await trio.sleep(60)  # t ~ 114
    asleep = [d for d in fleet.devices if d.queue]
    assert all(d.state == SLEEPING and d.sock is None for d in asleep)
    assert fleet.totals.sleeping == 150
    for dev in asleep:
        ok = await sup.submit(dev.endpoint, "GET", "/3/0/1", async_id=f"wake-{dev.endpoint}")
        assert ok == Accepted()
    await trio.sleep(30)
    assert view.take("async-responses") == []  # nobody answers while asleep
    assert all(not executed(d, "/3/0/1") for d in asleep)
    await trio.sleep(120)  # t ~ 264: every sleeper woke (at ~180..245) with an Update
    assert fleet.totals.wakes >= 150
    woken = {str(r["id"]): r for r in view.take("async-responses")}  # type: ignore[index]
    assert sorted(woken) == sorted(f"wake-{d.endpoint}" for d in asleep)
    assert {r["status"] for r in woken.values()} == {200}  # type: ignore[index]
    values = {
        str(v.value)
        for r in woken.values()
        for v in content.decode(110, base64.b64decode(str(r["payload"])))  # type: ignore[index]
    }
    assert values == {"sim-1"}
    for dev in asleep:
        [at] = executed(dev, "/3/0/1")  # exactly once, after waking
        assert at > 144.0

    # the server's view of everything the fleet did
    fleet_scope.cancel()
    await trio.sleep(5)
    totals = fleet.totals
    assert len(view.take("registrations")) == totals.registrations - 300
    assert len(view.take("reg-updates")) == totals.updates > 0
    notified = Counter(str(n["ep"]) for n in view.take("notifications"))  # type: ignore[index]
    notified.update(str(n["ep"]) for n in first_values)  # type: ignore[index]
    for ep, dev in devices.items():
        observe_responses = sum(
            1 for e in dev.executed or () if e.code == Code.GET and e.path == "/3303/0/5700"
        )
        assert notified[ep] == dev.notifications + observe_responses, ep
    assert totals.errors == 0


async def test_lossy_network_still_executes_each_command_exactly_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, view, fleet, _ = await start(nursery, {
        "devices": 60, "bindings": ("U", "UQ"), "ramp": 30.0, "loss": 0.15,
        "duplicate": 0.2, "delay": 0.5, "seed": 4, "profile": Profile(sleep=60.0, record=True),
    })  # fmt: skip
    await trio.sleep(200)  # Registers may need retransmissions
    assert fleet.totals.registered == 60
    for dev in fleet.devices:
        assert await listening.supervisor.submit(
            dev.endpoint, "PUT", "/3311/0/5851", async_id=f"w-{dev.index}", payload=b"42",
            content_format=0, retry=3,
        ) == Accepted()  # fmt: skip
    await trio.sleep(300)
    answers = {str(r["id"]): r["status"] for r in view.take("async-responses")}  # type: ignore[index]
    assert answers == {f"w-{d.index}": 200 for d in fleet.devices}
    assert fleet.net.lost > 0 and fleet.net.duplicated > 0
    for dev in fleet.devices:
        assert len(executed(dev, "/3311/0/5851")) == 1  # retransmissions deduplicated
        assert dev.light(0).dimmer == 42


async def test_sends_reach_the_subscribers_as_notifications(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """`Profile.send_interval`: every device Sends its temperature (LwM2M Send, SenML CBOR);
    the server answers 2.04 and publishes each to the application subscribed to it."""
    listening, view, fleet, fleet_scope = await start(nursery, {
        "devices": 40, "bindings": ("U", "T"), "ramp": 20.0, "seed": 5,
        "profile": Profile(send_interval=10.0),
    })  # fmt: skip
    sup = listening.supervisor
    await trio.sleep(3)
    assert fleet.totals.registered == 40
    subscribed = fleet.devices[::2]  # half of them
    for dev in subscribed:
        assert await sup.subscribe(dev.endpoint, "/3303/0/5700") == Accepted()
    before = {dev.endpoint: dev.sends for dev in subscribed}
    await trio.sleep(30)
    fleet_scope.cancel()
    await trio.sleep(5)
    totals = fleet.totals
    assert totals.sends >= 40 * 3 and totals.errors == 0 and totals.sends_refused == 0
    assert sup.statistics["sends"] == totals.sends
    sent = [n for n in view.take("notifications") if n["ct"] == "application/senml+cbor"]  # type: ignore[index]
    assert {n["path"] for n in sent} == {"/3303/0/5700"}  # type: ignore[index]
    by_device = Counter(str(n["ep"]) for n in sent)  # type: ignore[index]
    assert set(by_device) == set(before)
    for dev in subscribed:
        # each Send answered since the subscription was published once (give or take the
        # one whose 2.04 was on its way as the subscription came, or as the fleet stopped)
        assert abs(by_device[dev.endpoint] - (dev.sends - before[dev.endpoint])) <= 1
