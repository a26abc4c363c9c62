"""Attacks on issue 14 (Pelion application compatibility): each test is a bug found by
trying the new surface as a hostile or demanding client would, or as an existing Pelion
application would. Each is `xfail(strict=True)` until the bug is fixed: the test states the
behaviour the docs promise, and fails today. Real loopback sockets, virtual time.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import pytest
import trio
import trio.testing
from sortedcontainers import SortedList

from dm_actor.actors.directory import Directory
from dm_actor.actors.subscriptions import Pending
from dm_actor.coap.numbers import Code
from dm_actor.credentials import Credentials
from tests.actors.support import Device
from tests.actors.test_restart import async_responses as async_responses_of, run_server, slow_jumps
from tests.adversarial.test_attack_durability import WRITE, drain
from tests.api.client import KEY_A, KEY_B, start_api
from tests.api.test_endpoint_resources import register_in_blocks
from tests.api.test_flow import online
from tests.api.test_subscription_results import async_responses, polled

if TYPE_CHECKING:
    from pathlib import Path

    from tests.api.client import Api, HttpClient


def post(client: HttpClient, async_id: str, body: dict[str, Any], dev: str = "dev") -> Any:
    return client.request("POST", f"/v2/device-requests/{dev}?async-id={async_id}", json=body)


# -- async-id reuse (item 3) ------------------------------------------------------------------


async def test_a_long_poll_repeat_after_the_answer_arrived_gets_it_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        assert (await post(client, "w1", WRITE)).status == 202
        reply = await client.request("GET", "/v2/notification/pull")
        assert [r["id"] for r in reply.json()["async-responses"]] == ["w1"]  # it arrived
        # the application repeats the request (it lost track of it): 202 ...
        assert (await post(client, "w1", WRITE)).status == 202
        # ... and, as the rule says, one AsyncIDResponse follows the 202
        assert [r["id"] for r in await drain(client)] == ["w1"]


# -- /v3/devices filters (item 2) ---------------------------------------------------------------


async def test_an_empty_filter_value_is_applied_not_ignored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="plain")
    await online(api, nursery, ep="typed", endpoint_type="sensor")
    async with api.client() as client:
        legacy = (await client.request("GET", "/v3/devices?filter=id__in%3D")).json()
        assert legacy["total_count"] == 0  # the legacy form applies it
        reply = await client.request("GET", "/v3/devices?id__in=")
        assert reply.status == 400 or reply.json()["total_count"] == 0, reply.json()
        reply = await client.request("GET", "/v3/devices?endpoint_type__eq=")
        assert reply.status == 200
        assert [d["id"] for d in reply.json()["data"]] == ["plain"]


def _stand_in_supervisor(count: int, typed: set[str]) -> SimpleNamespace:
    class Actor:
        def __init__(self, ep: str, t: float) -> None:
            self.endpoint = ep
            self.reg = SimpleNamespace(
                endpoint=ep, endpoint_type="x" if ep in typed else None, registered_at=t,
                updated_at=t, lwm2m_version="1.1", binding="U", queue_mode=False, lifetime=60,
            )  # fmt: skip

    by_endpoint = {f"d{i:05d}": Actor(f"d{i:05d}", float(i)) for i in range(count)}
    return SimpleNamespace(
        by_endpoint=by_endpoint,
        endpoint_names=SortedList(by_endpoint),
        registry=SimpleNamespace(directory=Directory(3600.0, 1000)),
        credentials=Credentials(),
        wall_offset=1.7e9,
        now=trio.current_time,
    )


async def test_a_device_leaving_during_a_scan_is_listed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from dm_actor.api.routes import Api, Request

    sup = _stand_in_supervisor(3000, {"d00005", "d02500"})
    api = Api(cast("Any", sup), cast("Any", None), webhooks=cast("Any", object()))
    moved = False

    async def deregister_during_the_scan() -> None:
        nonlocal moved
        await trio.lowlevel.checkpoint()  # (the scan's first chunk is read by now)
        actor = sup.by_endpoint.pop("d00005")
        sup.endpoint_names.remove("d00005")
        sup.registry.directory.retain(actor.reg, trio.current_time())
        moved = True

    query = {"endpoint_type__eq": "x", "limit": "10"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deregister_during_the_scan)
        status, _, body = await api._devices(Request(b"GET", ["v3", "devices"], query, b"", "a"))
    assert moved and status == 200
    page = json.loads(body)
    ids = [d["id"] for d in page["data"]]
    assert len(ids) == len(set(ids)), ids
    assert page["total_count"] == 2, page["total_count"]


# -- the WebSocket upgrade (items 6, 8) -----------------------------------------------------------

_UPGRADE = (
    b"GET /v2/notification/websocket-connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: c2l4dGVlbiBieXRlIGtleQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Authorization: Bearer " + KEY_A.encode() + b"\r\n"
)


async def _head(addr: Any, request: bytes) -> bytes:
    """What the server answers to `request` within 10 s (the connection may stay open)."""
    out = b""
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in out and (chunk := await stream.receive_some(65536)):
                out += chunk
    return out


async def test_connection_upgrade_on_two_field_lines_is_an_upgrade(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
    head = await _head(
        api.addr, _UPGRADE + b"Connection: Upgrade\r\nConnection: keep-alive\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 101 "), head


# -- resource lists (item 1): what a device's links cost ------------------------------------------


async def _bytes_per_device(api: Api, links: bytes, prefix: str, count: int) -> float:
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        assert await register_in_blocks(api.server.addr, f"{prefix}{i}", links) == Code.CREATED
    api.server.take()
    gc.collect()
    return (tracemalloc.get_traced_memory()[0] - before) / count


async def test_link_attributes_do_not_multiply_a_devices_memory(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    plain = ",".join(f"</3303/{i}/5700>" for i in range(500)).encode()
    hostile = ",".join(f'</3303/{i}/5700>;obs;rt="{"r" * 100}"' for i in range(500)).encode()
    assert len(hostile) < 64 * 1024
    tracemalloc.start()
    try:
        without = await _bytes_per_device(api, plain, "plain-", 5)
        with_attributes = await _bytes_per_device(api, hostile, "hostile-", 5)
    finally:
        tracemalloc.stop()
    assert with_attributes <= 2 * without, (without, with_attributes)


# -- subscriptions (items 4, 5) ------------------------------------------------------------------


async def _asleep(api: Api, nursery: trio.Nursery, client: HttpClient) -> Device:
    """A long-poll channel and a queue-mode device `dev`, asleep (awake_time 93 s)."""
    await client.request("GET", "/v2/notification/pull")
    dev = await online(api, nursery, binding="UQ")
    await polled(client)
    await trio.sleep(100)
    return dev


async def test_a_202_is_answered_even_when_a_repeated_put_succeeds_in_its_wait(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client, api.client() as again:
        dev = await _asleep(api, nursery, client)
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 202
        promised = reply.json()["async-response-id"]
        answers: list[int] = []

        async def repeat() -> None:
            answers.append((await again.request("PUT", "/v2/subscriptions/dev/3303/0/5700")).status)

        async with trio.open_nursery() as inner:
            inner.start_soon(repeat)
            await trio.sleep(1)  # the repeat waits ...
            await dev.update()  # ... and the device wakes: it accepts the Observe
        assert answers == [200]
        messages = await polled(client) + await polled(client)
        assert [r["id"] for r in async_responses(messages)] == [promised]


async def test_a_repeat_after_a_restart_keeps_the_pending_subscriptions_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    slow_jumps(autojump_clock)
    scope, first, _ = await run_server(nursery, tmp_path, autojump_clock)
    dev = Device(first.coap_udp, "sleepy", binding="UQ", lifetime=3600)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    await trio.sleep(100)  # asleep
    path = "/3303/0/5700"
    before = await first.supervisor.subscriptions.subscribe_waiting("sleepy", path, "app", 3.0)
    assert isinstance(before, Pending)
    scope.cancel()  # the daemon stops
    await trio.sleep(10)
    _, second, events = await run_server(nursery, tmp_path, autojump_clock)
    after = await second.supervisor.subscriptions.subscribe_waiting("sleepy", path, "app", 3.0)
    assert isinstance(after, Pending)
    dev.server = second.coap_udp
    assert (await dev.update()).code == Code.CHANGED  # it wakes: the stored Observe goes
    await trio.sleep(2)
    answered = async_responses_of(events)
    assert before.async_response_id in answered, (before, after, list(answered))


async def test_delete_removes_what_the_same_put_path_subscribed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        await online(api, nursery)
        target = "/v2/subscriptions/dev/3303/00/5700"
        assert (await client.request("PUT", target)).status == 200
        assert (await client.request("GET", target)).status == 200
        assert (await client.request("DELETE", target)).status == 204
        reply = await client.request("GET", "/v2/subscriptions/dev")
        assert (reply.status, reply.text) == (404, "NO_SUBSCRIPTIONS")


# -- async-ids between applications (item 3) ------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="Async-ids are unique per application (the issue's rule), but a device's queue "
    "knows commands by id alone: while application B's command 'temp-read' waits for a "
    "sleeping device (up to expiry-seconds: 30 days), application A's own 'temp-read' to "
    "that device gets 409 ASYNC_ID_IN_USE. With ids built from device and path, as Pelion "
    "suggests, one application blocks another's requests (docs/delivery.md 1.7 states the "
    "exception; it contradicts the per-application rule).",
)
async def test_another_applications_unfinished_id_does_not_block_mine(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, binding="UQ")
    await trio.sleep(100)  # asleep: commands wait for it
    async with api.client() as a, api.client(KEY_B) as b:
        assert (await post(b, "temp-read", WRITE)).status == 202
        reply = await post(a, "temp-read", WRITE)
        assert (reply.status, reply.text) == (202, "")


async def test_the_queue_view_shows_only_my_commands(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, binding="UQ")
    await trio.sleep(100)  # asleep: commands wait for it
    async with api.client() as a, api.client(KEY_B) as b:
        assert (await post(a, "a-secret-id", WRITE)).status == 202
        view = (await b.request("GET", "/v2/device-requests/dev")).json()
        assert [c["async-id"] for c in view["commands"]] == [], view


async def test_a_blank_after_starts_at_the_first_page_in_both_orders(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="a")
    await online(api, nursery, ep="b")
    async with api.client() as client:
        for order, ids in (("ASC", ["a", "b"]), ("DESC", ["b", "a"])):
            page = (await client.request("GET", f"/v3/devices?order={order}&after=")).json()
            assert [d["id"] for d in page["data"]] == ids, (order, page)


async def test_obs_survives_the_attribute_bound(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    links = ",".join(f"</3303/{i}/5700>;obs" for i in range(300)).encode()
    assert await register_in_blocks(api.server.addr, "gateway", links) == Code.CREATED
    async with api.client() as client:
        listed = (await client.request("GET", "/v2/endpoints/gateway")).json()
    assert len(listed) == 300
    assert [r["uri"] for r in listed if not r["obs"]] == []
