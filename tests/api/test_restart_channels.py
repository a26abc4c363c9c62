"""Events waiting for an application that is away survive a restart (SQLite store)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.config import parse_settings
from dm_actor.store.base import ChannelRecord, EventRecord
from dm_actor.store.sqlite import SqliteStore
from tests.actors.support import Device

from .client import KEY_A, HttpClient, next_message, websocket

if TYPE_CHECKING:
    from pathlib import Path


async def run_server(
    nursery: trio.Nursery, data_dir: Path, clock: trio.testing.MockClock
) -> tuple[trio.CancelScope, app.Listening]:
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\ndata_dir = "{data_dir}"\n'
    )
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
        with scope:
            await app.serve(
                settings,
                api_keys=ApiKeys([KEY_A]),
                wall_clock=lambda: 1.7e9 + clock.current_time(),
                task_status=task_status,
            )

    listening: app.Listening = await nursery.start(serve)
    return scope, listening


async def test_events_owed_to_an_absent_application_are_delivered_after_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The application registered its WebSocket channel and is not connected. A device
    registers and updates; a second later the daemon dies. After the restart the application
    connects and gets both events, with the uids they had, and only once."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    scope, first = await run_server(nursery, tmp_path, autojump_clock)
    assert first.http is not None
    async with HttpClient(first.http, KEY_A) as client:
        reply = await client.request(
            "PUT", "/v2/notification/websocket",
            json={"serialization": {"type": "v2", "cfg": {"include_uid": True}}},
        )  # fmt: skip
        assert reply.status == 201
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    await dev.update()
    await trio.sleep(2)  # past the spill interval
    scope.cancel()
    await trio.sleep(1)

    _, second = await run_server(nursery, tmp_path, autojump_clock)
    assert second.http is not None
    async with websocket(second.http, ["wss", f"pelion_{KEY_A}"]) as ws:
        message = await next_message(ws)
        with trio.move_on_after(3):
            while len(message.get("reg-updates", ())) < 1:
                more = await next_message(ws)
                for kind, items in more.items():
                    message.setdefault(kind, []).extend(items)
    [registered] = message["registrations"]
    [updated] = message["reg-updates"]
    assert registered["ep"] == updated["ep"] == "dev"
    assert registered["uid"] != updated["uid"]
    assert set(message) == {"registrations", "reg-updates"}  # nothing else, nothing twice


async def test_every_stored_event_reaches_its_restored_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """More events are owed than the hub keeps for an application without a channel (1000):
    the stored channels are open before the hub reads, so all of them arrive, in order."""
    autojump_clock.autojump_threshold = 0.05
    store = SqliteStore(tmp_path / app.STORE_FILE, clock=lambda: 1.7e9)  # as the server
    async with trio.open_nursery() as writer:
        await writer.start(store.run)
        owner = ApiKeys([KEY_A]).owner(KEY_A)
        assert owner is not None
        store.put_channel(ChannelRecord(owner, "WEB_SOCKET", 1.7e9))
        for seq in range(1, 1501):
            item = b'{"ep":"d%d"}' % seq
            store.put_event(EventRecord(owner, seq, "registrations", item, 1.7e9))
        await store.durable()
        writer.cancel_scope.cancel()
    store.close()

    _, listening = await run_server(nursery, tmp_path, autojump_clock)
    assert listening.http is not None
    got: list[str] = []
    async with websocket(listening.http, ["wss", f"pelion_{KEY_A}"]) as ws:
        with trio.move_on_after(10):
            while len(got) < 1500:
                got += [item["ep"] for item in (await next_message(ws))["registrations"]]
    assert got == [f"d{seq}" for seq in range(1, 1501)]
