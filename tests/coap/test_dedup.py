"""The per-peer deduplication cache: lifetimes, cached replies, the size bound."""

from __future__ import annotations

import pytest

from dm_actor.coap.dedup import BUSY, DedupCache


def test_new_then_duplicate_then_answered() -> None:
    cache = DedupCache(8)
    assert cache.seen(5, 0.0, 100.0) is None
    assert cache.seen(5, 1.0, 100.0) == (100.0, None)
    cache.answer(5, b"reply")
    assert cache.reply(5) == b"reply"
    assert cache.seen(5, 99.9, 100.0) == (100.0, b"reply")


def test_expired_entry_is_new_again() -> None:
    cache = DedupCache(8)
    cache.seen(5, 0.0, 100.0)
    cache.answer(5, b"reply")
    assert cache.seen(5, 100.0, 100.0) is None
    assert cache.reply(5) is None
    assert cache.seen(5, 150.0, 100.0) is not None  # remembered from t=100 on


def test_expired_entries_are_dropped_on_receive() -> None:
    cache = DedupCache(8)
    for mid in range(4):
        cache.seen(mid, float(mid), 10.0)
    cache.seen(100, 12.5, 10.0)  # mids 0, 1 and 2 expired (at 10, 11, 12)
    assert len(cache) == 2


def test_bound_evicts_oldest_answered() -> None:
    cache = DedupCache(3)
    for mid in range(4):
        cache.seen(mid, 0.0, 100.0)
        cache.answer(mid, b"")
    assert len(cache) == 3
    assert cache.seen(1, 0.0, 100.0) is not None
    assert cache.seen(0, 0.0, 100.0) is None  # evicted, so new


def test_answer_for_forgotten_mid_is_ignored() -> None:
    cache = DedupCache(1)
    cache.seen(1, 0.0, 100.0)
    cache.answer(1, b"first")
    cache.seen(2, 0.0, 100.0)
    cache.answer(1, b"late")
    assert cache.reply(1) is None
    assert len(cache) == 1


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        DedupCache(0)


def test_an_entry_in_process_is_never_evicted() -> None:
    """Hostile-input issue, item 1: a request whose answer waits (for the store, say) must not
    be forgotten by later traffic, or its retransmission is processed and answered twice."""
    cache = DedupCache(3)
    cache.seen(7, 0.0, 100.0)  # in process: its answer waits
    for mid in range(20):
        assert cache.seen(mid + 100, 1.0, 100.0) is None
        cache.answer(mid + 100, b"answered")
    assert cache.seen(7, 2.0, 100.0) == (100.0, None)  # still known: dropped, not processed
    assert len(cache) == 3


def test_a_full_cache_of_requests_in_process_refuses_new_ones() -> None:
    cache = DedupCache(2)
    cache.seen(1, 0.0, 100.0)
    cache.seen(2, 0.0, 100.0)
    assert cache.seen(3, 0.0, 100.0) is BUSY  # not taken: the peer retransmits
    assert len(cache) == 2
    cache.answer(1, b"")
    assert cache.seen(3, 0.0, 100.0) is None  # the answered entry made room
    assert cache.seen(1, 0.0, 100.0) is BUSY  # ... by going first; now both are in process
