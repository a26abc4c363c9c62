"""A simulated fleet over DTLS (coaps://, PSK per device) against a running dm_actor over
loopback, in virtual time: handshake then Register, commands answered, notifications, queue
mode asleep and awake on the same session, credentials refused, a lossy network.
"""

from __future__ import annotations

import base64
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Accepted
from dm_actor.address import is_session
from dm_actor.config import parse_settings
from dm_actor.lwm2m import content
from dm_actor.sim.client import REGISTERED, SLEEPING, Profile
from dm_actor.sim.fleet import Fleet, FleetConfig
from dm_actor.sim.secure import derived_key
from tests.sim.test_fleet import View, executed

if TYPE_CHECKING:
    from dm_actor.sim.client import SimDevice

SETTINGS = '[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n'
SECRET = b"fleet secret"


async def start(
    nursery: trio.Nursery, config: dict[str, object], *, provision: bool = True
) -> tuple[app.Listening, View, Fleet, trio.CancelScope]:
    events = EventStream(capacity=1_000_000)
    listening: app.Listening = await nursery.start(
        partial(app.serve, parse_settings(SETTINGS), events=events, http=False)
    )
    assert listening.coaps is not None
    fleet = Fleet(
        FleetConfig(server=listening.coaps[:2], dtls=True, psk_secret=SECRET, **config)  # type: ignore[arg-type]
    )
    if provision:
        for i in range(fleet.config.devices):
            name = f"{fleet.config.prefix}-{i}"
            listening.supervisor.provisioning.set(name, name, derived_key(SECRET, name))
    scope = trio.CancelScope()

    async def run_fleet(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await fleet.run(task_status=task_status)

    await nursery.start(run_fleet)
    return listening, View(events), fleet, scope


def _values(answers: list[object]) -> set[str]:
    return {
        str(v.value)
        for r in answers
        for v in content.decode(110, base64.b64decode(str(r["payload"])))  # type: ignore[index]
    }


async def test_fleet_over_dtls_registers_answers_commands_and_notifies(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, view, fleet, scope = await start(nursery, {
        "devices": 12, "bindings": ("U", "UQ"), "ramp": 10.0, "seed": 3, "source_addresses": 4,
        "lifetime": 600, "sample_period": 10.0, "profile": Profile(awake=30.0, record=True),
    })  # fmt: skip
    sup = listening.supervisor
    await trio.sleep(3)
    assert fleet.totals.registered == 12 and fleet.totals.errors == 0
    assert fleet.dtls.handshakes == 12 and fleet.dtls.handshake_failures == 0
    devices = {d.endpoint: d for d in fleet.devices}
    registered = view.take("registrations")
    assert sorted(str(r["ep"]) for r in registered) == sorted(devices)  # type: ignore[index]
    for ep in devices:  # each known to the server by its DTLS session
        addr = sup.by_endpoint[ep].addr
        assert addr is not None and is_session(addr)
    assert listening.dtls is not None and listening.dtls.sessions() == 12

    # a command each, answered over the session
    for ep in devices:
        assert await sup.submit(ep, "GET", "/3/0/0", async_id=f"get-{ep}") == Accepted()
    await trio.sleep(5)
    answers = view.take("async-responses")
    assert sorted(str(r["id"]) for r in answers) == sorted(f"get-{ep}" for ep in devices)  # type: ignore[index]
    assert {r["status"] for r in answers} == {200}  # type: ignore[index]
    assert _values(answers) == {"dm-actor"}
    assert all(len(executed(d, "/3/0/0")) == 1 for d in devices.values())

    # notifications of the U devices' temperatures
    awake = [d for d in fleet.devices if not d.queue]
    for dev in awake:
        assert await sup.subscribe(dev.endpoint, "/3303/0/5700") == Accepted()
    await trio.sleep(20)
    notified = {str(n["ep"]) for n in view.take("notifications")}  # type: ignore[index]
    assert notified == {d.endpoint for d in awake}
    assert sum(d.notifications for d in awake) >= len(awake)

    # queue mode: asleep (socket closed, session kept), a command waits, the device wakes
    # on a new socket with an Update on the same session (its Connection ID)
    await trio.sleep(30)
    sleepers = [d for d in fleet.devices if d.queue]
    assert all(d.state == SLEEPING and d.sock is None for d in sleepers)
    for dev in sleepers:
        ok = await sup.submit(dev.endpoint, "GET", "/3/0/1", async_id=f"wake-{dev.endpoint}")
        assert ok == Accepted()
    handshakes = fleet.dtls.handshakes
    await trio.sleep(600)  # they wake for their Update (lifetime 600)
    woken = view.take("async-responses")
    assert sorted(str(r["id"]) for r in woken) == sorted(f"wake-{d.endpoint}" for d in sleepers)  # type: ignore[index]
    assert _values(woken) == {"sim-1"}
    assert fleet.dtls.handshakes == handshakes  # no new handshake: the sessions were kept
    scope.cancel()
    assert fleet.totals.errors == 0 and fleet.dtls.records_dropped == 0


async def test_a_device_without_server_credentials_is_refused_and_retries(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, _, fleet, _ = await start(
        nursery,
        {"devices": 3, "seed": 1, "profile": Profile(retry_base=5.0)},
        provision=False,
    )
    sup = listening.supervisor
    sup.provisioning.set("sim-0", "sim-0", derived_key(SECRET, "sim-0"))
    sup.provisioning.set("sim-1", "sim-1", b"\x01" * 16)  # another key
    await trio.sleep(2)
    dev0, dev1, dev2 = fleet.devices
    assert dev0.state == REGISTERED
    assert dev1.state != REGISTERED and dev2.state != REGISTERED
    assert fleet.dtls.handshakes == 1 and fleet.dtls.handshake_failures == 2
    assert sorted(sup.by_endpoint) == ["sim-0"]
    # once the server knows sim-2, its next attempt (after the back-off) succeeds
    sup.provisioning.set("sim-2", "sim-2", derived_key(SECRET, "sim-2"))
    await trio.sleep(10)
    assert dev2.state == REGISTERED and sorted(sup.by_endpoint) == ["sim-0", "sim-2"]


async def test_removed_credentials_end_the_session_and_the_device_shakes_hands_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, _, fleet, _ = await start(nursery, {"devices": 2, "seed": 2})
    sup = listening.supervisor
    await trio.sleep(2)
    assert fleet.totals.registered == 2
    dev: SimDevice = fleet.devices[0]
    sup.provisioning.remove(dev.endpoint)
    await trio.sleep(1)
    assert fleet.dtls.sessions_closed == 1 and dev.dtls is None and dev.state != REGISTERED
    assert dev.endpoint not in sup.by_endpoint
    sup.provisioning.set(dev.endpoint, dev.endpoint, derived_key(SECRET, dev.endpoint))
    await trio.sleep(30)  # its back-off, then a new handshake and a Register
    assert dev.state == REGISTERED and fleet.dtls.handshakes >= 3
    assert dev.endpoint in sup.by_endpoint


async def test_handshakes_and_commands_survive_a_lossy_network(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    listening, view, fleet, _ = await start(nursery, {
        "devices": 20, "bindings": ("U", "UQ"), "ramp": 10.0, "loss": 0.15, "duplicate": 0.2,
        "delay": 0.5, "seed": 7, "profile": Profile(sleep=60.0, record=True),
    })  # fmt: skip
    await trio.sleep(300)  # flights and Registers may need retransmissions
    assert fleet.totals.registered == 20
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
        assert len(executed(dev, "/3311/0/5851")) == 1
        assert dev.light(0).dimmer == 42


async def test_without_connection_ids_a_waking_device_shakes_hands_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A queue-mode device wakes on a new socket: without a CID the server could not find its
    session from the new port, so it makes a new one (the server keeps its session address:
    the same identity again)."""
    listening, view, fleet, _ = await start(nursery, {
        "devices": 4, "bindings": ("UQ",), "seed": 9, "connection_id": False,
        "profile": Profile(awake=5.0, sleep=20.0, record=True),
    })  # fmt: skip
    sup = listening.supervisor
    await trio.sleep(10)
    assert fleet.totals.sleeping == 4 and fleet.dtls.handshakes == 4
    for dev in fleet.devices:
        ok = await sup.submit(dev.endpoint, "GET", "/3/0/1", async_id=f"wake-{dev.endpoint}")
        assert ok == Accepted()
    await trio.sleep(200)  # (the server learns they sleep, then sends at their next wake)
    woken = [str(r["id"]) for r in view.take("async-responses")]  # type: ignore[index]
    assert sorted(woken) == sorted(f"wake-{d.endpoint}" for d in fleet.devices)
    assert fleet.dtls.handshakes >= 8 and fleet.totals.errors == 0
    assert all(len(executed(d, "/3/0/1")) == 1 for d in fleet.devices)
