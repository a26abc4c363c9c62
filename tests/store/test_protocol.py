"""The `Store` protocol, on the memory store and on SQLite files (read back after reopening)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor.store.base import (
    ApiKeyRecord,
    ChannelRecord,
    EventRecord,
    PresubscriptionRecord,
    RegistrationRecord,
    Snapshot,
    Store,
)
from dm_actor.store.memory import MemoryStore
from dm_actor.store.sqlite import SqliteStore

from .support import Backend, command, registration, running

if TYPE_CHECKING:
    from pathlib import Path


async def test_registrations_round_trip(backend: Backend) -> None:
    store = backend.open()
    async with running(store):
        for ep in ("a", "b", "c"):
            store.put_registration(registration(ep))
        await store.durable()
        store.put_registration(registration("b", lifetime=60, at=5.0))
        store.delete_registration("c")
        await store.durable()
    snap = backend.reopen(store)
    assert {r.endpoint: r for r in snap.registrations} == {
        "a": registration("a"),
        "b": registration("b", lifetime=60, at=5.0),
    }
    assert all(type(r.queue_mode) is bool for r in snap.registrations)


async def test_a_registration_keeps_its_endpoint_type(backend: Backend) -> None:
    store = backend.open()
    typed = RegistrationRecord("t", "r-t", 60, "1.1", "U", False, "</3/0>", 1.0, 1.0, "Light")
    async with running(store):
        store.put_registration(typed)
        store.put_registration(registration("u"))
        await store.durable()
    snap = backend.reopen(store)
    assert {r.endpoint: r.endpoint_type for r in snap.registrations} == {"t": "Light", "u": None}


async def test_a_registration_keeps_its_udp_address(backend: Backend) -> None:
    store = backend.open()
    v4 = RegistrationRecord("a", "r-a", 60, "1.1", "U", False, "</3/0>", 1.0, 1.0,
                            address='["127.0.0.1",5683]')  # fmt: skip
    v6 = msgspec.structs.replace(v4, endpoint="b", address='["::1",5683,0,0]')
    async with running(store):
        for record in (v4, v6, registration("tcp")):
            store.put_registration(record)
        await store.durable()
    snap = backend.reopen(store)
    assert {r.endpoint: r.address for r in snap.registrations} == {
        "a": '["127.0.0.1",5683]',
        "b": '["::1",5683,0,0]',
        "tcp": None,
    }


async def test_commands_keep_every_field(backend: Backend) -> None:
    store = backend.open()
    full = command("a", "x1", payload=b"\x00\xff", accept=11542, observe=True,
                   last_attempt_at=9.5, attempts=2, mid=0xBEEF, token=b"\x01\x02")  # fmt: skip
    bare = command("a", "x2", content_format=None, payload=b"", at=2.0)
    async with running(store):
        store.put_command(full)
        store.put_command(bare)
        await store.durable()
    snap = backend.reopen(store)
    assert snap.commands == [full, bare]
    assert type(snap.commands[0].observe) is bool
    assert snap.commands[1].mid is None and snap.commands[1].token is None


async def test_put_again_replaces_and_delete_forgets(backend: Backend) -> None:
    store = backend.open()
    async with running(store):
        store.put_command(command("a", "x1"))
        store.put_command(command("a", "x2", at=2.0))
        await store.durable()
        store.put_command(command("a", "x1", attempts=1, mid=7, token=b"t"))
        store.delete_command("a", "x2")
        store.delete_command("a", "never-put")
        await store.durable()
    assert backend.reopen(store).commands == [command("a", "x1", attempts=1, mid=7, token=b"t")]


async def test_commands_come_back_in_acceptance_order(backend: Backend) -> None:
    """Across devices and commits; an attempt's update does not move a command."""
    store = backend.open()
    accepted = [command(f"ep{i % 3}", f"id{i}", at=float(i)) for i in range(30)]
    async with running(store):
        for i, record in enumerate(accepted):
            store.put_command(record)
            if i % 7 == 0:
                await store.durable()
        accepted[0] = command("ep0", "id0", at=0.0, attempts=1, mid=1, token=b"k")
        store.put_command(accepted[0])  # an update, long after
        await store.durable()
    assert backend.reopen(store).commands == accepted


