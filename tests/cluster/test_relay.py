"""Cluster mode: events reach the node that hosts their application's channel (`EventRelay`).

Two hubs, each with its relay, over a `StaticView` that splits the home slots between nodes
"a" and "b"; each relay's `send` calls the other's `receive` in process (a switch takes the
peer down).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from dm_actor.actors.events import ChannelEvent, EventStream
from dm_actor.api.channels import LONG_POLLING, WEB_SOCKET, NotificationHub, durable_uid
from dm_actor.api.relay import MAX_BODY, EventRelay, WireBatch, WireEvent
from dm_actor.api.schemas import Serialization, SerializationConfig
from dm_actor.cluster.slots import home_slot
from dm_actor.cluster.view import StaticView
from dm_actor.store.base import ChannelRecord, EventRecord

SLOTS = 8
OWNERS = {slot: "a" if slot < SLOTS // 2 else "b" for slot in range(SLOTS)}
UID = Serialization(cfg=SerializationConfig(include_uid=True))


@dataclass
class View(StaticView):
    """A `StaticView` whose node may stop serving some of its slots (`leaving`)."""

    leaving: set[int] = field(default_factory=set)

    def mine(self, slot: int) -> bool:
        return super().mine(slot) and slot not in self.leaving


def app_homed_on(node: str, n: int = 0) -> str:
    """The `n`-th application name whose home slot `node` owns."""
    found = (f"app{i}" for i in range(1000) if OWNERS[home_slot(f"app{i}", SLOTS)] == node)
    for _ in range(n):
        next(found)
    return next(found)


A1, A2, B1, B2 = app_homed_on("a"), app_homed_on("a", 1), app_homed_on("b"), app_homed_on("b", 1)


@dataclass
class Node:
    name: str
    events: EventStream
    hub: NotificationHub
    relay: EventRelay
    delivered: list[tuple[str, list[int]]] = field(default_factory=list)
    kept: list[tuple[str, str, object]] = field(default_factory=list)


@dataclass
class Net:
    """The in-process link: `down` nodes raise on `send`; `bodies` counts posts."""

    nodes: dict[str, Node] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    posts: int = 0

    async def send(self, node: str, body: bytes) -> int:
        self.posts += 1
        if node in self.down:
            raise OSError("connection refused")
        return await self.nodes[node].relay.receive(body)


async def start(nursery: trio.Nursery, net: Net, name: str, **kw: Any) -> Node:
    view = View(name, SLOTS, dict(OWNERS))
    events = EventStream()
    delivered: list[tuple[str, list[int]]] = []
    kept: list[tuple[str, str, object]] = []
    seqs = iter(range(1000 if name == "a" else 2000, 10_000))

    def keep(app: str, kind: str, item: object) -> int:
        kept.append((app, kind, item))
        return next(seqs)

    hub = NotificationHub(
        events,
        wall_clock=lambda: 1_700_000_000.0,
        on_delivered=lambda app, s: delivered.append((app, s)),
        keep=keep,
    )
    relay = EventRelay(view, hub, net.send, **kw)
    await nursery.start(hub.run)
    if name == "a":  # (b's senders run in its hub's nursery)
        await nursery.start(relay.run)
    node = net.nodes[name] = Node(name, events, hub, relay, delivered, kept)
    return node


async def pair(nursery: trio.Nursery, **kw: Any) -> tuple[Net, Node, Node]:
    net = Net()
    return net, await start(nursery, net, "a", **kw), await start(nursery, net, "b", **kw)


def messages(channel: Any) -> list[dict[str, Any]]:
    out = []
    while len(channel):
        message, _batch = channel.take()
        out.append(json.loads(message))
    return out


async def test_an_async_response_reaches_the_home_node_once_with_its_uid(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET, UID)
    a.events.publish("async-responses", {"id": "x1", "status": 200}, frozenset({B1}), 7)
    await trio.sleep(1)
    assert not a.hub.owed and not a.hub.orphans and not a.hub.channels
    message, batch = channel.take()
    assert json.loads(message) == {
        "async-responses": [{"id": "x1", "status": 200, "uid": durable_uid(7)}]
    }
    b.hub.delivered(channel, batch)
    assert b.delivered == [(B1, [7])]  # forgotten on the home node (store.delete_events)
    assert a.delivered == []
    stats = a.relay.statistics()
    assert (stats.sent, stats.batches, stats.waiting) == (1, 1, 0)
    # handed over, then the application repeats its request (rule 1.7): sent again
    a.events.publish("async-responses", {"id": "x1", "status": 200}, frozenset({B1}), 7)
    await trio.sleep(1)
    assert len(messages(channel)) == 1


async def test_a_batch_sent_again_after_a_lost_answer_is_delivered_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET)
    answers = iter([True, False])

    async def lossy(node: str, body: bytes) -> int:
        status = await b.relay.receive(body)
        if next(answers, False):
            raise trio.BrokenResourceError("connection reset before the answer")
        return status

    a.relay.send = lossy
    a.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 7)
    a.events.publish("notifications", {"n": 1}, frozenset({B1}))
    await trio.sleep(5)
    assert messages(channel) == [{"async-responses": [{"id": "x1"}], "notifications": [{"n": 1}]}]
    assert b.relay.statistics().duplicates == 2 and a.relay.statistics().failures == 1


async def test_an_event_for_all_applications_reaches_every_home_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery)
    ca, cb = a.hub.open(A1, LONG_POLLING), b.hub.open(B1, LONG_POLLING)
    a.events.publish("registrations", {"ep": "d1"})
    b.events.publish("de-registrations", "d2")
    await trio.sleep(1)
    assert messages(ca) == [{"registrations": [{"ep": "d1"}], "de-registrations": ["d2"]}]
    assert messages(cb) == [{"registrations": [{"ep": "d1"}], "de-registrations": ["d2"]}]
    assert net.posts == 2  # one each way: never relayed again


async def test_an_event_for_several_applications_is_split_by_home(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery)
    ca, cb, cb2 = a.hub.open(A1, WEB_SOCKET), b.hub.open(B1, WEB_SOCKET), b.hub.open(B2, WEB_SOCKET)
    note: dict[str, object] = {"ep": "d", "path": "/3/0/0", "payload": "AQ=="}
    a.events.publish("notifications", note, frozenset({A1, B1, B2}))
    await trio.sleep(1)
    for channel in (ca, cb, cb2):
        assert messages(channel) == [{"notifications": [note]}]
    assert net.posts == 1


async def test_a_channel_homed_elsewhere_gets_nothing_here(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A channel left on a node that is not its home (not released yet) gets neither the
    events for all applications nor its own: they go to the home."""
    _net, a, b = await pair(nursery)
    stale, home = a.hub.open(B1, WEB_SOCKET), b.hub.open(B1, WEB_SOCKET)
    a.events.publish("registrations", {"ep": "d1"})
    a.events.publish("async-responses", {"id": "x"}, frozenset({B1}), 9)
    await trio.sleep(1)
    assert len(stale) == 0
    assert messages(home) == [{"registrations": [{"ep": "d1"}], "async-responses": [{"id": "x"}]}]


