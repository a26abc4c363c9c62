"""The device machine in float time: what could only be tested through loopback sockets and a
nursery before (the durable hold, Message-ID reservation, retransmission, block-wise answers,
notification fetches and ordering, the value cache, TCP, the end of a registration).

Each test is named after the rule (docs/delivery.md) or RFC section it checks, as in
tests/actors/. `Driver` (tests/device/support.py) checks the actor's contract on every
effect: no request between a `Hold` and `durable`, every request's Message ID reserved and
durable, never reused within EXCHANGE_LIFETIME, no command finished twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from dm_actor.coap.blockwise import Block, get_block
from dm_actor.coap.message import Message, encode
from dm_actor.coap.numbers import Code
from dm_actor.delivery import outcomes
from dm_actor.device.attempt import AttemptState, Link
from dm_actor.device.effects import (
    Count,
    DeviceRequest,
    Effect,
    Finished,
    Hold,
    Notified,
    ObserveAgain,
    ReserveMids,
    Send,
    StoreCommand,
)
from dm_actor.device.machine import MID_BLOCK, DeviceMachine
from tests.device.support import (
    ADDR,
    ADDR2,
    BLOCK2,
    CON,
    CONTENT_FORMAT,
    OBSERVE,
    PARAMS,
    RESEND_WINDOW,
    ContractBroken,
    Driver,
    FakeDevice,
    command,
    decode_send,
    deliver,
    make_machine,
    of_type,
    requests,
    sent,
)

if TYPE_CHECKING:
    from dm_actor.delivery.queue import Command

BODY = bytes(range(256)) * 2  # 512 bytes: 8 blocks of 64 (szx 2)


def state(m: DeviceMachine) -> AttemptState:
    """(read through a call: mypy would keep an earlier assertion's narrowing)"""
    return m.attempt


def due(m: DeviceMachine) -> float:
    """The machine's timer, which must be set."""
    timer = m.get_timer()
    assert timer is not None
    return timer


def start(m: DeviceMachine, d: Driver, cmd: Command, now: float = 0.0) -> Message:
    """Submit `cmd` to an idle machine, make its write durable: the request it sent."""
    assert m.submit(cmd, now).value == "accepted"
    d.take(now)
    reqs = requests(d.durable(now))
    assert len(reqs) == 1, reqs
    return reqs[0]


def finished(effects: list[Effect]) -> list[outcomes.Outcome]:
    return [f.outcome for f in of_type(effects, Finished)]


# -- the durable hold ---------------------------------------------------------------------------


def test_rule_4_1_a_submitted_command_is_stored_with_its_exchange_and_held_unsent() -> None:
    m = make_machine(mid_start=100)
    d = Driver(m)
    cmd = command()
    m.submit(cmd, 0.0)
    effects = d.take()
    assert of_type(effects, ReserveMids) == [ReserveMids(100 + MID_BLOCK)]
    stored = of_type(effects, StoreCommand)
    assert [s.command for s in stored] == [cmd]
    assert cmd.mid == 100 and cmd.token is not None  # one write holds the exchange too
    assert of_type(effects, Hold)
    assert not of_type(effects, Send)
    # the reservation and the command are asked for before the hold that waits for them
    kinds = [type(e) for e in effects]
    assert kinds.index(ReserveMids) < kinds.index(Hold)
    assert kinds.index(StoreCommand) < len(kinds) - 1 - kinds[::-1].index(Hold)
    assert m.held
    assert state(m) is AttemptState.DECIDED


def test_a_request_leaves_only_once_durable_with_the_stored_message_id_and_token() -> None:
    m = make_machine(mid_start=100)
    d = Driver(m)
    cmd = command()
    m.submit(cmd, 0.0)
    d.take()
    m.handle_timer(5.0)  # nothing is due: the request was never sent
    m.settle(5.0)
    assert not of_type(d.take(5.0), Send)
    reqs = requests(d.durable(5.0))
    assert [(r.mid, r.token, r.mtype) for r in reqs] == [(cmd.mid, cmd.token, CON)]
    assert state(m) is AttemptState.SENT
    assert not m.held
    timer = m.get_timer()
    assert timer is not None and 7.0 <= timer <= 8.0  # timed from when it left (5.0)


def test_answers_to_the_devices_own_requests_leave_during_a_hold() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    m.submit(command(), 0.0)
    d.take()
    assert m.held
    update = dev.request(Code.POST, "/rd/abc")
    deliver(m, update, 1.0)
    asked = of_type(d.take(1.0), DeviceRequest)
    assert len(asked) == 1
    m.respond(asked[0].request, Code.CHANGED, (), 1.0)
    replies = sent(d.take(1.0))
    assert [(r.mtype, r.code, r.mid) for r in replies] == [(2, Code.CHANGED, asked[0].request.mid)]
    deliver(m, dev.ping(), 1.5)  # a CoAP ping is answered with a Reset, hold or not
    assert [r.mtype for r in sent(d.take(1.5))] == [3]
    assert m.held  # and still no request
    assert len(requests(d.durable(2.0))) == 1


def test_a_non_request_of_the_device_is_answered_during_a_hold() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    m.submit(command(), 0.0)
    d.take()
    deliver(m, dev.request(Code.POST, "/rd/abc", con=False), 1.0)
    (asked,) = of_type(d.take(1.0), DeviceRequest)
    m.respond(asked.request, Code.CHANGED, (), 1.0)
    replies = sent(d.take(1.0))
    assert [(r.mtype, r.code, r.token) for r in replies] == [(1, Code.CHANGED, asked.request.token)]


def test_rule_5_2_an_attempt_that_expired_while_its_write_waited_is_never_sent() -> None:
    m = make_machine()
    d = Driver(m)
    cmd = command(expiry=60.0)
    m.submit(cmd, 0.0)
    d.take()
    effects = d.durable(61.0)
    assert not requests(effects)
    assert finished(effects) == [outcomes.EXPIRED]
    assert state(m) is AttemptState.IDLE


def test_rule_2_1_the_next_command_waits_for_its_own_write_after_the_first_finishes() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first, second = command("PUT", "/3/0/1", b"a"), command("PUT", "/3/0/1", b"b")
    req = start(m, d, first)
    m.submit(second, 0.5)
    effects = d.take(0.5)
    assert [s.command for s in of_type(effects, StoreCommand)] == [second]
    assert not of_type(effects, Send)  # one at a time (rule 2.2)
    deliver(m, dev.answer(req, Code.CHANGED), 1.0)
    effects = d.take(1.0)
    assert [f.command for f in of_type(effects, Finished)] == [first]
    assert of_type(effects, Hold) and not requests(effects)  # `second`'s exchange is written
    reqs = requests(d.durable(1.0))
    assert [r.payload for r in reqs] == [b"b"]


def test_rule_3_4_a_decided_attempt_waits_while_the_address_is_taken_and_keeps_its_retry() -> None:
    m = make_machine()
    d = Driver(m)
    cmd = command(retry=0)
    m.submit(cmd, 0.0)
    d.take()
    m.lose_address()  # another device registered from this address
    assert not requests(d.durable(0.5))  # durable, but nowhere to go
    assert state(m) is AttemptState.DECIDED
    m.unreachable(0.5)  # (reported in order with the mail)
    d.take(0.5)
    assert state(m) is AttemptState.IDLE and m.queue.queue == [cmd] and cmd.attempts_left == 1
    m.bind(ADDR2, None, 1.0)
    deliver(m, FakeDevice().ping(), 1.0)
    d.take(1.0)
    (req,) = requests(d.durable(1.0))
    assert (req.mid, req.token) == (cmd.mid, cmd.token)  # the same exchange, from ADDR2
    assert of_type(d.log, Send)[-1].addr == ADDR2


def test_rules_6_1_to_6_3_a_queue_mode_device_is_sent_to_only_while_awake() -> None:
    m = make_machine(queue_mode=True)
    d = Driver(m)
    dev = FakeDevice()
    first = command(retry=1, now=0.0, expiry=3600.0)
    req = start(m, d, first)  # awake since its Register (rule 6.4)
    deliver(m, dev.answer(req, payload=b"1"), 1.0)
    d.take(1.0)
    late = command(now=100.0, expiry=3600.0)  # 93 s after its last message: asleep
    m.submit(late, 100.0)
    effects = d.take(100.0)
    assert of_type(effects, StoreCommand) and not of_type(effects, Hold)
    m.settle(150.0)
    assert not d.take(150.0)
    deliver(m, dev.request(Code.POST, "/rd/abc"), 200.0)  # it wakes up (rule 6.2)
    effects = d.take(200.0)
    assert of_type(effects, DeviceRequest)
    assert of_type(effects, Hold)
    (req,) = requests(d.durable(200.0))
    _time_out(m, d)  # rule 6.3: asleep again; the command stays at the head
    assert m.queue.queue == [late] and late.attempts_left == 2
    m.submit(command(now=400.0), 400.0)
    assert not requests(d.take(400.0) + d.durable(400.0))


# -- Message-ID reservation -----------------------------------------------------------------------


def test_message_ids_are_reserved_a_block_at_a_time_and_a_new_block_is_held() -> None:
    m = make_machine(mid_start=1000)
    d = Driver(m)
    dev = FakeDevice()
    now = 0.0
    for i in range(MID_BLOCK):
        req = start(m, d, command("PUT", "/3/0/1", b"%d" % i, now=now), now)
        assert req.mid == 1000 + i
        deliver(m, dev.answer(req, Code.CHANGED), now)
        d.take(now)
        now += 1.0
    assert of_type(d.log, ReserveMids) == [ReserveMids(1000 + MID_BLOCK)]
    cmd = command("PUT", "/3/0/1", b"next", now=now)
    m.submit(cmd, now)
    effects = d.take(now)
    assert of_type(effects, ReserveMids) == [ReserveMids(1000 + 2 * MID_BLOCK)]
    assert of_type(effects, Hold) and not of_type(effects, Send)
    reqs = requests(d.durable(now))
    assert [r.mid for r in reqs] == [1000 + MID_BLOCK]


def test_a_block_request_past_the_reserved_block_waits_for_its_reservation() -> None:
    m = make_machine(mid_start=100)
    d = Driver(m)
    dev = FakeDevice()
    for i in range(MID_BLOCK - 1):
        req = start(m, d, command("PUT", "/3/0/1", b"%d" % i, now=float(i)), float(i))
        deliver(m, dev.answer(req, Code.CHANGED), float(i))
        d.take(float(i))
    first = start(m, d, command("GET", "/3/0", now=300.0), 300.0)
    assert first.mid == 100 + MID_BLOCK - 1  # the last of the block
    deliver(m, dev.in_blocks(first, BODY[:128]), 300.5)
    effects = d.take(300.5)
    assert of_type(effects, ReserveMids) == [ReserveMids(100 + 2 * MID_BLOCK)]
    assert of_type(effects, Hold) and not requests(effects)
    assert state(m) is AttemptState.IN_BLOCKS
    (second,) = requests(d.durable(300.6))
    assert second.mid == 100 + MID_BLOCK
    deliver(m, dev.in_blocks(second, BODY[:128]), 301.0)
    assert [o.payload for o in finished(d.take(301.0))] == [BODY[:128]]


@pytest.mark.parametrize("mid_start", [5000, 65500, 0])
def test_after_a_restart_no_message_id_below_mid_start_is_used(mid_start: int) -> None:
    """The store's reservation is where the restarted process starts (`mid_start`): every
    MID the old process may have sent lies below it (modulo 2**16)."""
    m = make_machine(mid_start=mid_start)
    d = Driver(m)
    dev = FakeDevice()
    mids = []
    now = 0.0
    for i in range(300):
        req = start(m, d, command("PUT", "/3/0/1", b"%d" % i, now=now), now)
        mids.append(req.mid)
        deliver(m, dev.answer(req, Code.CHANGED), now)
        d.take(now)
        now += 1.0
    assert mids == [(mid_start + i) & 0xFFFF for i in range(300)]
    limits = [r.limit for r in of_type(d.log, ReserveMids)]
    assert limits == [(mid_start + MID_BLOCK) & 0xFFFF, (mid_start + 2 * MID_BLOCK) & 0xFFFF]


def test_rule_7_2_a_restored_attempt_is_resent_as_the_same_exchange() -> None:
    m = make_machine(mid_start=5000)
    d = Driver(m)
    cmd = command("POST", "/3/0/4", now=-10.0)
    cmd.mid, cmd.token, cmd.exchange_at = 4990, b"old!", -10.0  # restored from the store
    d.restored_mids.add(4990)
    req = start(m, d, cmd)
    assert (req.mid, req.token) == (4990, b"old!")
    assert not of_type(d.log, ReserveMids)  # no new Message ID was drawn


def test_rule_7_2_an_exchange_older_than_the_devices_memory_is_not_resent() -> None:
    m = make_machine(mid_start=5000)
    d = Driver(m)
    cmd = command("POST", "/3/0/4", now=-RESEND_WINDOW)
    cmd.mid, cmd.token, cmd.exchange_at = 4990, b"old!", -RESEND_WINDOW
    req = start(m, d, cmd)
    assert req.mid == 5000 and req.token != b"old!"


def test_a_device_that_moves_to_tcp_and_back_never_gets_a_recent_message_id_again() -> None:
    m = make_machine(mid_default=100)
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command("PUT", "/3/0/1", b"1"))
    deliver(m, dev.answer(req, Code.CHANGED), 0.5)
    d.take(0.5)
    m.bind(None, object(), 1.0)
    m.bind(ADDR, None, 2.0)
    d.take(2.0)
    start(m, d, command("PUT", "/3/0/1", b"2", now=3.0), 3.0)  # ContractBroken: MID 100 again


