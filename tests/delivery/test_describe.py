"""`DeviceQueue.describe(now)`: the read model of the device-queue view, in float time.

Each test states what `next_attempt` would do, and checks that `describe` says the same.
"""

from __future__ import annotations

import dataclasses

import pytest

from dm_actor.coap.events import FailureReason
from dm_actor.delivery.outcomes import from_response
from dm_actor.delivery.queue import Command, CommandStatus, DeliveryPolicy, DeviceQueue

POLICY = DeliveryPolicy()  # awake_time 93, resend_grace 120
OK = from_response(0x45, b"42", 0, 60)


def cmd(async_id: str, now: float = 0.0, *, retry: int = 0) -> Command:
    return Command(
        async_id=async_id,
        method="GET",
        uri="/3/0/1",
        payload=b"",
        content_format=None,
        accept=None,
        accepted_at=now,
        expires_at=now + 7200,
        attempts_left=1 + retry,
    )


def waiting(q: DeviceQueue, now: float) -> list[tuple[str, str]]:
    return [(s.async_id, s.waiting_for) for s in q.describe(now)]


def test_an_empty_queue_describes_nothing() -> None:
    assert DeviceQueue(POLICY, queue_mode=False, now=0).describe(0) == []


def test_the_head_of_an_awake_device_waits_for_delivery_the_rest_for_earlier_commands() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    q.submit(cmd("a"), 1)
    q.submit(cmd("b"), 1)
    assert waiting(q, 2) == [("a", "delivery"), ("b", "earlier-commands")]
    assert q.next_attempt(2) is not None  # what "delivery" announced


def test_the_command_in_flight_comes_first_and_waits_for_the_response() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a", retry=2), 0)
    q.submit(cmd("b"), 0)
    q.next_attempt(5)
    [first, second] = q.describe(6)
    assert first == CommandStatus(
        async_id="a",
        method="GET",
        uri="/3/0/1",
        subscription=False,
        in_flight=True,
        attempts=1,
        attempts_left=3,
        accepted_at=0.0,
        expires_at=7200.0,
        last_attempt_at=5.0,
        next_attempt_not_before=None,
        waiting_for="response",
    )
    assert (second.in_flight, second.waiting_for) == (False, "earlier-commands")


def test_a_queue_mode_device_asleep_is_waited_for_to_wake_up() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    q.submit(cmd("a"), 0)
    assert waiting(q, 93) == [("a", "device-wake-up")]  # rule 6.4: awake_time is over
    assert q.next_attempt(93) is None


def test_a_failed_attempt_waits_for_a_contact_after_the_resend_grace() -> None:
    """Rule 7.1: the head attempted before is resent on a contact, once `resend_grace` has
    passed since that attempt started; the end of the grace is the next try's earliest time."""
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a", retry=1), 0)
    q.next_attempt(10)
    q.attempt_failed(FailureReason.TIMEOUT, 20)
    q.contact(21)  # reachable again, but the grace is not over
    [status] = q.describe(21)
    assert (status.waiting_for, status.next_attempt_not_before) == ("device-contact", 130.0)
    assert (status.attempts, status.attempts_left, status.last_attempt_at) == (1, 1, 10.0)
    assert q.next_attempt(21, on_contact=True) is None
    assert q.next_attempt(130, on_contact=True) is not None


def test_a_queue_mode_device_s_failed_attempt_waits_for_a_wake_up() -> None:
    q = DeviceQueue(POLICY, queue_mode=True, now=0)
    q.submit(cmd("a", retry=1), 0)
    q.next_attempt(0)
    q.attempt_failed(FailureReason.RESET, 1)
    [status] = q.describe(2)
    assert (status.waiting_for, status.next_attempt_not_before) == ("device-wake-up", 120.0)


def test_an_unreachable_non_queue_device_is_waited_for_to_make_contact() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.disconnected()  # e.g. its TCP connection closed
    q.submit(cmd("a"), 0)
    assert waiting(q, 1) == [("a", "device-contact")]


def test_a_subscription_is_described_as_one() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    observe = cmd("o")
    observe.observe = True
    q.submit(observe, 0)
    assert [s.subscription for s in q.describe(0)] == [True]


def test_finished_commands_are_not_described() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a"), 0)
    q.next_attempt(0)
    q.attempt_succeeded(OK, 1)
    assert q.describe(1) == []


def test_the_status_is_a_frozen_keyword_only_snapshot() -> None:
    q = DeviceQueue(POLICY, queue_mode=False, now=0)
    q.submit(cmd("a"), 0)
    [status] = q.describe(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.attempts = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        CommandStatus("a")  # type: ignore[call-arg]
    q.next_attempt(0)
    assert status.attempts == 0  # taken before the attempt: unchanged by it
