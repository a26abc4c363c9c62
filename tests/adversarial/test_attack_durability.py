"""Attacks on the promise "every 202 ends in exactly one AsyncIDResponse the application
receives" (docs/delivery.md 1.6, 1.7 and 12) and on the HTTP side of the notification channels.

Each test is a finding's reproducer (notes: /work/notes/attack-durability.md, F1-F10; F3
is a documented limitation, not tested); one still open would be `xfail(strict=True)`, so a
fix makes it fail until the mark goes (F2, the last, is fixed: finished commands' answers are
stored, delivery.md 1.7); the others are regression tests, with HTTP edge cases and a
De-register race that held. All run in virtual time over real loopback sockets (the
restart tests on a real SQLite file), a few seconds in all.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from dm_actor import app
from dm_actor.actors.events import EventStream
from dm_actor.actors.supervisor import Accepted, Rejected
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from dm_actor.store.memory import MemoryStore
from dm_actor.store.sqlite import SqliteStore
from tests.actors.support import Device, GatedStore, online as online_bare, responses
from tests.actors.test_restart import async_responses, run_server as run_bare
from tests.api.client import KEY_A, KEY_B, HttpClient, raw_exchange, start_api, websocket
from tests.api.test_flow import online
from tests.api.test_webhook import Received, Receiver
from tests.daemon import free_ports
from tests.store.test_disk_faults import disk_full, inject

if TYPE_CHECKING:
    from pathlib import Path

READ = {"method": "GET", "uri": "/3/0/1"}
WRITE = {"method": "PUT", "uri": "/3/0/14", "payload-b64": "KzAy"}  # a write (never cached)


async def drain(client: HttpClient) -> list[dict[str, Any]]:
    """Every AsyncIDResponse the long poll gives until a poll times out (204); each poll
    acknowledges the previous response."""
    out: list[dict[str, Any]] = []
    for _ in range(50):
        reply = await client.request("GET", "/v2/notification/pull")
        if reply.status != 200:
            assert reply.status == 204, (reply.status, reply.text)
            break
        out += reply.json().get("async-responses", [])
    return out


async def run_daemon(
    nursery: trio.Nursery,
    data_dir: Path,
    clock: trio.testing.MockClock,
    coap_port: int,
    events: EventStream | None = None,
) -> tuple[trio.CancelScope, app.Listening]:
    """`app.serve` on SQLite in `data_dir`, CoAP on `coap_port` (fixed: a restarted server
    comes back where its devices expect it); cancel the scope to stop it (a clean stop)."""
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = {coap_port}\nhttp_port = 0\n'
        f'data_dir = "{data_dir}"\n'
    )
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
        with scope:
            await app.serve(
                settings,
                events=events,
                api_keys=ApiKeys([KEY_A, KEY_B]),
                wall_clock=lambda: 1.7e9 + clock.current_time(),
                task_status=task_status,
            )

    listening: app.Listening = await nursery.start(serve)
    return scope, listening


async def test_another_applications_async_id_does_not_swallow_a_202(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """F1 (fixed in 45f7729): B's request with A's async-id is 409, or accepted and answered
    to B; never a 202 without an AsyncIDResponse."""
    api = await start_api(nursery)
    async with api.client(KEY_A) as a, api.client(KEY_B) as b:
        assert (await a.request("GET", "/v2/notification/pull")).status == 204
        assert (await b.request("GET", "/v2/notification/pull")).status == 204
        await online(api, nursery)
        reply = await a.request("POST", "/v2/device-requests/dev?async-id=r1", json=READ)
        assert reply.status == 202
        reply = await b.request("POST", "/v2/device-requests/dev?async-id=r1", json=READ)
        assert [r["id"] for r in await drain(a)] == ["r1"]
        if reply.status == 202:  # B was promised an AsyncIDResponse ...
            assert [r["id"] for r in await drain(b)] == ["r1"]  # ... and gets none


async def test_a_retry_after_a_restart_is_not_executed_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Rule 1.7: the application retries a POST whose answer it lost (the server restarted);
    the write was done and answered: 202 again, no second execution, and the same
    AsyncIDResponse again for this acceptance (F2, fixed: the answers are stored)."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    [port] = free_ports(1)
    scope, first = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert first.http is not None
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    async with HttpClient(first.http, KEY_A) as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=w1", json=WRITE)
        assert reply.status == 202
        [answered] = await drain(client)
        assert answered["id"] == "w1"
    scope.cancel()
    await trio.sleep(1)
    executed = len(dev.executed)
    scope, second = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert second.http is not None
    async with HttpClient(second.http, KEY_A) as client:
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=w1", json=WRITE)
        again = await drain(client)
    scope.cancel()
    assert reply.status == 202
    assert (again, len(dev.executed)) == ([answered], executed)


async def test_switching_from_a_failing_webhook_to_long_poll_keeps_the_async_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def answer(received: Received) -> int:
        return 200 if received.body == b"{}" else 503  # passes the test PUT, then fails

    api = await start_api(nursery)
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
        # the application gives up on its receiver for now and long-polls instead
        assert (await client.request("DELETE", "/v2/notification/callback")).status == 204
        assert [r["id"] for r in await drain(client)] == ["r1"]


async def test_a_restart_with_more_stored_events_than_the_stream_holds_announces_the_loss(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """8 AsyncIDResponses are owed to an application whose WebSocket is away; the restarted
    server's event stream holds 5 (100,000 by default: two applications away with full
    buffers are enough). Each is delivered or counted in `events-lost`."""
    autojump_clock.autojump_threshold = 0.05
    [port] = free_ports(1)
    scope, first = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert first.http is not None
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    async with HttpClient(first.http, KEY_A) as client:
        assert (await client.request("PUT", "/v2/notification/websocket", json={})).status == 201
        for i in range(8):
            target = f"/v2/device-requests/dev?async-id=c{i}"
            assert (await client.request("POST", target, json=WRITE)).status == 202
        await trio.sleep(5)
    scope.cancel()
    await trio.sleep(1)
    scope, second = await run_daemon(
        nursery, tmp_path, autojump_clock, port, events=EventStream(capacity=5)
    )
    assert second.http is not None
    ids: list[str] = []
    lost = 0
    async with websocket(second.http, ["wss", f"pelion_{KEY_A}"]) as ws:
        with trio.move_on_after(5):
            while True:
                message = json.loads(await ws.get_message())
                lost += message.get("events-lost", 0)
                ids += [r["id"] for r in message.get("async-responses", [])]
    scope.cancel()
    assert len(ids) + lost == 8, (ids, lost)


async def test_http_edge_cases_are_refused_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Held: absurd chunk sizes, conflicting lengths, unknown codings and oversized query
    strings get their 4xx/5xx at once, and the connection closes."""
    api = await start_api(nursery)
    auth = b"Host: t\r\nAuthorization: Bearer " + KEY_A.encode() + b"\r\n"
    put = b"PUT /v2/subscriptions HTTP/1.1\r\n" + auth
    query = b"&".join(b"a%d=1" % i for i in range(2500))
    cases = {
        put + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffffffffffff\r\nabc": b"400",
        put + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n[]x": b"400",
        put + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n": b"501",
        b"GET /v3/devices?" + query + b" HTTP/1.1\r\n" + auth + b"\r\n": b"431",
    }
    for request, status in cases.items():
        with trio.fail_after(2):
            answer = await raw_exchange(api.addr, request)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert answer.count(b"HTTP/1.1 ") == 1


