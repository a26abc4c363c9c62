"""Blank query parameters that are not filters mean "not given" (filters keep blank values:
`id__in=` selects nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .client import start_api
from .test_flow import online

if TYPE_CHECKING:
    import trio.testing


async def test_blank_limit_order_retry_and_expiry_take_the_defaults(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await online(api, nursery, ep="a")
    async with api.client() as client:
        page = await client.request("GET", "/v3/devices?limit=&order=&after=")
        assert page.status == 200 and [d["id"] for d in page.json()["data"]] == ["a"]
        reply = await client.request(
            "POST",
            "/v2/device-requests/a?async-id=blank&retry=&expiry-seconds=",
            json={"method": "GET", "uri": "/3/0/1"},
        )
        assert reply.status == 202, reply.body
        none = await client.request("GET", "/v3/devices?id__in=")
        assert none.status == 200 and none.json()["data"] == []
