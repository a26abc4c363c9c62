"""`GET /v3/devices` filters and the de-registered devices' entries, over the real HTTP server.

Devices register over UDP on loopback (virtual time: each registers a minute after the last,
so their `created_at` differ); the application lists them with every operator, gets 400
`validation_error` with Pelion's `fields` for what is not supported, and sees de-registered
and expired devices as `deregistered` for `[registration] directory_retention` seconds, at
most `directory_max` of them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode

import trio
import trio.testing

from dm_actor.actors.directory import Directory
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from dm_actor.credentials import Credentials

from .client import start_api
from .test_flow import online

if TYPE_CHECKING:
    from dm_actor.lwm2m.registration import Registration
    from tests.actors.support import Device

    from .client import Api, HttpClient

ALL = ("dev-a", "dev-b", "dev-c", "dev-d")


async def _fleet(api: Api, nursery: trio.Nursery) -> dict[str, Device]:
    """dev-a..dev-d registered a minute apart (dev-b and dev-d are `sensor`s)."""
    fleet = {}
    for ep in ALL:
        kind = "sensor" if ep in ("dev-b", "dev-d") else None
        fleet[ep] = await online(api, nursery, ep=ep, endpoint_type=kind)
        await trio.sleep(60)
    return fleet


async def _ids(client: HttpClient, query: str, **expect: Any) -> list[str]:
    reply = await client.request("GET", "/v3/devices?" + query)
    assert reply.status == 200, (query, reply.text)
    page = reply.json()
    for key, value in expect.items():
        assert page[key] == value, (query, key, page[key])
    return [d["id"] for d in page["data"]]


async def _refused(client: HttpClient, query: str, name: str) -> str:
    reply = await client.request("GET", "/v3/devices?" + query)
    body = reply.json()
    assert reply.status == 400, (query, body)
    assert (body["object"], body["code"], body["type"]) == ("error", 400, "validation_error")
    [field] = body["fields"]
    assert field["name"] == name and field["message"] == body["message"], body
    message: str = body["message"]
    return message


async def test_every_operator(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    fleet = await _fleet(api, nursery)
    assert (await fleet["dev-c"].deregister()).code == Code.DELETED
    async with api.client() as client:
        created = {d["id"]: d["created_at"] for d in (await client.request(
            "GET", "/v3/devices")).json()["data"]}  # fmt: skip
        assert list(created) == list(ALL)
        c = quote(created["dev-c"])
        cases = {
            "": ALL,
            "state__eq=registered": ("dev-a", "dev-b", "dev-d"),
            "filter=state%3Dregistered": ("dev-a", "dev-b", "dev-d"),
            "state=deregistered": ("dev-c",),
            "state__neq=registered": ("dev-c",),
            "state__in=registered,deregistered": ALL,
            "state__nin=registered": ("dev-c",),
            "id__eq=dev-b": ("dev-b",),
            "id__neq=dev-b": ("dev-a", "dev-c", "dev-d"),
            "id__in=dev-d,dev-a,ghost": ("dev-a", "dev-d"),
            "id__nin=dev-d,dev-a": ("dev-b", "dev-c"),
            "endpoint_name__in=dev-c": ("dev-c",),
            "endpoint_type__eq=sensor": ("dev-b", "dev-d"),
            "endpoint_type__neq=sensor": ("dev-a", "dev-c"),
            "endpoint_type__nin=sensor,": (),
            "lifecycle_status__eq=enabled": ALL,
            f"created_at__gte={c}": ("dev-c", "dev-d"),
            f"created_at__lte={c}": ("dev-a", "dev-b", "dev-c"),
            f"created_at__in={c},{quote(created['dev-a'])}": ("dev-a", "dev-c"),
            f"created_at__nin={c}": ("dev-a", "dev-b", "dev-d"),
            f"created_at__gte={c}&state__eq=registered": ("dev-d",),
            # dev-c's entry was updated when it left (3 minutes after it registered)
            f"updated_at__gte={quote(created['dev-d'])}": ("dev-c", "dev-d"),
            "filter=" + quote(urlencode({"id__in": "dev-a,dev-b", "state": "registered"})): (
                "dev-a", "dev-b"),
            "filter=" + quote(f"created_at__lte={created['dev-a']}"): ("dev-a",),
        }  # fmt: skip
        for query, want in cases.items():
            assert tuple(await _ids(client, query, total_count=len(want))) == want, query
            got = await _ids(client, query + "&order=DESC&limit=2")
            assert tuple(got) == tuple(reversed(want))[:2], query
        # pages of a filter, after= the last id of the previous one
        assert await _ids(client, "state__neq=nothing&limit=2", has_more=True) == ["dev-a", "dev-b"]
        assert await _ids(client, "state__neq=nothing&limit=2&after=dev-b", has_more=False,
                          total_count=4) == ["dev-c", "dev-d"]  # fmt: skip
        assert await _ids(client, "id__in=dev-a,dev-b,dev-d&limit=2&after=dev-a",
                          has_more=False, total_count=3) == ["dev-b", "dev-d"]  # fmt: skip
        # the de-registered device, alone
        reply = await client.request("GET", "/v3/devices/dev-c")
        device = reply.json()
        assert reply.status == 200 and device["state"] == "deregistered", device
        assert device["created_at"] == created["dev-c"] and device["updated_at"] > created["dev-d"]


async def test_what_is_not_supported_gets_400(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="dev-a")
    async with api.client() as client:
        assert "'color'" in await _refused(client, "color__eq=red", "color__eq")
        assert "'color'" in await _refused(client, "filter=color%3Dred", "color")
        assert "gte" in await _refused(client, "state__gte=registered", "state__gte")
        await _refused(client, "id__like=dev", "id__like")
        await _refused(client, "id__=dev-a", "id__")
        await _refused(client, "created_at__eq=2025-01-01T00:00:00Z", "created_at__eq")
        await _refused(client, "created_at__gte=yesterday", "created_at__gte")
        await _refused(client, "created_at__in=2025-01-01T00:00:00Z,x", "created_at__in")
        await _refused(client, "updated_at__lte=2025-02-30T00:00:00Z", "updated_at__lte")
        await _refused(client, "filter=" + quote("created_at__gte=2025-01-01T99:00:00Z"),
                       "created_at__gte")  # fmt: skip
        await _refused(client, "limit=1", "limit")
        await _refused(client, "order=UP", "order")
        # a parameter that is no filter at all is not read (as before)
        assert await _ids(client, "colour=red") == ["dev-a"]


async def test_hostile_filters_are_bounded_and_answered(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="dev-a")
    async with api.client() as client:
        # a value as long as a request head allows: compared, matches nothing
        assert await _ids(client, "endpoint_type__eq=" + "x" * 15_000) == []
        assert await _ids(client, "id__nin=" + "x" * 15_000) == ["dev-a"]
        # 10,000 ids in one `in`: the request head is over 16 KiB (431); 2,000 fit
        ids = ",".join(f"d{i}" for i in range(10_000))
        reply = await client.request("GET", "/v3/devices?id__in=" + ids)
        assert reply.status == 431
        ids = ",".join(["dev-a", *(f"d{i}" for i in range(2_000))])
        assert await _ids(client, "id__in=" + ids, total_count=1) == ["dev-a"]
        # repeated parameters: the last of a name counts (the query's rule for every route)
        assert await _ids(client, "state__eq=registered&state__eq=nothing") == []
        assert await _ids(client, "state__eq=nothing&state__eq=registered") == ["dev-a"]
        # ... and within `filter=`, every pair counts
        assert await _ids(client, "filter=" + quote("state=registered&state=x")) == []
        await _refused(client, "filter=" + quote("&".join(["id__neq=x"] * 65)), "filter")
        # a filter value that is not UTF-8 or has broken escapes is a value like another
        assert await _ids(client, "id__eq=%FF%FE%zz") == []
        # the server still answers
        assert await _ids(client, "") == ["dev-a"]


async def test_retention_is_bounded_in_time_and_count(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    settings = parse_settings("[registration]\ndirectory_retention = 600\ndirectory_max = 2\n")
    api = await start_api(nursery, settings)
    fleet = await _fleet(api, nursery)  # (dev-a's registration: 240 s old)
    async with api.client() as client:
        for ep in ("dev-a", "dev-b", "dev-c"):
            assert (await fleet[ep].deregister()).code == Code.DELETED
            await trio.sleep(100)
        # at most 2 kept: dev-a, the first to leave, is forgotten
        assert await _ids(client, "state__eq=deregistered", total_count=2) == ["dev-b", "dev-c"]
        assert (await client.request("GET", "/v3/devices/dev-a")).status == 404
        assert await _ids(client, "", total_count=3) == ["dev-b", "dev-c", "dev-d"]
        # dev-b registers again: the live device replaces its entry (same id)
        assert (await fleet["dev-b"].register()).code == Code.CREATED
        assert await _ids(client, "state__eq=deregistered", total_count=1) == ["dev-c"]
        assert (await client.request("GET", "/v3/devices/dev-b")).json()["state"] == "registered"
        # 600 s after dev-c left, its entry is gone
        await trio.sleep(600 - 100)
        assert await _ids(client, "state__eq=deregistered", total_count=0) == []
        assert await _ids(client, "") == ["dev-b", "dev-d"]
        # an expired registration is listed as deregistered too
        fleet["dev-d"].lifetime = 60
        assert (await fleet["dev-d"].register()).code == Code.CREATED
        await trio.sleep(60 + settings.registration.expiry_grace + 1)
        assert await _ids(client, "state__eq=deregistered") == ["dev-d"]


async def test_retention_can_be_switched_off(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, parse_settings("[registration]\ndirectory_max = 0\n"))
    dev = await online(api, nursery, ep="dev-a")
    assert (await dev.deregister()).code == Code.DELETED
    async with api.client() as client:
        assert await _ids(client, "", total_count=0) == []
    assert len(api.server.sup.registry.directory) == 0


def _reg(ep: str, t: float) -> Registration:
    """The fields of a registration a `Gone` record reads."""
    fields = SimpleNamespace(
        endpoint=ep, endpoint_type=None, registered_at=t, updated_at=t,
        lwm2m_version="1.1", binding="U", queue_mode=False, lifetime=60,
    )  # fmt: skip
    return cast("Registration", fields)


def test_the_directory_is_bounded_by_count_and_time() -> None:
    directory = Directory(retention=100.0, max_entries=3)
    for i in range(10):
        directory.retain(_reg(f"d{i}", 0.0), float(i))
    assert list(directory.names) == ["d7", "d8", "d9"] and len(directory) == 3
    directory.retain(_reg("d8", 0.0), 20.0)  # left again: now the newest
    assert list(directory.gone) == ["d7", "d9", "d8"]
    directory.purge(107.5)
    assert list(directory.gone) == ["d9", "d8"] and list(directory.names) == ["d8", "d9"]
    directory.revive("d9")
    directory.revive("ghost")
    assert list(directory.names) == ["d8"]
    directory.purge(120.0)
    assert len(directory) == 0 and not directory.names


async def test_a_scan_lets_other_tasks_run(autojump_clock: trio.testing.MockClock) -> None:
    """A filter that reads every device yields every `CHUNK` devices: another task runs
    between the chunks (here 10,000 devices: ~10 turns), and the answer is still exact."""
    from sortedcontainers import SortedList

    from dm_actor.api import devices
    from dm_actor.api.routes import Api, Request

    class Actor:
        def __init__(self, ep: str, t: float) -> None:
            self.endpoint = ep
            self.reg = SimpleNamespace(endpoint=ep, endpoint_type=None, registered_at=t,
                                       updated_at=t, lwm2m_version="1.1", binding="U",
                                       queue_mode=False, lifetime=60)  # fmt: skip

    by_endpoint = {f"d{i:05d}": Actor(f"d{i:05d}", float(i)) for i in range(10_000)}
    sup = SimpleNamespace(
        by_endpoint=by_endpoint,
        endpoint_names=SortedList(by_endpoint),
        registry=SimpleNamespace(directory=Directory(60.0, 10)),
        credentials=Credentials(),
        wall_offset=1.7e9,
        now=trio.current_time,
    )
    api = Api(cast("Any", sup), cast("Any", None), webhooks=cast("Any", object()))
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            await trio.lowlevel.checkpoint()
            turns += 1

    query = {"endpoint_type__eq": "none-of-them", "limit": "10"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        status, _, body = await api._devices(Request(b"GET", ["v3", "devices"], query, b"", "a"))
        before, turns, done = turns, 0, True
    assert status == 200 and b'"total_count":0' in body
    assert before >= 2 * (10_000 // devices.CHUNK) - 2  # (the page's scan and the count's)
    query = {"limit": "10", "created_at__lte": "2023-11-14T22:13:20.500Z"}  # 1.7e9 + 0..0.5 s
    status, _, body = await api._devices(Request(b"GET", ["v3", "devices"], query, b"", "a"))
    assert status == 200 and b'"total_count":1' in body and b'"has_more":false' in body
