"""The hub and its channels: routing by owner, bounds, batching, serialization options."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import trio
import trio.testing

from dm_actor.actors.events import KINDS, ChannelEvent, EventStream
from dm_actor.actors.supervisor import Supervisor
from dm_actor.api.channels import (
    LONG_POLLING,
    WEB_SOCKET,
    HubStatistics,
    NotificationHub,
    Session,
    durable_uid,
    iso_time,
)
from dm_actor.api.schemas import Serialization, SerializationConfig
from dm_actor.config import Settings
from dm_actor.store.base import EventRecord
from dm_actor.store.memory import MemoryStore


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
    assert [e.item for _, e in hub.orphans["nobody"]] == [response(2)]  # kept for a while


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
    assert [e.item["id"] for e in channel.events] == ["r3", "r4", "r5"]  # type: ignore[index]


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


class Keeper:
    """What the supervisor does for the hub: number and store waiting events."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, int], tuple[str, object]] = {}
        self.seq = 100

    def keep(self, owner: str, kind: str, item: object) -> int:
        self.seq += 1
        self.kept[owner, self.seq] = (kind, item)
        return self.seq

    def forget(self, owner: str, seqs: list[int]) -> None:
        for seq in seqs:
            del self.kept[owner, seq]


async def test_events_waiting_in_a_channel_are_stored_and_forgotten_when_delivered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A spill interval after they arrived, the events nobody took are stored (and only
    once); delivering them forgets them; events taken within the interval never are."""
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget)
    away = hub.open("away", WEB_SOCKET)
    here = hub.open("here", WEB_SOCKET)
    events.publish("registrations", {"ep": "d"})
    events.publish("notifications", {"ep": "d", "path": "/3/0/9"}, frozenset({"away"}))
    await trio.testing.wait_all_tasks_blocked()
    _, batch = here.take()  # a connected client takes its event at once
    hub.delivered(here, batch)
    await trio.sleep(1.5)
    assert sorted(keeper.kept.values(), key=str) == [
        ("notifications", {"ep": "d", "path": "/3/0/9"}), ("registrations", {"ep": "d"})
    ]  # fmt: skip
    assert {owner for owner, _ in keeper.kept} == {"away"}
    await trio.sleep(5)
    assert len(keeper.kept) == 2  # stored once, not at every interval
    message, batch = away.take()
    assert json.loads(message) == {"notifications": [{"ep": "d", "path": "/3/0/9"}],
                                   "registrations": [{"ep": "d"}]}  # fmt: skip
    hub.delivered(away, batch)
    assert keeper.kept == {}


async def test_stored_events_dropped_by_the_bound_are_forgotten_too(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget,
                                  capacity=3)  # fmt: skip
    channel = hub.open("a", LONG_POLLING)
    for i in range(3):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.sleep(1.5)
    assert len(keeper.kept) == 3
    for i in range(3, 5):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert channel.dropped == 2
    await trio.sleep(1.5)  # forgotten together at the next spill (one store call)
    assert [item for _, item in keeper.kept.values()] == [response(2), response(3), response(4)]


async def test_a_stored_event_keeps_its_uid_and_timestamp_across_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With include_uid, an event taken, put back (delivery failed), stored, and sent again
    after a restart carries the same uid and timestamp each time: the client can recognise
    the repeat. An AsyncIDResponse's uid is made from its seq."""
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget)
    options = Serialization(cfg=SerializationConfig(include_uid=True, include_timestamp=True))
    channel = hub.open("a", WEB_SOCKET, options)
    events.publish("registrations", {"ep": "d"}, frozenset({"a"}))
    events.publish("async-responses", response(1), frozenset({"a"}), 7)
    await trio.testing.wait_all_tasks_blocked()
    message, batch = channel.take()
    first = json.loads(message)
    assert first["async-responses"][0]["uid"] == durable_uid(7)
    channel.unread(batch)  # the delivery failed
    await trio.sleep(1.5)
    [(_, seq), *_] = keeper.kept
    [(kind, stored)] = [v for k, v in keeper.kept.items() if k == ("a", seq)]
    message, _ = channel.take()
    assert json.loads(message) == first
    # what a restarted server does with the stored events: the same uids and timestamps
    events.publish(kind, stored, frozenset({"a"}), seq)  # type: ignore[arg-type]
    events.publish("async-responses", response(1), frozenset({"a"}), 7)
    await trio.testing.wait_all_tasks_blocked()
    message, _ = channel.take()
    assert json.loads(message) == first