# -- retransmission (RFC 7252 4.2, rule 3.2) ------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_rule_3_2_retransmissions_after_ack_timeout_with_its_random_factor_then_doubling(
    seed: int,
) -> None:
    m = make_machine(seed=seed)
    d = Driver(m)
    req = start(m, d, command(retry=0))
    first = m.get_timer()
    assert first is not None
    assert PARAMS.ack_timeout <= first <= PARAMS.ack_timeout * PARAMS.ack_random_factor
    now, timeout = 0.0, first
    for _ in range(PARAMS.max_retransmit):
        timer = due(m)
        assert timer == pytest.approx(now + timeout)
        m.handle_timer(timer - 0.01)  # not yet
        assert not d.take(timer)
        now = timer
        m.handle_timer(now)
        again = requests(d.take(now))
        assert [encode(r) for r in again] == [encode(req)]  # the same datagram
        timeout *= 2
    last = due(m)
    assert last == pytest.approx(now + timeout)
    m.handle_timer(last)
    m.settle(last)
    effects = d.take(last)
    assert finished(effects) == [outcomes.TIMED_OUT]
    assert outcomes.TIMED_OUT.status == 504
    assert last == pytest.approx(first * ((1 << (PARAMS.max_retransmit + 1)) - 1))
    assert m.get_timer() is None
    assert state(m) is AttemptState.IDLE


