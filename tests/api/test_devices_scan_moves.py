"""A /v3/devices scan (a filter on a field that differs between devices) runs in chunks with
other tasks in between: a device that moves between the registered devices and the
de-registered ones meanwhile is listed once, in the state it had when its chunk was read
(api/devices.py `paging`, `counting`). Virtual time; the stand-in supervisor of the issue-14
attack test (3,000 devices, two of them typed)."""

from __future__ import annotations

import json
from typing import Any, cast

import trio
import trio.testing

from tests.adversarial.test_attack_issue14 import _stand_in_supervisor


async def _page(sup: Any, move: str, revive: bool) -> dict[str, Any]:
    from dm_actor.api.routes import Api, Request

    api = Api(cast("Any", sup), cast("Any", None), webhooks=cast("Any", object()))

    async def move_during_the_scan() -> None:
        await trio.lowlevel.checkpoint()  # (the scan's ids are taken by now)
        actor = sup.by_endpoint.pop(move)
        sup.endpoint_names.remove(move)
        sup.registry.directory.retain(actor.reg, trio.current_time())
        if revive:  # ... and registers again (the live device replaces the entry)
            sup.registry.directory.revive(move)
            sup.by_endpoint[move] = actor
            sup.endpoint_names.add(move)

    query = {"endpoint_type__eq": "x", "limit": "10"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(move_during_the_scan)
        status, _, body = await api._devices(Request(b"GET", ["v3", "devices"], query, b"", "a"))
    assert status == 200
    return cast("dict[str, Any]", json.loads(body))


async def test_a_device_leaving_before_its_chunk_is_read_is_listed_as_deregistered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = _stand_in_supervisor(3000, {"d00005", "d02500"})
    page = await _page(sup, "d02500", revive=False)  # (its chunk is read after the move)
    assert [(d["id"], d["state"]) for d in page["data"]] == [
        ("d00005", "registered"),
        ("d02500", "deregistered"),
    ]
    assert page["total_count"] == 2


async def test_a_device_leaving_and_returning_during_a_scan_is_listed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sup = _stand_in_supervisor(3000, {"d00005", "d02500"})
    page = await _page(sup, "d02500", revive=True)
    assert [(d["id"], d["state"]) for d in page["data"]] == [
        ("d00005", "registered"),
        ("d02500", "registered"),
    ]
    assert page["total_count"] == 2
