"""`GET /v3/devices?endpoint_name__prefix=...`: the console's search, served by bisection.

A property test against a naive reference (prefixes, paging in both orders, `after`,
combined with `id__in` / `neq`); the cost at 100k devices counted in look-ups (a page reads at
most `limit + 1` devices, a count none); over HTTP with registered and de-registered devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from hypothesis import given, settings, strategies as st
from sortedcontainers import SortedList

from dm_actor.api import devices
from tests.api.client import start_api
from tests.api.test_flow import online

if TYPE_CHECKING:
    from collections.abc import Callable

    import trio.testing


class Rec:
    __slots__ = ("endpoint",)

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def _source(
    names: list[str], query: dict[str, str], lookups: list[str] | None = None
) -> devices.Source[Rec]:
    records = {n: Rec(n) for n in names}

    def lookup(name: str) -> Rec | None:
        if lookups is not None:
            lookups.append(name)
        return records.get(name)

    clauses = devices.parse_filters(query)
    prefix = devices.id_prefix(clauses)
    get: Callable[[Rec], object] = lambda r: r.endpoint  # noqa: E731
    wanted = prefix is not False and devices.matcher(
        clauses,
        {"id": get, "endpoint_name": get, "endpoint_type": lambda r: "",
         "created_at": lambda r: 0.0, "updated_at": lambda r: 0.0},
        {"state": "registered", "lifecycle_status": "enabled"},
    )  # fmt: skip
    return devices.Source(SortedList(names), lookup, wanted, prefix or None)


NAMES = st.lists(st.text("ab\U0010ffffz", min_size=1, max_size=4), max_size=30, unique=True)


@settings(max_examples=300, deadline=None)
@given(
    names=NAMES,
    prefixes=st.lists(st.text("ab\U0010ffff", min_size=0, max_size=3), min_size=1, max_size=2),
    field=st.sampled_from(["endpoint_name", "id"]),
    after=st.none() | st.text("abz", max_size=3),
    descending=st.booleans(),
    limit=st.integers(2, 5),
    also=st.sampled_from(["", "neq", "in"]),
)
def test_prefix_pages_match_a_naive_reference(
    names: list[str],
    prefixes: list[str],
    field: str,
    after: str | None,
    descending: bool,
    limit: int,
    also: str,
) -> None:
    query = {f"{field}__prefix": prefixes[0]}
    if len(prefixes) > 1:  # two prefix conditions: the second by the other field's name
        other = "id" if field == "endpoint_name" else "endpoint_name"
        query[f"{other}__prefix"] = prefixes[1]
    some = sorted(names)[::2]
    if also == "neq" and names:
        query["endpoint_name__neq"] = names[0]
    elif also == "in":
        query["id__in"] = ",".join(some) or "none"
    source = _source(names, query)
    expected = sorted(
        (n for n in names
         if all(n.startswith(p) for p in prefixes)
         and (also != "neq" or n != names[0])
         and (also != "in" or n in (some or ["none"]))),
        reverse=descending,
    )  # fmt: skip
    total = devices.count(
        [source], devices.candidates(devices.parse_filters(query), ("id", "endpoint_name"))
    )
    assert total == len(expected)
    only = devices.candidates(devices.parse_filters(query), ("id", "endpoint_name"))
    page, more = devices.page([source], after=after, descending=descending, limit=limit, only=only)
    rest = [n for n in expected if after is None or (n < after if descending else n > after)]
    assert [r.endpoint for r in page] == rest[:limit]
    assert more == (len(rest) > limit)


def test_a_prefix_page_at_100k_devices_reads_only_its_page() -> None:
    names = [f"dev-{i:06d}" for i in range(100_000)]
    lookups: list[str] = []
    source = _source(names, {"endpoint_name__prefix": "dev-05"}, lookups)
    page, more = devices.page([source], after=None, descending=False, limit=50)
    assert [r.endpoint for r in page] == [f"dev-{i:06d}" for i in range(50_000, 50_050)]
    assert more and len(lookups) <= 51
    lookups.clear()
    page, more = devices.page([source], after="dev-059990", descending=False, limit=50)
    assert [r.endpoint for r in page] == [f"dev-{i:06d}" for i in range(59_991, 60_000)]
    assert not more and len(lookups) <= 51
    lookups.clear()
    page, _ = devices.page([source], after="dev-050010", descending=True, limit=5)
    assert [r.endpoint for r in page] == [f"dev-{i:06d}" for i in range(50_009, 50_004, -1)]
    lookups.clear()
    assert devices.count([source]) == 10_000 and lookups == []  # (bisection, no read)


async def test_prefix_search_over_http(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    for ep in ("sensor-1", "sensor-2", "sensor-3", "sense", "meter-1"):
        await online(api, nursery, ep)
    gone = await online(api, nursery, "sensor-0")
    await gone.deregister()
    async with api.client() as client:

        async def listed(query: str) -> tuple[list[str], int, bool]:
            reply = await client.request("GET", "/v3/devices?" + query)
            assert reply.status == 200, reply.text
            body = reply.json()
            return [d["endpoint_name"] for d in body["data"]], body["total_count"], body["has_more"]

        assert await listed("endpoint_name__prefix=sensor-&limit=2") == (
            ["sensor-0", "sensor-1"], 4, True)  # fmt: skip
        assert await listed("endpoint_name__prefix=sensor-&limit=2&after=sensor-1") == (
            ["sensor-2", "sensor-3"], 4, False)  # fmt: skip
        assert await listed("endpoint_name__prefix=sensor-&state=registered") == (
            ["sensor-1", "sensor-2", "sensor-3"], 3, False)  # fmt: skip
        assert await listed("id__prefix=sens&order=DESC&limit=3") == (
            ["sensor-3", "sensor-2", "sensor-1"], 5, True)  # fmt: skip
        assert await listed("endpoint_name__prefix=sensor&id__prefix=meter") == ([], 0, False)
        everyone = ["meter-1", "sense", "sensor-0", "sensor-1", "sensor-2", "sensor-3"]
        assert await listed("endpoint_name__prefix=") == (everyone, 6, False)
        reply = await client.request("GET", "/v3/devices?state__prefix=reg")
        assert reply.status == 400
        assert reply.json()["fields"][0]["name"] == "state__prefix"