def _time_out(m: DeviceMachine, d: Driver) -> float:
    """Let the attempt in flight time out; the time it failed."""
    now = 0.0
    while (timer := m.get_timer()) is not None:
        now = timer
        m.handle_timer(now)
        m.settle(now)
        d.take(now)
    return now


def test_rules_3_5_and_7_1_a_timed_out_attempt_is_resent_on_a_contact_after_the_grace() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    cmd = command(retry=1, expiry=3600.0)
    req = start(m, d, cmd)
    failed_at = _time_out(m, d)
    assert not of_type(d.log, Finished)
    assert cmd.attempts_left == 1 and m.queue.queue == [cmd]
    deliver(m, dev.ping(), failed_at + 1.0)  # inside the grace (rule 7.1): no resend
    assert not requests(d.take(failed_at + 1.0))
    deliver(m, dev.ping(), 121.0)  # 120 s after the attempt started
    d.take(121.0)
    again = requests(d.durable(121.0))
    # within the device's EXCHANGE_LIFETIME: the same exchange, answered from its cache
    assert [(r.mid, r.token) for r in again] == [(req.mid, req.token)]
    end = _time_out(m, d)
    assert end > 121.0
    assert finished(d.log[-10:]) == [outcomes.TIMED_OUT]


def test_rule_3_4_a_reset_fails_the_attempt_and_the_last_one_finishes_503() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command(retry=0))
    deliver(m, dev.reset(req), 1.0)
    effects = d.take(1.0)
    assert finished(effects) == [outcomes.UNREACHABLE]
    assert m.get_timer() is None