async def test_coalesced_writes_in_one_batch(backend: Backend) -> None:
    """Put then delete leaves nothing; delete then put keeps the put; the last put wins."""
    store = backend.open()
    async with running(store):
        store.put_command(command("a", "old"))
        store.put_subscription("a", "/3/0/9", "app-1")
        await store.durable()
        # one batch: nothing awaits in between
        store.put_command(command("a", "gone"))
        store.delete_command("a", "gone")
        store.delete_command("a", "old")
        store.put_command(command("a", "old", at=3.0))
        for n in range(5):
            store.put_command(command("a", "last", at=4.0, attempts=n))
        store.put_subscription("a", "/3/0/7", "app-1")
        store.delete_subscription("a", "/3/0/7", "app-1")
        store.delete_subscription("a", "/3/0/9", "app-1")
        store.put_subscription("a", "/3/0/9", "app-1")
        store.put_registration(registration("r"))
        store.delete_registration("r")
        store.put_registration(registration("b"))
        store.put_registration(registration("b", lifetime=99))
        await store.durable()
    snap = backend.reopen(store)
    assert snap.commands == [command("a", "old", at=3.0), command("a", "last", at=4.0, attempts=4)]
    assert snap.subscriptions == {"a": [("/3/0/9", "app-1")]}
    assert snap.registrations == [registration("b", lifetime=99)]


async def test_delete_registration_forgets_only_its_commands(backend: Backend) -> None:
    store = backend.open()
    async with running(store):
        store.put_registration(registration("a"))
        store.put_registration(registration("b"))
        store.put_command(command("a", "committed"))
        store.put_command(command("b", "other"))
        store.put_subscription("a", "/3/0/9", "app-1")
        await store.durable()
        store.put_command(command("a", "pending", at=2.0))
        store.delete_registration("a")
        store.put_command(command("a", "after", at=3.0))  # a new registration's command
        await store.durable()
    snap = backend.reopen(store)
    assert snap.registrations == [registration("b")]
    assert snap.commands == [command("b", "other"), command("a", "after", at=3.0)]
    assert snap.subscriptions == {"a": [("/3/0/9", "app-1")]}  # the actors drop those


async def test_subscriptions_and_presubscriptions(backend: Backend) -> None:
    store = backend.open()
    pre = [PresubscriptionRecord("node-*", None, ("/3/0/9", "/3303/*")),
           PresubscriptionRecord(None, "Light", ("/3311/0/5850",))]  # fmt: skip
    async with running(store):
        for path, owner in [("/3/0/9", "app-2"), ("/3/0/9", "app-1"), ("/1/0/1", "app-1")]:
            store.put_subscription("z", path, owner)
        store.put_subscription("y", "/3/0/0", "app-1")
        store.set_presubscriptions("app-1", pre)
        store.set_presubscriptions("app-2", pre[:1])
        await store.durable()
        store.set_presubscriptions("app-2", [])
        store.set_presubscriptions("app-1", pre[::-1])
        await store.durable()
    snap = backend.reopen(store)
    assert snap.subscriptions == {
        "y": [("/3/0/0", "app-1")],
        "z": [("/1/0/1", "app-1"), ("/3/0/9", "app-1"), ("/3/0/9", "app-2")],
    }
    assert snap.presubscriptions == {"app-1": pre[::-1]}


