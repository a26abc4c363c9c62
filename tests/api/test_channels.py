"""The hub and its channels: routing by owner, bounds, batching, serialization options."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from dm_actor.actors.events import EventStream
from dm_actor.api.channels import LONG_POLLING, WEB_SOCKET, NotificationHub, Session, iso_time
from dm_actor.api.schemas import Serialization, SerializationConfig


def response(i: int) -> dict[str, object]:
    return {"id": f"r{i}", "status": 200}


async def start_hub(nursery: trio.Nursery, **kw: Any) -> tuple[EventStream, NotificationHub]:
    events = EventStream()
    hub = NotificationHub(events, wall_clock=lambda: 1_700_000_000.25, **kw)
    await nursery.start(hub.run)
    return events, hub


async def test_events_reach_only_their_applications(nursery: trio.Nursery) -> None:
    events, hub = await start_hub(nursery)
    a, b = hub.open("a", WEB_SOCKET), hub.open("b", LONG_POLLING)
    events.publish("registrations", {"ep": "d"})  # for everyone
    events.publish("async-responses", response(1), frozenset({"a"}))
    events.publish("async-responses", response(2), frozenset({"b", "nobody"}))
    await trio.testing.wait_all_tasks_blocked()
    message, _ = a.take()
    assert json.loads(message) == {"registrations": [{"ep": "d"}],
                                   "async-responses": [response(1)]}  # fmt: skip
    message, _ = b.take()
    assert json.loads(message) == {"registrations": [{"ep": "d"}],
                                   "async-responses": [response(2)]}  # fmt: skip
    assert [e[1] for _, e in hub.orphans["nobody"]] == [response(2)]  # kept for a while


async def test_an_application_without_a_channel_gets_its_last_minute_of_events(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    events, hub = await start_hub(nursery, orphan_limit=3)
    events.publish("registrations", {"ep": "d"})  # for everyone: not kept
    for i in range(5):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert hub.unrouted == 2  # beyond the limit
    await trio.sleep(30)
    events.publish("async-responses", response(5), frozenset({"a"}))
    await trio.sleep(31)  # r2..r4 are now older than a minute
    message, _ = hub.open("a", LONG_POLLING).take()
    assert json.loads(message) == {"async-responses": [response(5)]}
    assert hub.unrouted == 5 and "a" not in hub.orphans


async def test_bounded_buffer_drops_the_oldest(nursery: trio.Nursery) -> None:
    events, hub = await start_hub(nursery, capacity=3)
    channel = hub.open("a", WEB_SOCKET)
    for i in range(5):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert channel.dropped == 2
    message, batch = channel.take()
    assert [r["id"] for r in json.loads(message)["async-responses"]] == ["r2", "r3", "r4"]
    channel.unread(batch)  # not delivered: back at the head, in order
    events.publish("async-responses", response(5), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert [e[1]["id"] for e in channel.events] == ["r3", "r4", "r5"]  # type: ignore[index]


async def test_max_chunk_size_splits_messages(nursery: trio.Nursery) -> None:
    events, hub = await start_hub(nursery)
    channel = hub.open("a", WEB_SOCKET, Serialization(max_chunk_size=100))
    for i in range(250):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    sizes = []
    while channel.events:
        message, _ = channel.take()
        sizes.append(len(json.loads(message)["async-responses"]))
    assert sizes == [100, 100, 50]


async def test_serialization_options(nursery: trio.Nursery) -> None:
    events, hub = await start_hub(nursery)
    cfg = SerializationConfig(
        deregistrations_as_object=True, include_uid=True, include_timestamp=True,
        include_original_ep=True,
    )  # fmt: skip
    full = hub.open("full", WEB_SOCKET, Serialization(cfg=cfg))
    plain = hub.open("plain", WEB_SOCKET)
    registration = {"ep": "d", "original-ep": "d", "q": False, "resources": []}
    events.publish("registrations", registration)
    events.publish("de-registrations", "d")
    await trio.testing.wait_all_tasks_blocked()
    message = json.loads(plain.take()[0])
    assert message == {"registrations": [{"ep": "d", "q": False, "resources": []}],
                       "de-registrations": ["d"]}  # fmt: skip
    message = json.loads(full.take()[0])
    [reg], [dereg] = message["registrations"], message["de-registrations"]
    assert reg["original-ep"] == "d" and dereg["ep"] == dereg["original-ep"] == "d"
    assert reg["timestamp"] == dereg["timestamp"] == "2023-11-14T22:13:20.250Z"
    assert reg["uid"] != dereg["uid"] and len(reg["uid"]) == 36
    assert registration == {"ep": "d", "original-ep": "d", "q": False, "resources": []}


async def test_a_session_is_told_to_stop(nursery: trio.Nursery) -> None:
    _, hub = await start_hub(nursery)
    channel = hub.open("a", WEB_SOCKET)
    first, second = Session(), Session()
    channel.attach(first)
    assert channel.attach(second) is first and first.close_code == 1001
    await channel.wait(first)  # returns at once: told to stop
    hub.delete("a")
    assert second.close_code == 1000 and channel.closed
    await channel.wait(second)


def test_iso_time() -> None:
    assert iso_time(0.5) == "1970-01-01T00:00:00.500Z"


def test_durable_uids_are_stable_and_uuid_shaped() -> None:
    from dm_actor.api.channels import durable_uid

    assert durable_uid(1795673419918713) == durable_uid(1795673419918713)
    assert durable_uid(1) == "00000000-0000-0000-0000-000000000001"
    assert durable_uid(2) != durable_uid(1)
