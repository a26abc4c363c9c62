"""A /v3/devices scan (a filter on a field that differs between devices) runs in chunks with
other tasks in between: a device that moves between the registered devices and the
de-registered ones meanwhile is listed once, in the state it had when its chunk was read
(api/devices.py `paging`, `counting`). The scan is stepped by hand (deterministic): the move
happens at its first yield; the stand-in supervisor of the issue-14 attack test (3,000
devices, two of them typed)."""

from __future__ import annotations

from typing import Any

from dm_actor.api import devices
from tests.adversarial.test_attack_issue14 import _stand_in_supervisor


def _move(sup: Any, device_id: str, revive: bool) -> None:
    actor = sup.by_endpoint.pop(device_id)
    sup.endpoint_names.remove(device_id)
    sup.registry.directory.retain(actor.reg, 0.0)
    if revive:  # ... and it registers again (the live device replaces the entry)
        sup.registry.directory.revive(device_id)
        sup.by_endpoint[device_id] = actor
        sup.endpoint_names.add(device_id)


def _scan(device_id: str, revive: bool) -> tuple[list[tuple[str, str]], int]:
    """The page and the count of `endpoint_type__eq=x`, `device_id` moving at the first
    yield of each."""
    results = []
    for kind in ("page", "count"):
        sup: Any = _stand_in_supervisor(3000, {"d00005", "d02500"})
        clauses = devices.parse_filters({"endpoint_type__eq": "x"})
        sources: list[devices.Source[Any]] = [
            devices.registered_source(sup, clauses, 0.0),
            devices.gone_source(sup.registry.directory, clauses, 0.0),
        ]
        steps: Any = (
            devices.paging(sources, after=None, descending=False, limit=10)
            if kind == "page"
            else devices.counting(sources)
        )
        next(steps)  # (the ids are taken by now)
        _move(sup, device_id, revive)
        results.append(devices.run(steps))
    (page, _), total = results
    shown = [(r.endpoint, "registered" if hasattr(r, "reg") else "deregistered") for r in page]
    return shown, total


def test_a_device_leaving_before_its_chunk_is_read_is_listed_as_deregistered() -> None:
    shown, total = _scan("d02500", revive=False)
    assert shown == [("d00005", "registered"), ("d02500", "deregistered")]
    assert total == 2


def test_a_device_leaving_after_its_chunk_was_read_is_listed_once_as_registered() -> None:
    shown, total = _scan("d00005", revive=False)
    assert shown == [("d00005", "registered"), ("d02500", "registered")]
    assert total == 2


def test_a_device_leaving_and_returning_during_a_scan_is_listed_once() -> None:
    shown, total = _scan("d02500", revive=True)
    assert shown == [("d00005", "registered"), ("d02500", "registered")]
    assert total == 2