async def test_a_peer_down_is_retried_until_it_is_back(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET)
    net.down.add("b")
    a.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 11)
    a.events.publish("notifications", {"ep": "d"}, frozenset({B1}))
    await trio.sleep(30)
    stats = a.relay.statistics()
    assert stats.failures >= 5 and stats.waiting == 2 and len(channel) == 0
    assert net.posts < 20  # backed off (0.1 s doubling to 5 s)
    net.down.discard("b")
    await trio.sleep(6)
    assert messages(channel) == [
        {"async-responses": [{"id": "x1"}], "notifications": [{"ep": "d"}]}
    ]
    stats = a.relay.statistics()
    assert (stats.sent, stats.waiting) == (2, 0)


async def test_a_full_queue_drops_the_oldest_events_that_are_not_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery, limit=4)
    channel = b.hub.open(B1, WEB_SOCKET)
    net.down.add("b")
    owners = frozenset({B1})
    a.events.publish("notifications", {"n": 0}, owners)
    a.events.publish("async-responses", {"id": "x1"}, owners, 21)
    for i in range(1, 6):
        a.events.publish("notifications", {"n": i}, owners)
    a.events.publish("async-responses", {"id": "x2"}, owners, 23)
    await trio.sleep(2)
    stats = a.relay.statistics()
    assert (stats.dropped, stats.durable_dropped, stats.waiting) == (4, 0, 4)
    net.down.discard("b")
    await trio.sleep(6)
    assert messages(channel) == [
        {
            "notifications": [{"n": 4}, {"n": 5}],
            "async-responses": [{"id": "x1"}, {"id": "x2"}],
        }
    ]
    # only durable events queued: the oldest durable goes (it stays stored)
    net.down.add("b")
    for seq in range(30, 36):
        a.events.publish("async-responses", {"id": f"y{seq}"}, owners, seq)
    await trio.sleep(2)
    stats = a.relay.statistics()
    assert (stats.dropped, stats.durable_dropped, stats.waiting) == (4, 2, 4)