async def test_events_put_back_after_a_spill_are_stored_at_the_next(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A webhook's delivery is out when the spill runs: its events are stored there (a slow
    receiver may hold them long; attack F7), then it fails: they come back with their seq
    and are not stored twice; delivered, they are forgotten."""
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget)
    channel = hub.open("a", LONG_POLLING)
    events.publish("registrations", {"ep": "d"}, frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    _, batch = channel.take()  # out for delivery ...
    await trio.sleep(1.5)  # ... while the spill runs: stored although nothing waits
    assert list(keeper.kept.values()) == [("registrations", {"ep": "d"})]
    channel.unread(batch)  # the delivery failed
    await trio.sleep(1.5)
    assert list(keeper.kept.values()) == [("registrations", {"ep": "d"})]
    _, batch = channel.take()
    hub.delivered(channel, batch)
    assert keeper.kept == {}


async def test_the_next_message_tells_how_many_events_were_dropped(nursery: trio.Nursery) -> None:
    """Pelion has no gap marker; ours is `events-lost`, told once, again if not delivered."""
    events, hub = await start_hub(nursery, capacity=3)
    channel = hub.open("a", LONG_POLLING)
    for i in range(5):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    message, batch = channel.take()
    assert json.loads(message) == {
        "events-lost": 2,
        "async-responses": [response(2), response(3), response(4)],
    }
    channel.unread(batch)  # not delivered: told again
    message, batch = channel.take()
    assert json.loads(message)["events-lost"] == 2
    hub.delivered(channel, batch)
    events.publish("async-responses", response(5), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert json.loads(channel.take()[0]) == {"async-responses": [response(5)]}


class FakeReceipt:
    def __init__(self, lost: bool) -> None:
        self._lost = lost
        self.closed = False

    def lost(self) -> bool:
        return self._lost

    def check(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


async def test_a_held_response_is_stored_and_forgotten_or_put_back_when_settled(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget)
    channel = hub.open("a", LONG_POLLING)
    events.publish("registrations", {"ep": "d"}, frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    _, batch = channel.take()
    arrived = FakeReceipt(lost=False)
    hub.hold(channel, batch, arrived)
    await trio.sleep(1.5)  # held, not acknowledged: stored like the events waiting
    assert list(keeper.kept.values()) == [("registrations", {"ep": "d"})]
    assert hub.settle(channel) == 0 and arrived.closed  # the next poll acknowledges it
    assert keeper.kept == {} and not channel.events
    events.publish("registrations", {"ep": "e"}, frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    _, batch = channel.take()
    hub.hold(channel, batch, FakeReceipt(lost=True))
    assert hub.settle(channel) == 1  # it never arrived: put back, sent again
    assert [item for _, item, _, _ in channel.events] == [{"ep": "e"}]
    _, batch = channel.take()
    gone = FakeReceipt(lost=False)
    hub.hold(channel, batch, gone)
    hub.delete("a")  # deleting the channel forgets it too
    assert gone.closed and not channel.unacked


async def test_a_session_that_lets_the_buffer_overflow_is_stopped_after_its_patience(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    events, hub = await start_hub(nursery, capacity=3)
    channel = hub.open("a", WEB_SOCKET)
    for i in range(5):  # full when the session comes: it gets `patience` to drain it
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    session = Session(patience=30)
    channel.attach(session)
    await trio.sleep(10)
    events.publish("async-responses", response(5), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert told(session) == (None, None)
    await trio.sleep(21)
    events.publish("async-responses", response(6), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert told(session) == (1001, "Too slow: 3 events waiting, the oldest dropped.")


def told(session: Session) -> tuple[int | None, str | None]:
    return session.close_code, session.reason


async def test_a_spill_in_slices_stores_the_oldest_first(nursery: trio.Nursery) -> None:
    """The hub stores at most 500 events per step of the event loop (other applications'
    deliveries run in between); seqs still follow the buffer's order."""
    keeper = Keeper()
    events, hub = await start_hub(nursery, keep=keeper.keep, on_delivered=keeper.forget,
                                  spill_interval=3600)  # fmt: skip
    channel = hub.open("a", WEB_SOCKET)
    for i in range(1200):
        events.publish("async-responses", response(i), frozenset({"a"}))
    await trio.testing.wait_all_tasks_blocked()
    assert hub.spill(500) and hub.spill(500) and not hub.spill(500)
    assert [e.seq for e in channel.events] == list(range(101, 1301))
    assert [item for _, item in keeper.kept.values()] == [response(i) for i in range(1200)]