def test_rule_3_4_an_icmp_error_fails_the_attempt() -> None:
    m = make_machine()
    d = Driver(m)
    start(m, d, command(retry=0))
    m.unreachable(1.0)
    assert finished(d.take(1.0)) == [outcomes.UNREACHABLE]


def test_rfc_7252_5_2_2_an_empty_ack_stops_retransmission_and_the_separate_answer_ends_it() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command())
    deliver(m, dev.ack(req), 1.0)
    assert state(m) is AttemptState.ACKED
    timer = m.get_timer()
    assert timer == pytest.approx(PARAMS.max_transmit_wait)  # no retransmission any more
    deliver(m, dev.separate(req, payload=b"late"), 30.0)
    effects = d.take(30.0)
    assert [o.payload for o in finished(effects)] == [b"late"]
    assert [r.mtype for r in sent(effects)] == [2]  # the CON response is ACKed


# -- block-wise answers (RFC 7959 2.4) -------------------------------------------------------------


def test_rfc_7959_each_next_block_is_asked_as_a_new_exchange_and_the_body_comes_once() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first = start(m, d, command("GET", "/3/0"))
    asked = [first]
    req = first
    for n in range(1, 8):
        deliver(m, dev.in_blocks(req, BODY), float(n))
        reqs = requests(d.take(float(n)))
        assert len(reqs) == 1
        req = reqs[0]
        block = get_block(req, BLOCK2)
        assert block is not None and (block.num, block.szx) == (n, 2)
        assert req.options[:2] == first.options[:2]  # the same Uri-Path
        assert state(m) is AttemptState.IN_BLOCKS
        asked.append(req)
    assert len({r.mid for r in asked}) == 8 and len({r.token for r in asked}) == 8
    deliver(m, dev.in_blocks(req, BODY), 8.0)
    effects = d.take(8.0)
    assert [o.payload for o in finished(effects)] == [BODY]
    assert not requests(effects)
    assert state(m) is AttemptState.IDLE
    assert len(of_type(d.log, Finished)) == 1


def test_rfc_7959_a_lost_block_request_is_retransmitted_and_the_body_is_whole() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first = start(m, d, command("GET", "/3/0"))
    deliver(m, dev.in_blocks(first, BODY[:128]), 0.5)
    (second,) = requests(d.take(0.5))
    timer = m.get_timer()
    assert timer is not None and 2.5 <= timer <= 3.5
    m.handle_timer(timer)
    assert [r.mid for r in requests(d.take(timer))] == [second.mid]
    deliver(m, dev.in_blocks(second, BODY[:128]), timer + 0.1)
    assert [o.payload for o in finished(d.take(timer + 0.1))] == [BODY[:128]]


def test_rfc_7959_later_blocks_of_a_post_answer_do_not_repeat_the_post_body() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first = start(m, d, command("POST", "/3/0/4", b"args"))
    assert first.payload == b"args" and first.option(CONTENT_FORMAT) is not None
    deliver(m, dev.in_blocks(first, BODY[:100]), 0.5)
    (second,) = requests(d.take(0.5))
    assert second.code == Code.POST and second.payload == b""
    assert second.option(CONTENT_FORMAT) is None
    deliver(m, dev.in_blocks(second, BODY[:100]), 0.6)
    assert [o.payload for o in finished(d.take(0.6))] == [BODY[:100]]


def _block_3(req: Message) -> Message:
    """`req` asking for block 3 instead (a device answering the wrong block)."""
    options = tuple(o for o in req.options if o[0] != BLOCK2)
    return req._replace(options=(*options, Block(3, more=False, szx=2).option(BLOCK2)))


@pytest.mark.parametrize("how", ["etag-always-changes", "error", "wrong-block-always"])
def test_rfc_7959_a_transfer_the_device_breaks_finishes_502_incomplete(how: str) -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command("GET", "/3/0"))
    now = 0.0
    for n in range(10):
        now += 0.5
        if n == 0 or how == "etag-always-changes":
            data = dev.in_blocks(req, BODY, etag=b"v%d" % n)
        elif how == "error":
            data = dev.answer(req, Code.NOT_FOUND)
        else:
            data = dev.in_blocks(_block_3(req), BODY, etag=b"v0")
        deliver(m, data, now)
        effects = d.take(now)
        if m.held:
            effects += d.durable(now)
        nxt = requests(effects)
        if not nxt:
            break
        (req,) = nxt
    assert n < 9  # the assembler's few retries (3 restarts), then it gives up
    assert finished(d.log) == [outcomes.INCOMPLETE]
    assert outcomes.INCOMPLETE.status == 502
    assert Count("blockwise_failures") in d.log
    assert state(m) is AttemptState.IDLE
    assert m.get_timer() is None  # nothing is retransmitted for it any more