async def test_events_keep_their_order_across_retries_and_batches(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery, batch_size=16)
    channel = b.hub.open(B1, WEB_SOCKET)
    net.down.add("b")
    for i in range(100):
        seq = 100 + i if i % 3 == 0 else None
        a.events.publish("notifications", {"n": i}, frozenset({B1}), seq)
    await trio.sleep(1)
    net.down.discard("b")
    await trio.sleep(10)
    got = [item["n"] for m in messages(channel) for item in m["notifications"]]
    assert got == list(range(100))
    assert a.relay.statistics().batches == 7  # 100 events in batches of 16


async def test_a_batch_over_the_size_bound_is_sent_in_halves(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, a, b = await pair(nursery, max_body=1500)
    channel = b.hub.open(B1, WEB_SOCKET)
    for i in range(10):
        a.events.publish("notifications", {"n": i, "payload": "x" * 500}, frozenset({B1}))
    await trio.sleep(1)
    got = [item["n"] for m in messages(channel) for item in m["notifications"]]
    assert got == list(range(10)) and a.relay.statistics().batches >= 4


async def test_an_event_whose_home_moved_while_queued_follows_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Node b is down with an AsyncIDResponse queued for it; its slots go to a (failover):
    the event is delivered on a, once (also when a's adopt loaded it from the store)."""
    net, a, _b = await pair(nursery)
    net.down.add("b")
    a.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 41)
    await trio.sleep(1)
    slot = home_slot(B1, SLOTS)
    a.relay.view.owners[slot] = "a"  # type: ignore[attr-defined]
    stored = [EventRecord(B1, 41, "async-responses", b'{"id":"x1"}', 1.0)]

    async def load(owners: frozenset[str]) -> list[EventRecord]:
        return [r for r in stored if r.owner in owners]

    a.relay.load_events = load
    await a.relay.adopt([B1])
    await trio.sleep(10)
    channel = a.hub.open(B1, WEB_SOCKET)  # owed: the next channel gets it first
    assert messages(channel) == [{"async-responses": [{"id": "x1"}]}]
    assert a.relay.statistics().waiting == 0


async def test_a_home_slot_without_owner_holds_events_until_one_takes_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery)
    slot = home_slot(B1, SLOTS)
    for node in (a, b):
        del node.relay.view.owners[slot]  # type: ignore[attr-defined]
    a.events.publish("notifications", {"n": 1}, frozenset({B1}))
    await trio.sleep(5)
    assert a.relay.statistics().waiting == 1 and net.posts == 0
    for node in (a, b):
        node.relay.view.owners[slot] = "b"  # type: ignore[attr-defined]
    channel = b.hub.open(B1, WEB_SOCKET)
    await trio.sleep(1)
    assert messages(channel) == [{"notifications": [{"n": 1}]}]


async def test_adopt_reopens_channels_and_restores_their_events_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, a, b = await pair(nursery)
    # relayed to b before b loaded it: not twice
    a.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 51)
    await trio.sleep(1)
    records = [
        EventRecord(B1, 51, "async-responses", b'{"id":"x1"}', 1.0),
        EventRecord(B1, 52, "notifications", b'{"n":1}', 1.0),
        EventRecord(B2, 53, "notifications", b'{"n":2}', 1.0),  # no channel: forgotten
        EventRecord(A1, 54, "notifications", b'{"n":3}', 1.0),  # not asked for
    ]
    channel_records = [ChannelRecord(B1, WEB_SOCKET, 1.0, None, {}, '{"cfg":{"include_uid":true}}')]

    async def load_events(owners: frozenset[str]) -> list[EventRecord]:
        return records

    async def load_channels() -> list[ChannelRecord]:
        return channel_records

    b.relay.load_events, b.relay.load_channels = load_events, load_channels
    b.relay.apps = lambda: [B2]  # (the API keys')
    b.hub.orphans.clear()
    await b.relay.adopt([home_slot(B1, SLOTS), home_slot(B2, SLOTS)])
    channel = b.hub.channels[B1]
    assert channel.serialization.cfg.include_uid
    assert messages(channel) == [  # x1 once: owed since it was relayed, given to the channel
        {
            "notifications": [{"n": 1, "uid": durable_uid(52)}],
            "async-responses": [{"id": "x1", "uid": durable_uid(51)}],
        }
    ]
    assert b.delivered == [(B2, [53])]
    assert b.relay.statistics().loaded == 2


