"""Attacks on the device machine of the issue-12 redesign (float time): behaviour that is
wrong, found by the review of 147062d..HEAD. Each open finding is `xfail(strict=True)` with
the finding in one line (see /work/notes/attack-issue12.md)."""

from __future__ import annotations

import pytest

from dm_actor.coap.blockwise import Block, get_block
from dm_actor.coap.numbers import Code
from dm_actor.device.effects import Finished, Send
from dm_actor.device.machine import MID_BLOCK, DeviceMachine
from tests.device.support import (
    ADDR,
    BLOCK2,
    Driver,
    FakeDevice,
    command,
    decode_send,
    deliver,
    make_machine,
    of_type,
    requests,
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


def _start_observation(m: DeviceMachine, d: Driver, dev: FakeDevice) -> bytes:
    assert m.submit(command("GET", "/3303/0/5700", observe=True), 0.0).value == "accepted"
    d.take(0.0)
    (req,) = requests(d.durable(0.0))
    deliver(m, dev.answer(req, payload=b"20", observe=5), 0.5)
    d.take(0.5)
    assert m.observed_paths() == {"/3303/0/5700"}
    return req.token


def test_rule_3_4_nothing_queued_for_a_replaced_connection_is_sent_on_the_new_one() -> None:
    """RFC 8323 / rule 3.4: what was sent (or queued) on a connection dies with it. A TCP
    device's notification came in blocks while an attempt waited for the store (a hold: the
    fetch GET waits in the endpoint); then the device opens a new connection. The fetch
    failed with the old connection; when the store commits only the held command's request
    may go out on the new connection, never the dead fetch."""
    old_conn, new_conn = object(), object()
    m = make_machine(addr=None, conn=old_conn)
    d = Driver(m)
    dev = FakeDevice(tcp=True)
    token = _start_observation(m, d, dev)
    assert m.submit(command("GET", "/3/0/1", now=1.0), 1.0).value == "accepted"
    d.take(1.0)  # decided and stored: held
    assert m.held
    block0 = Block(0, more=True, szx=2)
    deliver(m, dev.notification(token, 9, bytes(64), block=block0), 1.5)
    assert not requests(d.take(1.5))  # the fetch GET waits for the hold
    m.bind(None, new_conn, 2.0)  # a new connection: the old one's exchanges fail
    d.take(2.0)
    out = [(decode_send(s), s.conn) for s in of_type(d.durable(2.5), Send)]
    fetches = [msg for msg, _ in out if get_block(msg, BLOCK2) is not None]
    assert not fetches, f"{len(fetches)} fetch GET(s) of the old connection sent on the new one"
    # (the held command itself waits for the device's next contact: rule 3.4's attempt not
    # sent, as on ICMP; whatever does leave goes on the new connection)
    assert all(conn is new_conn for _, conn in out)


def test_a_failed_first_answer_in_blocks_leaves_no_observation_behind() -> None:
    """An Observe whose first answer never comes whole is no observation (the endpoint's
    is cancelled: `_forget_observation`). A notification that came while the answer was in
    blocks must not leave one behind either, or `Subscriptions.queue_observe` sees the path
    as observed (`DeviceMachine.observing`) and never queues a new Observe for it."""
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    body = bytes(range(128))
    assert m.submit(command("GET", "/3/0", observe=True), 0.0).value == "accepted"
    d.take(0.0)
    (req,) = requests(d.durable(0.0))
    deliver(m, dev.in_blocks(req, body, observe=3), 0.5)
    (second,) = requests(d.take(0.5))
    deliver(m, dev.notification(req.token, 4, b"newer"), 0.6)
    d.take(0.6)
    # the device breaks the transfer: an error answer to the next block
    deliver(m, dev.answer(second, Code.NOT_FOUND), 0.7)
    effects = d.take(0.7)
    assert [f.outcome.status for f in of_type(effects, Finished)] == [502]
    assert m.observed_paths() == set()
    assert not m.observing("/3/0")