async def test_the_stream_hands_out_named_events(nursery: trio.Nursery) -> None:
    """Publishers keep their positional call; what the hub reads has names (and still
    unpacks as `kind, item, owners, seq`)."""
    events = EventStream()
    events.publish("async-responses", response(1), frozenset({"a"}), 7)
    [event] = events.take()
    assert isinstance(event, ChannelEvent)
    assert (event.kind, event.item, event.owners, event.seq) == (
        "async-responses", response(1), frozenset({"a"}), 7,
    )  # fmt: skip
    kind, _, owners, seq = event
    assert (kind, owners, seq) == ("async-responses", frozenset({"a"}), 7)
    assert KINDS[-1] == "async-responses" and len(KINDS) == 6  # Pelion's order, from `Kind`


async def test_events_a_restart_owes_are_restored_into_their_channels(
    nursery: trio.Nursery,
) -> None:
    """The supervisor's restore builds `ChannelEvent`s from the store's records; the hub
    routes each to its owner's channel, owes an AsyncIDResponse to an application without
    one, and forgets its other events."""
    forgotten: list[tuple[str, list[int]]] = []
    _, hub = await start_hub(nursery, on_delivered=lambda app, seqs: forgotten.append((app, seqs)))
    channel = hub.open("a", WEB_SOCKET)
    hub.restore([
        ChannelEvent("async-responses", response(1), frozenset({"a"}), 11),
        ChannelEvent("async-responses", response(2), frozenset({"b"}), 12),  # no channel: owed
        ChannelEvent("notifications", {"ep": "d"}, frozenset({"b"}), 13),  # went with b's channel
    ])  # fmt: skip
    [event] = channel.events
    assert (event.kind, event.item, event.seq) == ("async-responses", response(1), 11)
    [owed] = hub.owed["b"]
    assert owed.item == response(2)
    assert forgotten == [("b", [13])]


async def test_the_supervisor_restores_stored_events_as_named_events(
    nursery: trio.Nursery,
) -> None:
    store = MemoryStore(clock=lambda: 100.0)  # (events live 24 h)
    store.put_event(EventRecord("a", 7, "async-responses", b'{"id":"x","status":200}', 1.0))
    store.put_event(EventRecord("b", 9, "notifications", b'{"ep":"d"}', 2.0))
    sup = Supervisor(Settings(), store=store)
    await nursery.start(sup.run)
    sup.restore(store.load())
    assert sup.owed_events == [
        ChannelEvent("async-responses", {"id": "x", "status": 200}, frozenset({"a"}), 7),
        ChannelEvent("notifications", {"ep": "d"}, frozenset({"b"}), 9),
    ]
    assert all(type(e) is ChannelEvent for e in sup.owed_events)
    assert sup.commands.event_seq >= 9  # new events are numbered after them


async def test_the_hub_statistics_are_a_frozen_snapshot(nursery: trio.Nursery) -> None:
    events, hub = await start_hub(nursery, capacity=2)
    channel = hub.open("a", LONG_POLLING)
    for i in range(3):  # one more than the channel holds: the oldest is dropped
        events.publish("async-responses", response(i), frozenset({"a"}))
    events.publish("async-responses", response(9), frozenset({"nobody"}))  # kept a while
    await trio.testing.wait_all_tasks_blocked()
    stats = hub.statistics()
    assert stats == HubStatistics(
        channels=1, waiting=2, dropped=1, delivered=0, orphans=1, owed=0, unrouted=0, expired=0
    )
    channel.take()
    assert hub.statistics().delivered == 2
    assert stats.waiting == 2  # a snapshot: taken before
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.waiting = 0  # type: ignore[misc]
