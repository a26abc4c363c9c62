"""`dm_actor.node._chunks`: the devices of adopted slots, handed over in parts."""

from __future__ import annotations

from dm_actor.node import _chunks
from dm_actor.store.base import AnswerRecord, CommandRecord, RegistrationRecord, Snapshot


def _snapshot(devices: int) -> Snapshot:
    regs = [
        RegistrationRecord(f"d{i}", f"r{i}", 60, "1.1", "U", False, "</3/0>", 0.0, 0.0)
        for i in range(devices)
    ]
    commands = [
        CommandRecord(
            f"d{i % devices}",
            f"a{i}",
            "GET",
            "/3/0/0",
            b"",
            None,
            None,
            0.0,
            9.0,
            1,
            0,
            None,
            False,
            "app",
        )
        for i in range(3 * devices)
    ]
    answers = [
        AnswerRecord("app", f"x{i}", f"d{i}", b"k", i, b"{}", 0.0, 9.0) for i in range(devices)
    ]
    return Snapshot(
        registrations=regs,
        commands=commands,
        subscriptions={f"d{i}": [("/3/0/0", "app")] for i in range(0, devices, 2)},
        next_mids={f"d{i}": i for i in range(devices)},
        answers=answers,
    )


def test_each_part_carries_its_own_devices_records_in_order() -> None:
    whole = _snapshot(25)
    parts = list(_chunks(whole, 10))
    assert [len(p.registrations) for p in parts] == [10, 10, 5]
    for part in parts:
        eps = {r.endpoint for r in part.registrations}
        assert {c.endpoint for c in part.commands} == eps
        assert set(part.next_mids) == eps and {a.endpoint for a in part.answers} == eps
        assert set(part.subscriptions) <= eps
        for ep in eps:  # a device's commands keep their order of acceptance
            mine = [c.async_id for c in whole.commands if c.endpoint == ep]
            assert [c.async_id for c in part.commands if c.endpoint == ep] == mine
    assert sum(len(p.commands) for p in parts) == len(whole.commands)
    assert sum(len(p.subscriptions) for p in parts) == len(whole.subscriptions)


def test_a_small_snapshot_is_one_part() -> None:
    whole = _snapshot(5)
    assert list(_chunks(whole, 10)) == [whole]