def test_rfc_7959_a_changed_etag_restarts_the_transfer_from_block_0() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first = start(m, d, command("GET", "/3/0"))
    deliver(m, dev.in_blocks(first, b"A" * 128, etag=b"v1"), 0.5)
    (second,) = requests(d.take(0.5))
    deliver(m, dev.in_blocks(second, b"B" * 128, etag=b"v2"), 0.6)  # the value changed
    (again,) = requests(d.take(0.6))
    block = get_block(again, BLOCK2)
    assert block is not None and block.num == 0
    deliver(m, dev.in_blocks(again, b"B" * 128, etag=b"v2"), 0.7)
    (last,) = requests(d.take(0.7))
    deliver(m, dev.in_blocks(last, b"B" * 128, etag=b"v2"), 0.8)
    assert [o.payload for o in finished(d.take(0.8))] == [b"B" * 128]


def test_rule_3_4_a_lost_block_request_fails_the_attempt_and_a_retry_starts_from_block_0() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    cmd = command("GET", "/3/0", retry=1, expiry=3600.0)
    first = start(m, d, cmd)
    deliver(m, dev.in_blocks(first, BODY), 0.5)
    d.take(0.5)
    _time_out(m, d)
    assert cmd.attempts_left == 1 and state(m) is AttemptState.IDLE
    deliver(m, dev.ping(), 200.0)
    d.take(200.0)
    (again,) = requests(d.durable(200.0))
    assert get_block(again, BLOCK2) is None  # the first exchange, without Block2
    assert again.token == cmd.token


# -- observations and notifications (RFC 7641, RFC 7959 2.6, rule 9.5) -----------------------------


def _observe(m: DeviceMachine, d: Driver, dev: FakeDevice, uri: str = "/3303/0/5700") -> bytes:
    req = start(m, d, command("GET", uri, observe=True))
    assert req.option(OBSERVE) == b""
    deliver(m, dev.answer(req, payload=b"20", observe=5), 0.5)
    effects = d.take(0.5)
    assert of_type(effects, Notified) == [Notified(uri, finished(effects)[0])]
    assert m.observed_paths() == {uri}
    return req.token


def test_rfc_7641_3_4_a_stale_notification_is_dropped() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    deliver(m, dev.notification(token, 7, b"21"), 1.0)
    deliver(m, dev.notification(token, 6, b"stale"), 2.0)  # reordered: older than 7
    deliver(m, dev.notification(token, 7, b"dup"), 3.0)
    deliver(m, dev.notification(token, 8, b"22"), 4.0)
    values = [n.outcome.payload for n in of_type(d.take(4.0), Notified)]
    assert values == [b"21", b"22"]


def test_rfc_7641_3_4_after_128_seconds_any_notification_is_fresh() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    deliver(m, dev.notification(token, 7, b"21"), 1.0)
    deliver(m, dev.notification(token, 2, b"rebooted"), 130.0)
    assert [n.outcome.payload for n in of_type(d.take(130.0), Notified)] == [b"21", b"rebooted"]


def test_rfc_7641_4_2_an_error_notification_ends_the_observation() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    deliver(m, dev.notification(token, None, b"", code=Code.NOT_FOUND), 1.0)
    (note,) = of_type(d.take(1.0), Notified)
    assert note.outcome.status == 404
    assert m.observed_paths() == set()
    deliver(m, dev.notification(token, 9, b"late"), 2.0)
    effects = d.take(2.0)
    assert not of_type(effects, Notified)
    assert [r.mtype for r in sent(effects)] == [3]  # Reset: the observation is gone


def _fetch_requests(effects: list[Effect]) -> list[Message]:
    return [r for r in requests(effects) if get_block(r, BLOCK2) is not None]


def test_rfc_7959_2_6_a_notification_in_blocks_is_fetched_with_gets_and_notified_whole() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    block0, part = Block(0, more=True, szx=2), BODY[:64]
    deliver(m, dev.notification(token, 9, part, block=block0), 1.0)
    effects = d.take(1.0)
    assert not of_type(effects, Notified)  # never a part
    gets = _fetch_requests(effects)
    assert len(gets) == 1
    get = gets[0]
    assert get.code == Code.GET and get.option(OBSERVE) is None and get.token != token
    assert get_block(get, BLOCK2) == Block(1, more=False, szx=2)
    now = 1.0
    while gets:
        now += 0.1
        deliver(m, dev.in_blocks(gets[0], BODY), now)
        effects = d.take(now)
        gets = _fetch_requests(effects)
    assert [n.outcome.payload for n in of_type(effects, Notified)] == [BODY]
    assert len(of_type(d.log, Notified)) == 2  # the first value and the whole one


def test_rfc_7959_2_6_a_newer_notification_replaces_a_fetch_in_progress() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    deliver(m, dev.notification(token, 9, BODY[:64], block=Block(0, more=True, szx=2)), 1.0)
    (get,) = _fetch_requests(d.take(1.0))
    deliver(m, dev.notification(token, 10, b"small"), 1.5)
    effects = d.take(1.5)
    assert [n.outcome.payload for n in of_type(effects, Notified)] == [b"small"]
    deliver(m, dev.in_blocks(get, BODY), 2.0)  # the old fetch's answer comes late
    effects = d.take(2.0)
    assert not of_type(effects, Notified)
    assert not _fetch_requests(effects)  # and nothing more is asked for it
    m.handle_timer(10.0)
    assert not requests(d.take(10.0))  # the abandoned GET is not retransmitted either


