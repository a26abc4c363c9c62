"""The pure delivery machine, rule by rule, with explicit times."""

from __future__ import annotations

from dm_actor.coap.events import FailureReason
from dm_actor.delivery.outcomes import EXPIRED, REMOVED, TIMED_OUT, UNREACHABLE, from_response
from dm_actor.delivery.queue import Command, DeliveryPolicy, DeviceQueue, Verdict

POLICY = DeliveryPolicy()
OK = from_response(0x45, b"42", 0, 60)


def cmd(async_id: str, now: float = 0.0, *, expiry: float = 7200, retry: int = 0) -> Command:
    return Command(
        async_id=async_id,
        method="GET",
        uri="/3/0/1",
        payload=b"",
        content_format=None,
        accept=None,
        accepted_at=now,
        expires_at=now + expiry,
        attempts_left=1 + retry,
    )


def test_queue_full_at_21() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    q.awake_until = 0.0
    for i in range(20):
        assert q.submit(cmd(f"a{i}"), 1) is Verdict.ACCEPTED
    assert q.submit(cmd("a20"), 1) is Verdict.QUEUE_IS_FULL
    assert len(q) == 20


def test_in_flight_counts_towards_the_queue_length() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    for i in range(20):
        assert q.submit(cmd(f"a{i}"), 0) is Verdict.ACCEPTED
        if i == 0:
            assert q.next_attempt(0) is not None
    assert q.submit(cmd("x"), 0) is Verdict.QUEUE_IS_FULL


def test_idempotent_async_id() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    assert q.submit(cmd("a"), 0) is Verdict.ACCEPTED
    assert q.submit(cmd("a"), 1) is Verdict.DUPLICATE
    other = cmd("a")
    other.method = "DELETE"
    assert q.submit(other, 1) is Verdict.ASYNC_ID_IN_USE
    sent = q.next_attempt(2)
    assert sent is not None
    q.attempt_succeeded(OK, 3)
    # a finished command is the application's to remember (delivery/answers.py), not the
    # queue's: here the same id is a new command
    assert q.submit(cmd("a"), 10) is Verdict.ACCEPTED
    assert len(q) == 1


def test_one_at_a_time_in_order() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    for name in "abc":
        q.submit(cmd(name), 0)
    first = q.next_attempt(0)
    assert first is not None and first.async_id == "a"
    assert q.next_attempt(0) is None  # rule 2.2
    q.attempt_succeeded(OK, 1)
    second = q.next_attempt(1)
    assert second is not None and second.async_id == "b"


def test_failed_attempt_goes_back_to_head_and_waits_for_contact() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a", retry=1), 0)
    q.submit(cmd("b"), 0)
    assert q.next_attempt(0) is not None
    q.attempt_failed(FailureReason.RESET, 10)
    assert [c.async_id for c in q.queue] == ["a", "b"]
    assert q.next_attempt(11) is None  # unreachable until contact (4.3)
    q.contact(60)
    assert q.next_attempt(60, on_contact=True) is None  # inside the grace period (7.1)
    assert q.find("a") is not None and q.find("a").attempts_left == 1  # type: ignore[union-attr]
    q.contact(120)
    again = q.next_attempt(120, on_contact=True)
    assert again is not None and again.async_id == "a" and again.attempts == 2
    q.attempt_failed(FailureReason.RESET, 121)
    assert q.take_finished() == [(again, UNREACHABLE)]


def test_last_attempt_timing_out_is_504() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a"), 0)
    assert q.next_attempt(0) is not None
    q.attempt_failed(FailureReason.TIMEOUT, 126)
    assert [o for _, o in q.take_finished()] == [TIMED_OUT]


def test_queue_mode_sends_only_while_awake() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    assert q.awake(92.9) and not q.awake(93)
    q.submit(cmd("a", 100, retry=2), 100)
    assert q.next_attempt(100) is None
    q.contact(500)
    sent = q.next_attempt(500, on_contact=True)
    assert sent is not None
    q.attempt_failed(FailureReason.UNREACHABLE, 501)
    assert not q.awake(502)  # asleep after a failed attempt (6.3)


def test_expiry_sweep_and_expiry_during_transmission() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a", expiry=60, retry=3), 0)
    q.submit(cmd("b", expiry=60), 0)
    sent = q.next_attempt(0)
    assert sent is not None
    q.sweep(61)  # b expires; a is in flight and is left alone (3.6)
    assert q.take_finished() == [(q.find("b"), EXPIRED)]
    q.attempt_failed(FailureReason.TIMEOUT, 126)
    assert q.take_finished() == [(sent, EXPIRED)]


def test_check_before_attempt_finishes_an_expired_head() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    q.submit(cmd("a", expiry=60), 0)
    q.submit(cmd("b", expiry=600), 0)
    q.contact(100)
    sent = q.next_attempt(100, on_contact=True)
    assert sent is not None and sent.async_id == "b"
    assert [(c.async_id, o) for c, o in q.take_finished()] == [("a", EXPIRED)]


def test_remove_all() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a"), 0)
    q.submit(cmd("b"), 0)
    q.next_attempt(0)
    q.remove_all(1)
    assert [(c.async_id, o) for c, o in q.take_finished()] == [("a", REMOVED), ("b", REMOVED)]
    assert len(q) == 0


def test_recent_memory_is_bounded() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    for i in range(100):
        q.submit(cmd(f"a{i}"), i)
        q.next_attempt(i)
        q.attempt_succeeded(OK, i)
    assert q._recent is not None and len(q._recent) == POLICY.recent_limit


def test_an_attempt_that_never_left_keeps_its_retry() -> None:
    """Rule 3.4: the transport went away before the attempt could be sent: no retry is used
    and there is no resend grace to wait for; the device is unreachable until a contact."""
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a", retry=0), 0)
    a = q.next_attempt(1)
    assert a is not None and (a.attempts, a.attempts_left) == (1, 1)
    q.attempt_not_sent()
    assert q.in_flight is None and q.take_finished() == []
    assert (a.attempts, a.attempts_left, a.last_attempt_at) == (0, 1, None)
    assert not q.reachable and q.next_attempt(2) is None
    q.contact(3)
    assert q.next_attempt(3, on_contact=True) is a  # at once: never attempted before


def test_an_attempt_that_never_left_does_not_restart_the_resend_grace() -> None:
    policy = DeliveryPolicy()
    q = DeviceQueue(policy, queue_mode=False, now=0.0)
    cmd = Command(
        async_id="a",
        method="GET",
        uri="/3/0/1",
        payload=b"",
        content_format=None,
        accept=None,
        accepted_at=0.0,
        expires_at=10_000.0,
        attempts_left=3,
    )
    q.submit(cmd, 0.0)
    assert q.next_attempt(0.0) is cmd
    q.attempt_failed(FailureReason.TIMEOUT, 1.0)  # sent at 0, failed
    q.contact(200.0)
    assert q.next_attempt(200.0, on_contact=True) is cmd  # grace passed: resend decided
    q.attempt_not_sent()  # ... but it never left
    q.contact(210.0)
    assert q.next_attempt(210.0, on_contact=True) is cmd  # the grace counts from 0