async def test_release_closes_the_channels_and_stores_what_they_owe(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, _a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET)
    b.events.publish("notifications", {"n": 1}, frozenset({B1}))
    b.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 61)
    await trio.testing.wait_all_tasks_blocked()
    b.relay.release([home_slot(B1, SLOTS)])
    assert channel.closed and B1 not in b.hub.channels
    assert b.kept == [(B1, "notifications", {"n": 1})]  # stored for the new home
    assert b.delivered == []  # nothing forgotten
    # given back later, what it loads again is not taken for a repeat
    loaded = [EventRecord(B1, 61, "async-responses", b'{"id":"x1"}', 1.0)]

    async def load(owners: frozenset[str]) -> list[EventRecord]:
        return loaded

    b.relay.load_events = load
    await b.relay.adopt([B1])
    assert list(b.hub.owed[B1]) and b.relay.statistics().loaded == 1


HEAD = b'{"node":"a","epoch":"e","events":['
HOSTILE = [
    b"",
    b"not json",
    b"[]",
    b'{"node":"a","epoch":"e"}',
    b'{"node":"a","epoch":"e","events":[["bogus-kind",{},null,null]]}',
    b'{"node":"a","epoch":"e","events":[["registrations",{},null,5]]}',  # durable, for everyone
    b'{"node":"a","epoch":"e","events":[["notifications",{},["x"],-1]]}',
    # hops beyond the bound
    b'{"node":"a","epoch":"e","events":[["notifications",{},["x"],null,0,9]]}',
    b'{"node":"a","epoch":"e","events":[["notifications",{},[1],null]]}',
    b'{"node":"a","epoch":"e","events":[["notifications",{},["x"],null]],"more":1}',
    b'{"node":"a","epoch":"e","events":[["notifications",{"a":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}]]}",
    b'{"node":"a","epoch":"e","events":['
    + b",".join([b'["registrations","d",null,null]'] * 10_001)
    + b"]}",
]


@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
async def test_hostile_bodies_are_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, body: bytes
) -> None:
    _net, _a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET)
    assert await b.relay.receive(body) == 400
    assert b.relay.statistics().bad_batches == 1 and len(channel) == 0


