"""Attacks on the device machine of the issue-12 redesign (float time): behaviour that is
wrong, found by the review of 147062d..HEAD. Each open finding is `xfail(strict=True)` with
the finding in one line (see /work/notes/attack-issue12.md)."""

from __future__ import annotations

import pytest

from dm_actor.coap.numbers import Code
from dm_actor.device.machine import MID_BLOCK
from tests.device.support import ADDR, Driver, command, make_machine, requests


@pytest.mark.xfail(
    strict=True,
    reason="after a restart, a device that moves to TCP and back to UDP before its first UDP "
    "request gets a random Message ID start, not one past the store's reservation "
    "(bd909b7 continues from _mid_limit, which a restored machine has not set yet)",
)
@pytest.mark.parametrize("seed", range(5))
def test_after_a_restart_tcp_and_back_continues_past_the_stored_reservation(seed: int) -> None:
    """The restored machine starts its Message IDs at the store's reservation (`mid_start`):
    the old process may have sent every MID below it within EXCHANGE_LIFETIME. The device
    then connects over TCP and comes back on UDP (a new message layer): its MIDs must still
    continue past that reservation, as they do without a restart (bd909b7), never restart
    at random (1 in 256 lands in the old process's last block, answered from the device's
    deduplication cache)."""
    mid_start = 5000
    m = make_machine(mid_start=mid_start, seed=seed)
    d = Driver(m)
    m.bind(None, object(), 1.0)  # it connects over TCP (re-registers there)
    m.bind(ADDR, None, 2.0)  # and is back on UDP
    d.take(2.0)
    assert m.submit(command("PUT", "/3/0/1", b"1", now=3.0), 3.0).value == "accepted"
    d.take(3.0)
    (req,) = requests(d.durable(3.0))
    assert req.code == Code.PUT
    assert (req.mid - mid_start) & 0xFFFF < MID_BLOCK, f"MID {req.mid}: not past {mid_start}"
