"""What survives a restart with the SQLite store (issue: nothing accepted is ever lost)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from dm_actor.device.machine import MID_BLOCK

from .support import Device

if TYPE_CHECKING:
    from pathlib import Path


def settings_for(data_dir: Path) -> str:
    return f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\ndata_dir = "{data_dir}"\n'


async def run_server(
    nursery: trio.Nursery, data_dir: Path, clock: trio.testing.MockClock
) -> tuple[trio.CancelScope, app.Listening, EventStream]:
    events = EventStream()
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
        with scope:
            await app.serve(
                parse_settings(settings_for(data_dir)),
                events=events,
                http=False,  # this test reads the events itself
                wall_clock=lambda: 1.7e9 + clock.current_time(),  # wall time follows the mock
                task_status=task_status,
            )

    listening: app.Listening = await nursery.start(serve)
    return scope, listening, events


def slow_jumps(clock: trio.testing.MockClock) -> None:
    """SQLite commits run in a worker thread: jump the clock only after 250 ms of real idle
    time (a commit can take over 50 ms when both cores are busy: CI), so that a commit in
    progress does not let virtual time run ahead of it."""
    clock.autojump_threshold = 0.25


def async_responses(events: EventStream) -> dict[str, dict[str, object]]:
    return {
        str(item["id"]): item
        for kind, item, _, _ in events.take()
        if kind == "async-responses" and isinstance(item, dict)
    }


async def test_queued_commands_and_registrations_survive_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "sleepy", binding="UQ", lifetime=3600)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    await trio.sleep(100)  # asleep
    assert await first.supervisor.submit("sleepy", "GET", "/3/0/1", async_id="a") == Accepted()
    scope.cancel()  # the daemon stops
    await trio.sleep(10)

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    assert "sleepy" in second.supervisor.by_endpoint
    dev.server = second.coap_udp  # the same device, its server came back on another port
    assert (await dev.update()).code == Code.CHANGED  # wake-up: the registration id still works
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    assert async_responses(events)["a"]["status"] == 200


async def test_an_attempt_in_flight_is_resent_as_the_same_exchange(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "slow", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    dev.mute = True  # it executes the request and answers, but its answers are lost
    await first.supervisor.submit("slow", "PUT", "/3311/0/5850", async_id="a", payload=b"1",
                                  content_format=0)  # fmt: skip
    await trio.sleep(1)
    scope.cancel()  # the daemon dies with the attempt in flight
    await trio.sleep(150)  # restarted after the grace period, inside EXCHANGE_LIFETIME

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    dev.server = second.coap_udp
    dev.mute = False
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(1)
    assert async_responses(events)["a"]["status"] == 200
    assert len(dev.executed) == 1  # the resend was answered from the device's dedup cache
    puts = [m for _, m in dev.arrivals if m.code == Code.PUT]
    assert len(puts) >= 2 and len({(m.mid, m.token) for m in puts}) == 1


async def test_an_async_response_not_yet_delivered_is_owed_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, events = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    await first.supervisor.submit("dev", "GET", "/3/0/1", async_id="a", owner="app")
    await trio.sleep(1)
    [(kind, item, owners, seq)] = [e for e in events.take() if e[0] == "async-responses"]
    assert (item["id"], owners) == ("a", frozenset({"app"}))  # type: ignore[index]
    scope.cancel()  # no channel delivered it before the daemon stopped
    await trio.sleep(1)

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    # owed to the channels (the hub takes them; not through the bounded stream)
    again = [e for e in second.supervisor.owed_events if e[0] == "async-responses"]
    assert again == [(kind, item, owners, seq)]  # the same response, the same seq
    assert seq is not None
    second.supervisor.events_delivered("app", [seq])  # now a channel delivers it
    await second.supervisor.store.durable()
    assert second.supervisor.store.load().events == []


async def test_channels_and_owed_responses_survive_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:

    from dm_actor.api import ApiKeys
    from tests.api.client import HttpClient, next_message, websocket

    slow_jumps(autojump_clock)
    keys = ApiKeys(["ak_restart"])

    async def start() -> tuple[trio.CancelScope, app.Listening]:
        scope = trio.CancelScope()
        text = settings_for(tmp_path) + "http_port = 0\n"

        async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
            with scope:
                await app.serve(
                    parse_settings(text), api_keys=keys, task_status=task_status,
                    wall_clock=lambda: 1.7e9 + autojump_clock.current_time(),
                )  # fmt: skip

        return scope, await nursery.start(serve)

    scope, first = await start()
    assert first.http is not None
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    async with HttpClient(first.http, "ak_restart") as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        reply = await client.request(
            "POST", "/v2/device-requests/dev?async-id=owed", json={"method": "GET", "uri": "/3/0/1"}
        )
        assert reply.status == 202
    await trio.sleep(1)  # answered by the device; no socket is connected to take it
    scope.cancel()
    await trio.sleep(1)

    _, second = await start()
    assert second.http is not None
    async with HttpClient(second.http, "ak_restart") as client:
        assert (await client.request("GET", "/v2/notification/websocket")).status == 200
    assert second.http is not None
    async with websocket(second.http, ["wss", "pelion_ak_restart"]) as ws:
        message = await next_message(ws)
        while "async-responses" not in message:
            message = await next_message(ws)
    assert [r["id"] for r in message["async-responses"]] == ["owed"]


async def test_after_a_restart_new_requests_never_reuse_a_recent_message_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A MID the old process sent within EXCHANGE_LIFETIME would be answered from the
    device's deduplication cache with the old answer. MIDs are reserved in the store in
    blocks; the restarted server starts past the reserved block."""
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    for i in range(3):
        await first.supervisor.submit("dev", "GET", f"/3/0/{i}", async_id=f"old{i}")
        await trio.sleep(1)
    old = list(dict.fromkeys(m.mid for _, m in dev.arrivals if m.code == Code.GET))
    assert len(old) == 3
    scope.cancel()
    await trio.sleep(10)  # back well within the device's 247 s

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    dev.server = second.coap_udp
    assert (await dev.update()).code == Code.CHANGED
    answers: dict[str, dict[str, object]] = {}
    for i in range(3):
        await second.supervisor.submit("dev", "GET", f"/3/0/{i}", async_id=f"new{i}")
        with trio.fail_after(30):  # (a loaded machine's commits take their time)
            while f"new{i}" not in answers:
                await trio.sleep(0.5)
                answers.update(async_responses(events))
    mids = list(dict.fromkeys(m.mid for _, m in dev.arrivals if m.code == Code.GET))
    assert mids[3:] == [(old[0] + MID_BLOCK + i) & 0xFFFF for i in range(3)]  # (no resends)
    assert [answers[f"new{i}"]["status"] for i in range(3)] == [200] * 3