async def test_channels_keys_and_events(backend: Backend) -> None:
    store = backend.open()
    now = backend.clock.now
    hook = ChannelRecord("app-1", "CALLBACK", now, "https://h.example/cb",
                         {"Authorization": "Bearer x"}, '{"type":"v2"}')  # fmt: skip
    socket = ChannelRecord("app-2", "WEB_SOCKET", now)
    async with running(store):
        store.put_channel(hook)
        store.put_channel(socket)
        store.put_api_key(ApiKeyRecord("digest-1", "app-1", now))
        store.put_api_key(ApiKeyRecord("digest-2", "app-2", now))
        for seq in range(1, 6):
            store.put_event(EventRecord("app-1", seq, "notifications", b'{"n":%d}' % seq, now))
            store.put_event(EventRecord("app-2", seq, "registrations", b"{}", now))
        await store.durable()
        store.delete_events("app-1", [3, 1, 2, 99])  # delivered (99: never stored)
        store.delete_channel("app-2")  # its queue goes with it
        store.delete_api_key("digest-2")
        store.put_event(EventRecord("app-1", 6, "async-responses", b"[]", now))
        await store.durable()
    snap = backend.reopen(store)
    assert snap.channels == [hook]
    assert snap.api_keys == [ApiKeyRecord("digest-1", "app-1", now)]
    assert [(e.owner, e.seq) for e in snap.events] == [("app-1", 4), ("app-1", 5), ("app-1", 6)]
    assert snap.events[0] == EventRecord("app-1", 4, "notifications", b'{"n":4}', now)


async def test_delivered_events_are_forgotten_by_seq_in_any_order(backend: Backend) -> None:
    """A channel's events are stored out of seq order (an AsyncIDResponse gets its seq before
    it is published, a waiting event when it is spilled): deletes name exact seqs."""
    store = backend.open()
    now = backend.clock.now
    async with running(store):
        for seq in (10, 12, 11):
            store.put_event(EventRecord("app", seq, "notifications", b"x", now))
        await store.durable()
        store.delete_events("app", [12])
        store.put_event(EventRecord("app", 13, "notifications", b"y", now))
        store.delete_events("app", [13])  # put and forgotten in one batch
        store.delete_events("app", [14])
        store.put_event(EventRecord("app", 14, "notifications", b"z", now))  # after its delete
        await store.durable()
    assert [e.seq for e in backend.reopen(store).events] == [10, 11, 14]


async def test_events_expire_after_their_lifetime(backend: Backend) -> None:
    store = backend.open(event_lifetime=3600.0)
    t0 = backend.clock.now
    async with running(store):
        store.put_event(EventRecord("app-1", 1, "notifications", b"old", t0))
        store.put_event(EventRecord("app-1", 2, "notifications", b"new", t0 + 1800.0))
        await store.durable()
    backend.clock.now = t0 + 3600.5
    assert [e.seq for e in backend.reopen(store).events] == [2]


async def test_events_beyond_the_byte_cap_drop_the_oldest(backend: Backend) -> None:
    store = backend.open(event_bytes_cap=100)
    now = backend.clock.now
    async with running(store):
        for seq in range(1, 8):  # 7 x 30 bytes
            store.put_event(EventRecord("app-1", seq, "notifications", b"x" * 30, now))
            if seq % 2:
                await store.durable()
        store.put_event(EventRecord("app-2", 1, "notifications", b"y" * 90, now))
        await store.durable()
    snap = backend.reopen(store)
    assert [(e.owner, e.seq) for e in snap.events] == [
        ("app-1", 5), ("app-1", 6), ("app-1", 7), ("app-2", 1)
    ]  # fmt: skip


async def test_many_concurrent_writers_are_all_durable(backend: Backend) -> None:
    store = backend.open()
    async with running(store), trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(_put_and_wait, store, i)
    snap = backend.reopen(store)
    assert sorted(c.async_id for c in snap.commands) == sorted(f"id{i:03}" for i in range(500))


async def _put_and_wait(store: Store, i: int) -> None:
    store.put_command(command(f"ep{i % 10}", f"id{i:03}", at=float(i)))
    await store.durable()