def test_rfc_7959_2_6_fetches_of_notifications_in_blocks_never_pile_up() -> None:
    """At most 8 fetches per device: a ninth abandons the oldest (its GET is not sent
    again, its late answer notifies nothing)."""
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    tokens = []
    for i in range(10):
        req = start(m, d, command("GET", f"/3303/{i}/5700", observe=True, now=float(i)), float(i))
        deliver(m, dev.answer(req, payload=b"v", observe=1), float(i))
        tokens.append(req.token)
    d.take(10.0)
    gets = []
    for n, token in enumerate(tokens):
        deliver(m, dev.notification(token, 5, BODY[:64], block=Block(0, more=True, szx=2)), 11.0)
        gets += _fetch_requests(d.take(11.0))
        assert len(set(m._fetches or ())) <= 8, n
    assert len(gets) == 10
    retransmit = due(m)
    m.handle_timer(retransmit)
    again = {r.token for r in requests(d.take(retransmit))}
    assert again and again <= {g.token for g in gets[2:]}  # the 2 oldest are not sent again
    deliver(m, dev.in_blocks(gets[0], BODY[:128]), 15.0)
    assert not of_type(d.take(15.0), Notified)
    deliver(m, dev.in_blocks(gets[-1], BODY[:128]), 15.5)
    assert [n.uri for n in of_type(d.take(15.5), Notified)] == ["/3303/9/5700"]


def test_rfc_7252_4_2_a_fetch_out_during_a_long_hold_is_neither_burst_nor_lost() -> None:
    """A notification's block fetch is out; a command's write then waits 200 s for the
    store. Its retransmissions do not pile up and leave at once when the store commits
    (`Driver` refuses the same request twice in one batch), it does not time out unsent,
    and the notification is published whole."""
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    deliver(m, dev.notification(token, 9, BODY[:64], block=Block(0, more=True, szx=2)), 1.0)
    (get,) = _fetch_requests(d.take(1.0))
    m.submit(command("PUT", "/3/0/1", b"x", now=1.5), 1.5)
    d.take(1.5)
    assert m.held
    now = 1.5
    while now < 200.0:  # the actor's loop: the timer, or 5 s without one
        timer = m.get_timer()
        now = min(200.0, max(now + 0.1, timer if timer is not None else now + 5.0))
        m.handle_timer(now)
        m.settle(now)
        assert not requests(d.take(now))
    effects = d.durable(200.0)
    assert [r.token for r in requests(effects)].count(get.token) <= 1
    deliver(m, dev.in_blocks(get, BODY[:128]), 200.5)
    assert [n.outcome.payload for n in of_type(d.take(200.5), Notified)] == [BODY[:128]]


def test_an_observation_whose_first_answer_comes_in_blocks_is_notified_whole() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command("GET", "/3/0", observe=True))
    deliver(m, dev.in_blocks(req, BODY[:128], observe=3), 0.5)
    (second,) = requests(d.take(0.5))
    deliver(m, dev.in_blocks(second, BODY[:128]), 0.6)
    effects = d.take(0.6)
    assert [n.outcome.payload for n in of_type(effects, Notified)] == [BODY[:128]]
    assert m.observed_paths() == {"/3/0"}
    deliver(m, dev.notification(req.token, 4, b"next"), 1.0)  # on the first exchange's token
    assert [n.outcome.payload for n in of_type(d.take(1.0), Notified)] == [b"next"]


def test_rfc_7641_3_4_a_notification_during_the_first_answers_blocks_is_not_lost() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command("GET", "/3/0", observe=True))
    deliver(m, dev.in_blocks(req, BODY[:128], observe=3), 0.5)
    (second,) = requests(d.take(0.5))
    deliver(m, dev.notification(req.token, 4, b"newer"), 0.6)
    deliver(m, dev.in_blocks(second, BODY[:128]), 0.7)
    values = [n.outcome.payload for n in of_type(d.take(0.7), Notified)]
    assert values[-1:] == [b"newer"]


def test_cancel_observation_resets_later_notifications() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev)
    m.cancel_observation("/3303/0/5700")
    deliver(m, dev.notification(token, 9, b"x"), 1.0)
    effects = d.take(1.0)
    assert not of_type(effects, Notified)
    assert [r.mtype for r in sent(effects)] == [3]


# -- the value cache (Max-Age) ---------------------------------------------------------------------


def _cache(m: DeviceMachine, d: Driver, dev: FakeDevice, uri: str = "/3/0/1") -> None:
    req = start(m, d, command("GET", uri))
    deliver(m, dev.answer(req, payload=b"cached", max_age=60), 0.5)
    d.take(0.5)