async def test_an_oversized_body_is_refused_unread(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    _net, _a, b = await pair(nursery)
    assert await b.relay.receive(b" " * (MAX_BODY + 1)) == 413


async def test_a_refused_batch_is_not_retried(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, _b = await pair(nursery)

    async def refuse(node: str, body: bytes) -> int:
        net.posts += 1
        return 400

    a.relay.send = refuse
    a.events.publish("notifications", {"n": 1}, frozenset({B1}))
    await trio.sleep(30)
    stats = a.relay.statistics()
    assert (net.posts, stats.refused, stats.waiting) == (1, 1, 0)


async def test_an_event_arriving_where_its_home_is_not_is_routed_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Node a's view is stale: it sent b an event for an application homed on a."""
    _net, a, b = await pair(nursery)
    channel = a.hub.open(A1, WEB_SOCKET)
    body = msgspec.json.encode(
        WireBatch("c", "e", [WireEvent("notifications", {"n": 1}, [A1], None)])
    )
    assert await b.relay.receive(body) == 204
    await trio.sleep(1)
    assert messages(channel) == [{"notifications": [{"n": 1}]}]
    # beyond the bound of hops: dropped, counted
    body = msgspec.json.encode(
        WireBatch("c", "e", [WireEvent("notifications", {"n": 2}, [A1], None, hops=2)])
    )
    assert await b.relay.receive(body) == 204
    await trio.sleep(1)
    assert len(channel) == 0 and b.relay.statistics().misrouted == 1


async def test_events_for_a_home_being_handed_over_follow_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Node b hands B1's home slot to a: from `release` on, B1's events produced on b wait
    (not into a closed channel), and go to a once the view says a owns the slot."""
    _net, a, b = await pair(nursery)
    slot = home_slot(B1, SLOTS)
    old = b.hub.open(B1, WEB_SOCKET)
    b.relay.view.leaving.add(slot)  # type: ignore[attr-defined]
    b.relay.release([slot])
    assert old.closed
    b.events.publish("async-responses", {"id": "x1"}, frozenset({B1}), 71)
    b.events.publish("registrations", {"ep": "d"})
    await trio.sleep(2)
    assert b.relay.statistics().waiting == 1 and B1 not in b.hub.orphans
    for node in (a, b):  # the handover committed
        node.relay.view.owners[slot] = "a"  # type: ignore[attr-defined]
    b.relay.view.leaving.clear()  # type: ignore[attr-defined]
    channel = a.hub.open(B1, WEB_SOCKET)
    await trio.sleep(2)
    assert messages(channel) == [{"async-responses": [{"id": "x1"}]}]
    assert b.relay.statistics().waiting == 0


async def test_adopt_finds_the_applications_of_slots_among_the_known_ones(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    asked: list[frozenset[str]] = []

    async def load_events(owners: frozenset[str]) -> list[EventRecord]:
        asked.append(owners)
        return []

    _net, a, _b = await pair(nursery, apps=lambda: [A1, A2, B1, B2], load_events=load_events)
    await a.relay.adopt([home_slot(B1, SLOTS)])
    assert asked and B1 in asked[0] and A1 not in asked[0]
    assert all(home_slot(app, SLOTS) == home_slot(B1, SLOTS) for app in asked[0])


async def test_adopt_restarts_a_stored_callback_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    started: list[tuple[str, str, bool]] = []

    class Webhooks:
        def start(self, app: str, target: Any, serialization: Serialization) -> None:
            started.append((app, target.url, serialization.cfg.include_uid))

    async def load_channels() -> list[ChannelRecord]:
        return [
            ChannelRecord(
                B1, "CALLBACK", 1.0, "http://127.0.0.1:9/hook", {}, '{"cfg":{"include_uid":true}}'
            ),
            ChannelRecord(A1, "CALLBACK", 1.0, "http://127.0.0.1:9/a", {}, "{}"),  # not b's
        ]

    _net, _a, b = await pair(nursery, load_channels=load_channels, webhooks=Webhooks())
    await b.relay.adopt([home_slot(B1, SLOTS)])
    assert started == [(B1, "http://127.0.0.1:9/hook", True)]


async def test_a_restart_restores_only_the_events_of_applications_homed_here(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Every node reads the same stored events: those of another node's applications are
    neither delivered nor forgotten here (their home loads them)."""
    _net, a, _b = await pair(nursery)
    a.hub.restore(
        [
            ChannelEvent("notifications", {"n": 1}, frozenset({B1}), 81),
            ChannelEvent("async-responses", {"id": "x"}, frozenset({B2}), 82),
            ChannelEvent("notifications", {"n": 2}, frozenset({A1}), 83),  # no channel
        ]
    )
    assert a.delivered == [(A1, [83])] and B2 not in a.hub.owed


async def test_events_queued_before_the_hub_runs_leave_once_it_does(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net = Net()
    b = await start(nursery, net, "b")
    events = EventStream()
    hub = NotificationHub(events, wall_clock=lambda: 0.0)
    relay = EventRelay(View("a", SLOTS, dict(OWNERS)), hub, net.send)
    relay.outgoing([ChannelEvent("notifications", {"n": 1}, frozenset({B1}), None)])
    channel = b.hub.open(B1, WEB_SOCKET)
    await nursery.start(hub.run)  # (no relay.run: the hub's nursery hosts its senders)
    events.publish("notifications", {"n": 2}, frozenset({B1}))
    await trio.sleep(1)
    assert messages(channel) == [{"notifications": [{"n": 1}, {"n": 2}]}]


async def test_a_peer_with_a_lower_body_bound_gets_smaller_batches(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    net, a, b = await pair(nursery)
    channel = b.hub.open(B1, WEB_SOCKET)
    sizes: list[int] = []

    async def bounded(node: str, body: bytes) -> int:
        sizes.append(len(body))
        return 413 if len(body) > 2000 else await net.send(node, body)

    a.relay.send = bounded
    for i in range(10):
        a.events.publish("notifications", {"n": i, "payload": "x" * 300}, frozenset({B1}))
    await trio.sleep(1)
    got = [item["n"] for m in messages(channel) for item in m["notifications"]]
    assert got == list(range(10)) and a.relay.statistics().refused == 0
    assert a.relay.max_body < 2000