# ----------------------------------------------------------------- SQLite against the model


def _normal(snap: Snapshot) -> Snapshot:
    """Order-free parts sorted, so two stores' snapshots compare."""
    snap.registrations.sort(key=lambda r: r.endpoint)
    snap.channels.sort(key=lambda c: c.owner)
    snap.api_keys.sort(key=lambda k: k.key)
    return snap


async def test_next_mids_round_trip_and_go_with_the_registration(backend: Backend) -> None:
    store = backend.open()
    async with running(store):
        store.put_registration(registration("a"))
        store.put_registration(registration("b"))
        store.put_next_mid("a", 300)
        store.put_next_mid("a", 556)  # the next block
        store.put_next_mid("b", 65535)
        await store.durable()
        store.delete_registration("b")
        store.put_next_mid("b", 0)  # registered again: a new reservation in the same batch
        store.put_next_mid("c", 7)
        store.delete_registration("c")
        await store.durable()
        assert store.load().next_mids == {"a": 556, "b": 0}
        store.delete_registration("a")
        await store.durable()
    assert backend.reopen(store).next_mids == {"b": 0}


async def test_random_writes_match_the_memory_store(tmp_path: Path) -> None:
    """Random interleavings of every write, with commits at random points, on small key
    spaces so that coalescing happens all the time: SQLite ends where MemoryStore ends."""
    for seed in range(25):
        rng = random.Random(seed)
        path = tmp_path / f"s{seed}.sqlite3"
        model = MemoryStore()
        sqlite = SqliteStore(path, max_batch=rng.choice([3, 50, 10_000]))
        accepted: dict[tuple[str, str], float] = {}
        stores: tuple[Store, Store] = (model, sqlite)
        async with running(sqlite):
            for step in range(300):
                _random_write(rng, stores, accepted, step)
                if rng.random() < 0.1:
                    await sqlite.durable()
            await sqlite.durable()
        sqlite.close()
        reopened = SqliteStore(path)
        assert _normal(reopened.load()) == _normal(model.load()), seed
        reopened.close()


def _random_write(
    rng: random.Random, stores: tuple[Store, ...], accepted: dict[tuple[str, str], float], n: int
) -> None:
    ep = rng.choice("abc")
    aid = rng.choice(["1", "2", "3", "4"])
    owner = rng.choice(["app-1", "app-2"])
    op = rng.randrange(11)
    for store in stores:
        if op == 0:
            store.put_registration(registration(ep, lifetime=n))
        elif op == 1:
            store.delete_registration(ep)
        elif op in (2, 3, 4):  # the acceptance time stays with a queued command
            at = accepted.setdefault((ep, aid), float(n))
            store.put_command(command(ep, aid, at=at, attempts=n, mid=n))
            if op == 4:
                store.put_next_mid(ep, n)
        elif op == 5:
            store.delete_command(ep, aid)
        elif op == 6:
            store.put_subscription(ep, f"/3/0/{aid}", owner)
        elif op == 7:
            store.delete_subscription(ep, f"/3/0/{aid}", owner)
        elif op == 8:
            store.set_presubscriptions(owner, [PresubscriptionRecord(ep, None, (aid,))] * (n % 3))
        elif op == 9:
            store.put_event(EventRecord(owner, n, "notifications", b"%d" % n, 1e9))
            store.put_channel(ChannelRecord(owner, "WEB_SOCKET", float(n)))
            store.put_api_key(ApiKeyRecord(f"k{aid}", owner, float(n)))
        elif n % 2:
            store.delete_events(owner, [n - rng.randrange(30) for _ in range(5)])
        else:
            store.delete_channel(owner)
            store.delete_api_key(f"k{aid}")
    if op == 1:  # a deregistration forgets the device's commands
        for key in [k for k in accepted if k[0] == ep]:
            del accepted[key]
    elif op == 5:
        accepted.pop((ep, aid), None)