def test_rfc_7252_5_6_a_get_is_answered_from_the_cache_while_its_max_age_lasts() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _cache(m, d, dev)
    cmd = command("GET", "/3/0/1", now=30.0)
    assert m.submit(cmd, 30.0).value == "accepted"
    effects = d.take(30.0)
    assert [(f.command, f.outcome.payload) for f in of_type(effects, Finished)] == [
        (cmd, b"cached")
    ]
    assert not of_type(effects, Send) and not of_type(effects, Hold)
    assert state(m) is AttemptState.IDLE and len(m.queue) == 0
    later = command("GET", "/3/0/1", now=61.0)
    m.submit(later, 61.0)  # Max-Age passed: asked again
    assert not of_type(d.take(61.0), Finished)
    assert len(requests(d.durable(61.0))) == 1


@pytest.mark.parametrize("written", ["/3/0/1", "/3/0", "/3", "/3/0/1/0"])
def test_issue_13_a_successful_write_of_the_path_its_parent_or_child_makes_it_stale(
    written: str,
) -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _cache(m, d, dev)
    put = start(m, d, command("PUT", written, b"new", now=1.0), 1.0)
    deliver(m, dev.answer(put, Code.CHANGED), 1.5)
    d.take(1.5)
    m.submit(command("GET", "/3/0/1", now=2.0), 2.0)
    assert not of_type(d.take(2.0), Finished)
    assert len(requests(d.durable(2.0))) == 1


def test_a_failed_write_or_one_of_another_path_keeps_the_cached_value() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _cache(m, d, dev)
    put = start(m, d, command("PUT", "/3/0/1", b"new", now=1.0), 1.0)
    deliver(m, dev.answer(put, Code.METHOD_NOT_ALLOWED), 1.5)
    other = start(m, d, command("PUT", "/3/0/13", b"t", now=2.0), 2.0)
    deliver(m, dev.answer(other, Code.CHANGED), 2.5)
    d.take(2.5)
    m.submit(command("GET", "/3/0/1", now=3.0), 3.0)
    assert [o.payload for o in finished(d.take(3.0))] == [b"cached"]


def test_a_get_with_accept_is_never_answered_from_the_cache_nor_cached() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _cache(m, d, dev)
    tlv = command("GET", "/3/0/1", accept=11542, now=1.0)
    req = start(m, d, tlv, 1.0)
    deliver(m, dev.answer(req, payload=b"tlv", max_age=60), 1.5)
    assert [o.payload for o in finished(d.take(1.5))] == [b"tlv"]
    m.submit(command("GET", "/3/0/1", now=2.0), 2.0)
    assert [o.payload for o in finished(d.take(2.0))] == [b"cached"]  # not the TLV one


def test_rule_2_1_a_get_behind_a_queued_command_is_not_answered_from_the_cache() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _cache(m, d, dev)
    start(m, d, command("POST", "/3/0/4", now=1.0), 1.0)  # in flight
    m.submit(command("GET", "/3/0/1", now=2.0), 2.0)
    assert not finished(d.take(2.0))


def test_a_notification_refreshes_the_cache() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    token = _observe(m, d, dev, "/3/0/1")
    deliver(m, dev.notification(token, 9, b"fresh", max_age=60), 1.0)
    d.take(1.0)
    m.submit(command("GET", "/3/0/1", now=2.0), 2.0)
    assert [o.payload for o in finished(d.take(2.0))] == [b"fresh"]


# -- TCP (RFC 8323) ------------------------------------------------------------------------------


def test_rfc_8323_over_tcp_no_message_ids_are_drawn_or_reserved() -> None:
    conn = object()
    m = make_machine(addr=None, conn=conn)
    d = Driver(m)
    dev = FakeDevice(tcp=True)
    cmd = command()
    m.submit(cmd, 0.0)
    effects = d.take()
    assert not of_type(effects, ReserveMids)
    assert cmd.mid is None and cmd.token is not None
    assert of_type(effects, Hold)  # the token is written before it leaves
    sends = of_type(d.durable(0.0), Send)
    assert [(s.addr, s.conn) for s in sends] == [(None, conn)]
    req = decode_send(sends[0])
    deliver(m, dev.answer(req, payload=b"v"), 1.0)
    assert [o.payload for o in finished(d.take(1.0))] == [b"v"]


def test_rule_3_2_over_tcp_a_request_is_written_once_and_fails_after_max_transmit_wait() -> None:
    m = make_machine(addr=None, conn=object())
    d = Driver(m)
    start(m, d, command(retry=0))
    timer = due(m)
    assert timer == pytest.approx(PARAMS.max_transmit_wait)
    m.handle_timer(timer)
    effects = d.take(timer)
    assert not requests(effects)
    assert finished(effects) == [outcomes.TIMED_OUT]


def test_rfc_8323_notifications_over_tcp_are_never_dropped_as_stale() -> None:
    m = make_machine(addr=None, conn=object())
    d = Driver(m)
    dev = FakeDevice(tcp=True)
    req = start(m, d, command("GET", "/3303/0/5700", observe=True))
    deliver(m, dev.answer(req, payload=b"1", observe=9), 0.5)
    deliver(m, dev.notification(req.token, 3, b"2"), 1.0)  # ordered by the stream
    assert [n.outcome.payload for n in of_type(d.take(1.0), Notified)] == [b"1", b"2"]