async def until_answered(events: EventStream, async_id: str) -> dict[str, object]:
    seen: dict[str, dict[str, object]] = {}
    while async_id not in seen:
        await trio.sleep(0.1)
        seen.update(async_responses(events))
    return seen[async_id]


async def test_a_non_queue_device_is_delivered_to_at_once_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Its address is stored with its registration: the restarted server does not wait a
    day (Anjay's default lifetime) for the device's next Update."""
    slow_jumps(autojump_clock)
    autojump_clock.autojump_threshold = 0.25  # (a jump during a slow commit skews the time)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "awake", lifetime=86400)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    scope.cancel()
    await trio.sleep(10)

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    dev.server = second.coap_udp  # (where its answers go: the request's source)
    start = trio.current_time()
    assert await second.supervisor.submit("awake", "GET", "/3/0/1", async_id="a") == Accepted()
    with trio.fail_after(30):
        answer = await until_answered(events, "a")
    assert answer["status"] == 200
    assert trio.current_time() - start < 10  # seconds, not a day
    assert [e.path for e in dev.executed] == ["/3/0/1"]  # no Update was needed


async def test_an_attempt_in_flight_is_resent_at_once_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Not after the 120 s resend grace (for devices that reconnect, not for our restart):
    at once, as the same exchange, which the device's deduplication answers."""
    slow_jumps(autojump_clock)
    autojump_clock.autojump_threshold = 0.25
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "slow", lifetime=86400)
    await dev.start(nursery)
    await dev.register()
    dev.mute = True  # it executes the request, its answers are lost
    await first.supervisor.submit("slow", "PUT", "/3311/0/5850", async_id="a", payload=b"1",
                                  content_format=0)  # fmt: skip
    await trio.sleep(1)
    scope.cancel()  # the daemon dies with the attempt in flight
    await trio.sleep(5)

    dev.mute = False
    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    dev.server = second.coap_udp
    start = trio.current_time()
    with trio.fail_after(30):
        answer = await until_answered(events, "a")
    assert answer["status"] == 200
    assert trio.current_time() - start < 10  # not after the 120 s grace
    assert len(dev.executed) == 1  # answered from the device's deduplication cache
    puts = [m for _, m in dev.arrivals if m.code == Code.PUT]
    assert len(puts) >= 2 and len({(m.mid, m.token) for m in puts}) == 1


async def test_a_device_gone_after_a_restart_is_unreachable_until_it_contacts_us(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "gone", lifetime=86400)
    await dev.start(nursery)
    await dev.register()
    scope.cancel()
    await trio.sleep(1)
    dev.close()  # its port is closed: the server meets ICMP port unreachable

    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    await second.supervisor.submit("gone", "GET", "/3/0/1", async_id="a")
    with trio.fail_after(60):
        answer = await until_answered(events, "a")
    assert answer["status"] != 200  # failed (rule 3.4), not kept waiting
    actor = second.supervisor.by_endpoint["gone"]
    assert not actor.queue.reachable
    await second.supervisor.submit("gone", "GET", "/3/0/2", async_id="b")
    await trio.sleep(30)
    assert "b" not in async_responses(events)  # waits for the device's next contact
    await dev.start(nursery)  # it comes back (a new port) with an Update
    dev.server = second.coap_udp
    assert (await dev.update()).code == Code.CHANGED
    with trio.fail_after(10):
        assert (await until_answered(events, "b"))["status"] == 200
