"""Retransmission state: the first timeout and the doubling schedule (RFC 7252 4.2, 4.8)."""

from __future__ import annotations

import random

import pytest

from dm_actor.coap.numbers import TransmissionParameters
from dm_actor.coap.reliability import Exchange, first_timeout


def test_first_timeout_without_random_factor_uses_no_rng() -> None:
    assert first_timeout(TransmissionParameters(), None) == 2.0


def test_first_timeout_with_random_factor_lies_in_range() -> None:
    params = TransmissionParameters(ack_random_factor=1.5)
    rng = random.Random(7)
    draws = [first_timeout(params, rng) for _ in range(200)]
    assert all(2.0 <= d <= 3.0 for d in draws)
    assert max(draws) - min(draws) > 0.5  # really random, not a constant


def test_first_timeout_with_random_factor_needs_rng() -> None:
    with pytest.raises(ValueError, match="random"):
        first_timeout(TransmissionParameters(ack_random_factor=1.5), None)


def test_exchange_doubles_then_gives_up() -> None:
    ex = Exchange(b"t", 1, b"datagram", 0.0, 2.0, 5)
    sends = [0.0]
    while ex.expire(ex.deadline):
        sends.append(ex.deadline - ex.timeout)
    assert sends == [0.0, 2.0, 6.0, 14.0, 30.0, 62.0]
    assert ex.deadline == 126.0


def test_late_timer_counts_the_timeout_from_the_actual_retransmission() -> None:
    ex = Exchange(b"t", 1, b"d", 0.0, 2.0, 5)
    assert ex.expire(3.0)
    assert ex.deadline == 7.0


def test_acknowledge_stops_retransmission_and_waits_max_transmit_wait() -> None:
    params = TransmissionParameters()
    ex = Exchange(b"t", 1, b"d", 10.0, 2.0, 5)
    ex.expire(12.0)
    ex.acknowledge(params)
    assert ex.deadline == 10.0 + params.max_transmit_wait == 136.0
    assert not ex.expire(ex.deadline)