def test_rule_3_4_binding_from_udp_to_tcp_loses_the_attempt_and_the_observations() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    _observe(m, d, dev)
    cmd = command("PUT", "/3/0/1", b"x", retry=1)
    udp_req = start(m, d, cmd, 1.0)
    conn = object()
    m.bind(None, conn, 2.0)
    effects = d.take(2.0)
    assert ObserveAgain() in effects
    assert m.observed_paths() == set()
    assert cmd.attempts_left == 1 and m.queue.queue == [cmd]  # failed: one retry used
    assert m.link is Link.TCP and m.coap.reliable
    assert m.get_timer() is None  # the UDP request is not retransmitted on the new endpoint
    deliver(m, dev.answer(udp_req, Code.CHANGED), 2.5)  # (its answer cannot reach us now)
    m.settle(200.0)
    deliver(m, FakeDevice(tcp=True).request(), 200.0)  # a contact on the connection
    d.take(200.0)
    sends = of_type(d.durable(200.0), Send)
    assert [s.conn for s in sends] == [conn]


def test_rule_3_4_a_tcp_connection_that_closes_fails_what_was_sent_on_it() -> None:
    m = make_machine(addr=None, conn=object())
    d = Driver(m)
    cmd = command(retry=1)
    start(m, d, cmd)
    m.lose_connection()
    m.connection_closed(1.0)
    d.take(1.0)
    assert cmd.attempts_left == 1 and m.queue.queue == [cmd]
    assert m.link is Link.NONE and not m.has_transport()
    m.settle(500.0)  # nothing can be sent until it connects again
    assert not d.take(500.0)


def test_rule_3_4_a_tcp_device_without_a_connection_is_sent_nothing() -> None:
    m = make_machine(addr=None, conn=object())
    d = Driver(m)
    m.lose_connection()
    m.connection_closed(0.0)
    cmd = command()
    m.submit(cmd, 1.0)
    effects = d.take(1.0)
    assert of_type(effects, StoreCommand) and not of_type(effects, Send)
    assert cmd.attempts == 0 and cmd.attempts_left == 3
    conn = object()
    m.bind(None, conn, 2.0)
    deliver(m, FakeDevice(tcp=True).request(), 2.0)
    d.take(2.0)
    assert [s.conn for s in of_type(d.durable(2.0), Send)] == [conn]


def test_a_new_udp_address_keeps_the_attempt_and_the_retransmissions_follow_it() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    req = start(m, d, command())
    m.bind(ADDR2, None, 1.0)  # NAT rebinding
    timer = m.get_timer()
    assert timer is not None
    m.handle_timer(timer)
    sends = of_type(d.take(timer), Send)
    assert [(s.addr, decode_send(s).mid) for s in sends] == [(ADDR2, req.mid)]
    deliver(m, dev.answer(req, payload=b"v"), timer + 0.1)
    assert [o.payload for o in finished(d.take(timer + 0.1))] == [b"v"]


# -- the end of a registration (rules 8.2, 8.3) ----------------------------------------------------


@pytest.mark.parametrize("held", [False, True])
def test_rules_8_2_and_8_3_end_finishes_every_command_with_429(held: bool) -> None:
    m = make_machine()
    d = Driver(m)
    cmds = [command("PUT", "/3/0/1", b"%d" % i) for i in range(4)]
    for cmd in cmds:
        m.submit(cmd, 0.0)
    d.take()
    if not held:
        d.durable(0.0)
    m.end(1.0)
    effects = d.take(1.0)
    assert [(f.command, f.outcome) for f in of_type(effects, Finished)] == [
        (c, outcomes.REMOVED) for c in cmds
    ]
    assert outcomes.REMOVED.status == 429
    assert not requests(effects)
    assert state(m) is AttemptState.IDLE and m.link is Link.ENDED
    d.durable(2.0)
    m.settle(10.0)
    assert not requests(d.take(10.0))


def test_rules_8_2_and_8_3_nothing_is_retransmitted_after_the_registration_ended() -> None:
    m = make_machine()
    d = Driver(m)
    start(m, d, command("PUT", "/3/0/1", b"x"))
    m.end(1.0)
    d.take(1.0)
    assert m.get_timer() is None
    m.handle_timer(10.0)
    assert not requests(d.take(10.0))


def test_rules_8_2_a_block_wise_answer_in_progress_ends_with_the_registration() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    cmd = command("GET", "/3/0")
    first = start(m, d, cmd)
    deliver(m, dev.in_blocks(first, BODY), 0.5)
    (second,) = requests(d.take(0.5))
    m.end(1.0)
    assert finished(d.take(1.0)) == [outcomes.REMOVED]
    deliver(m, dev.in_blocks(second, BODY), 1.5)
    effects = d.take(1.5)
    assert not finished(effects) and not requests(effects)


def test_the_driver_catches_a_request_sent_during_a_hold() -> None:
    """The harness itself: its contract check fires."""
    m = make_machine()
    d = Driver(m)
    m.submit(command(), 0.0)
    d.take()
    m._held = False  # a machine that forgets its hold
    m.durable(0.0)
    d.held = True
    with pytest.raises(ContractBroken, match="during a hold"):
        d.take()


def test_rules_8_2_and_8_3_a_command_submitted_after_the_end_is_never_sent_nor_lost() -> None:
    m = make_machine()
    d = Driver(m)
    m.end(0.0)
    d.take()
    cmd = command(now=1.0)
    verdict = m.submit(cmd, 1.0)
    effects = d.take(1.0) + d.durable(1.0)
    assert not requests(effects)
    if verdict.value == "accepted":
        assert [(f.command, f.outcome) for f in of_type(effects, Finished)] == [
            (cmd, outcomes.REMOVED)
        ]