async def test_an_event_in_flight_to_a_slow_webhook_is_stored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """F7 (fixed in 1c53d39). delivery.md 12: an event not yet handed over (a webhook:
    answered 2xx) is stored once it waited a second; a registration event whose PUT the
    receiver has held for 10 s is not handed over, so a crash now must not lose it."""

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


async def test_updates_answered_while_the_disk_is_full_keep_the_registration(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """F8 (fixed in 596db4c: Updates wait for the store, 5.03 while it fails). A device told
    2.04 Changed (its registration extended) must find it registered after the server
    restarts, and its accepted command must not end 429."""
    autojump_clock.autojump_threshold = 0.05
    scope, first, _ = await run_bare(nursery, tmp_path, autojump_clock)
    store = first.supervisor.store
    assert isinstance(store, SqliteStore)
    dev = Device(first.coap_udp, "dev", binding="UQ", lifetime=60, answer=False)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    assert await first.supervisor.submit("dev", "GET", "/3/0/1", async_id="q1") == Accepted()
    faults = inject(store, *[disk_full() for _ in range(10_000)])
    codes = []
    for _ in range(6):  # on time, for 3 minutes
        with trio.move_on_after(29):
            codes.append((await dev.update()).code)
        await trio.sleep(1)
    scope.cancel()  # the operator restarts it (space is freed meanwhile)
    await trio.sleep(2)
    faults.errors.clear()
    scope, second, events = await run_bare(nursery, tmp_path, autojump_clock)
    await trio.sleep(2)
    scope.cancel()
    assert codes  # answered: 5.03 (come back later) or 2.04 (extended)
    if Code.CHANGED in codes:  # told its registration is extended: it must be
        assert "q1" not in async_responses(events)
        assert "dev" in second.supervisor.by_endpoint
    else:
        assert set(codes) == {Code.SERVICE_UNAVAILABLE}


async def test_a_channel_registered_while_the_disk_is_full_is_refused_or_kept(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    autojump_clock.autojump_threshold = 0.05
    [port] = free_ports(1)
    scope, first = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert first.http is not None
    store = first.supervisor.store
    assert isinstance(store, SqliteStore)
    """F9 (fixed in 7f6848c): 503 while the store fails, or kept."""
    faults = inject(store, *[disk_full() for _ in range(10_000)])
    store.put_next_mid("probe", 1)  # a write: its commit fails, the store is unhealthy
    await trio.sleep(1)
    assert not store.healthy()
    async with HttpClient(first.http, KEY_A) as client:
        with trio.fail_after(10):
            pre = await client.request("PUT", "/v2/subscriptions", json=[{"endpoint-name": "n*"}])
            channel = await client.request("PUT", "/v2/notification/websocket", json={})
    scope.cancel()
    await trio.sleep(2)
    faults.errors.clear()  # space freed; the operator restarts it
    scope, second = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert second.http is not None
    async with HttpClient(second.http, KEY_A) as client:
        kept_pre = (await client.request("GET", "/v2/subscriptions")).json()
        kept_channel = (await client.request("GET", "/v2/notification/websocket")).status
    scope.cancel()
    assert pre.status == 503 or kept_pre == [{"endpoint-name": "n*"}]
    assert channel.status == 503 or kept_channel == 200


async def test_a_command_started_at_once_never_leaves_after_a_de_register(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Held: a command started at once waits for its write before it is sent; a De-register
    arriving meanwhile ends it with 429 DEVICE_REMOVED_REGISTRATION, the 202 still leaves
    (once durable), and the device never gets the request."""
    store = GatedStore()
    store.open = True
    server, dev = await online_bare(nursery, store=store)
    store.open = False  # the disk stalls from now on
    result: list[Accepted | Rejected] = []

    async def post() -> None:
        result.append(await server.sup.submit("dev", "POST", "/3/0/4", async_id="reboot"))

    nursery.start_soon(post)
    await trio.sleep(0.1)
    nursery.start_soon(dev.deregister)
    await trio.sleep(0.5)
    store.commit()
    await trio.sleep(5)
    store.commit()
    await trio.sleep(5)
    assert result == [Accepted()]
    assert dev.executed == []
    assert responses(server)["reboot"]["error"] == "DEVICE_REMOVED_REGISTRATION"


async def test_an_async_response_committed_with_its_channels_deletion_stays_stored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    api = await start_api(nursery, store=store)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        await online(api, nursery)
        assert (await client.request("GET", "/v2/notification/pull")).status == 200
        read = {**READ, "accept": "text/plain"}  # (not from the cache)
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=r1", json=read)
        assert reply.status == 202
        store.open = False  # the next commit is slow
        await trio.sleep(1)  # answered: r1's AsyncIDResponse waits for that commit
        # the application's client restarts: it deletes and re-creates its channel
        deleted: list[str] = []

        async def delete() -> None:
            deleted.append((await client.request("DELETE", "/v2/notification/pull")).text)

        with trio.fail_after(30):
            async with trio.open_nursery() as deleting:
                deleting.start_soon(delete)
                await trio.sleep(0.5)  # (the delete waits for the same commit)
                store.commit()
        assert deleted == ["REMOVED"]
        store.open = True
        with trio.fail_after(40):
            reply = await client.request("GET", "/v2/notification/pull")
        got: list[dict[str, Any]] = reply.json()["async-responses"] if reply.status == 200 else []
        assert [r["id"] for r in got] == ["r1"]  # delivered, held until the next poll ...
        assert [e.kind for e in store.load().events] == ["async-responses"]  # ... so stored
