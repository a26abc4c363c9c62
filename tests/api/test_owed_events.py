"""Events owed to an application are kept until handed over, wherever they are meanwhile
(docs/delivery.md, "Hand-over to the application"):

- in flight: taken by a delivery that has not completed (a slow webhook receiver), they are
  stored by the spill like the events waiting, and forgotten once handed over;
- AsyncIDResponses (each stands for a 202) outlive their channel: deleted (to switch type)
  or expired, its AsyncIDResponses stay stored and go to the application's next channel;
- after a restart, the stored events go straight into their channels, not through the
  bounded event stream (which dropped beyond its bound without a word).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.events import EventStream
from dm_actor.api.auth import ApiKeys
from dm_actor.config import parse_settings
from dm_actor.store.base import ChannelRecord, EventRecord
from dm_actor.store.memory import MemoryStore
from dm_actor.store.sqlite import SqliteStore

from .client import KEY_A, HttpClient, start_api, websocket
from .test_flow import online
from .test_webhook import Received, Receiver

if TYPE_CHECKING:
    from pathlib import Path

READ = {"method": "GET", "uri": "/3/0/1"}


async def drain(client: HttpClient) -> list[dict[str, Any]]:
    """Every AsyncIDResponse the long poll gives until a poll gets 204."""
    out: list[dict[str, Any]] = []
    for _ in range(50):
        reply = await client.request("GET", "/v2/notification/pull")
        if reply.status != 200:
            assert reply.status == 204, (reply.status, reply.text)
            break
        out += reply.json().get("async-responses", [])
    return out


async def test_an_event_in_flight_to_a_slow_webhook_is_stored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A registration event whose PUT the receiver has held for 10 s (of its 15) is not
    handed over: a crash now must not lose it. Once answered 2xx it is forgotten."""

    async def answer(received: Received) -> int:
        if received.body != b"{}":
            await trio.sleep(15)  # slow, within the 20 s request timeout
        return 200

    store = MemoryStore()
    api = await start_api(nursery, store=store)
    receiver = Receiver(answer=answer)
    url = await receiver.start(nursery)
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/notification/callback", json={"url": url})
        assert reply.status == 204, reply.text
        await online(api, nursery)
        await trio.sleep(10)
        assert len(receiver.deliveries()) == 1  # in flight, not answered yet
        assert [e.kind for e in store.load().events] == ["registrations"]
        await trio.sleep(10)  # answered 200: handed over, forgotten
        assert len(receiver.deliveries()) == 1
        assert store.load().events == []


async def test_switching_from_a_failing_webhook_to_long_poll_keeps_the_async_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The receiver answers 503 (it is being fixed); the application deletes its callback
    and long-polls instead: the 202's AsyncIDResponse, stored meanwhile, arrives there."""

    async def answer(received: Received) -> int:
        return 200 if received.body == b"{}" else 503  # passes the test PUT, then fails

    store = MemoryStore()
    api = await start_api(nursery, store=store)
    receiver = Receiver(answer=answer)
    url = await receiver.start(nursery)
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/notification/callback", json={"url": url})
        assert reply.status == 204, reply.text
        await online(api, nursery)
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=r1", json=READ)
        assert reply.status == 202
        await trio.sleep(10)
        assert receiver.deliveries()  # tried, answered 503, kept
        assert (await client.request("DELETE", "/v2/notification/callback")).status == 204
        # owed, still stored (a restart would owe it too); the registration went
        assert [e.kind for e in store.load().events] == ["async-responses"]
        assert [r["id"] for r in await drain(client)] == ["r1"]
        assert store.load().events == []  # handed over (the last poll acknowledged it)


async def start_daemon(
    nursery: trio.Nursery, data_dir: Path, clock: trio.testing.MockClock, events: EventStream
) -> app.Listening:
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\ndata_dir = "{data_dir}"\n'
    )

    async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
        await app.serve(
            settings,
            events=events,
            api_keys=ApiKeys([KEY_A]),
            wall_clock=lambda: 1.7e9 + clock.current_time(),
            task_status=task_status,
        )

    listening: app.Listening = await nursery.start(serve)
    return listening


async def stored_before_the_start(path: Path, records: list[Any]) -> None:
    store = SqliteStore(path / app.STORE_FILE, clock=lambda: 1.7e9)  # as the server
    async with trio.open_nursery() as writer:
        await writer.start(store.run)
        for record in records:
            if isinstance(record, ChannelRecord):
                store.put_channel(record)
            else:
                store.put_event(record)
        await store.durable()
        writer.cancel_scope.cancel()
    store.close()


async def test_a_restart_owing_more_events_than_the_stream_holds_delivers_them_all(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """8 AsyncIDResponses are owed to an application whose WebSocket is away; the restarted
    server's event stream holds 5 (100,000 by default): all 8 arrive, in order."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    owner = ApiKeys([KEY_A]).owner(KEY_A)
    assert owner is not None
    owed = [
        EventRecord(owner, seq, "async-responses", b'{"id":"c%d","status":200}' % seq, 1.7e9)
        for seq in range(8)
    ]
    await stored_before_the_start(tmp_path, [ChannelRecord(owner, "WEB_SOCKET", 1.7e9), *owed])
    listening = await start_daemon(nursery, tmp_path, autojump_clock, EventStream(capacity=5))
    assert listening.http is not None
    ids: list[str] = []
    async with websocket(listening.http, ["wss", f"pelion_{KEY_A}"]) as ws:
        with trio.move_on_after(3):
            while True:
                message = json.loads(await ws.get_message())
                assert "events-lost" not in message
                ids += [r["id"] for r in message.get("async-responses", [])]
    assert ids == [f"c{i}" for i in range(8)]
    await trio.sleep(2)
    assert listening.supervisor.store.load().events == []  # handed over, forgotten


async def test_after_a_restart_an_application_without_a_channel_is_owed_its_async_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Its channel was deleted (or expired) before the restart: its AsyncIDResponses wait for
    its next channel, however late; its other stored events went with the channel."""
    autojump_clock.autojump_threshold = 0.05
    owner = ApiKeys([KEY_A]).owner(KEY_A)
    assert owner is not None
    await stored_before_the_start(
        tmp_path,
        [
            EventRecord(owner, 1, "registrations", b'{"ep":"d"}', 1.7e9),
            EventRecord(owner, 2, "async-responses", b'{"id":"r1","status":200}', 1.7e9),
        ],
    )
    listening = await start_daemon(nursery, tmp_path, autojump_clock, EventStream())
    assert listening.http is not None
    await trio.sleep(120)  # (longer than the orphans' minute)
    store = listening.supervisor.store
    assert [e.kind for e in store.load().events] == ["async-responses"]
    async with HttpClient(listening.http, KEY_A) as client:
        assert [r["id"] for r in await drain(client)] == ["r1"]
    await trio.sleep(2)
    assert store.load().events == []
