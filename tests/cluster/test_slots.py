"""Slots and the slot-carrying ids of cluster mode (`dm_actor.cluster.slots`)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, strategies as st

from dm_actor.cluster import slots


@given(st.text(max_size=64), st.integers(min_value=1, max_value=slots.MAX_SLOTS))
def test_a_slot_is_within_the_count(endpoint: str, count: int) -> None:
    assert 0 <= slots.slot_of(endpoint, count) < count
    assert 0 <= slots.home_slot(endpoint, count) < count


def test_slots_are_stable_across_processes() -> None:
    """Not Python's `hash` (salted per process): every node computes the same slot."""
    names = ["urn:imei:490154203237518", "dev-1", "ünïcode", "\udcff-lone-surrogate"]
    code = (
        f"from dm_actor.cluster.slots import slot_of;print([slot_of(n, 1024) for n in {names!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([slots.slot_of(n, 1024) for n in names])


def test_slots_spread_evenly() -> None:
    counts = [0] * 64
    for i in range(64_000):
        counts[slots.slot_of(f"device-{i}", 64)] += 1
    assert min(counts) > 850 and max(counts) < 1150  # (1000 each, binomial spread ~31)


@given(st.integers(min_value=0, max_value=slots.MAX_SLOTS - 1))
def test_a_registration_id_names_its_slot(slot: int) -> None:
    reg_id = slots.reg_id(slot)
    assert len(reg_id) == slots.REG_ID_LENGTH
    assert slots.slot_of_reg_id(reg_id, slots.MAX_SLOTS) == slot
    assert slots.slot_of_reg_id(reg_id, slot) is None  # (beyond a smaller count: no slot)
    assert reg_id != slots.reg_id(slot)  # unguessable: random beyond the slot


@given(st.text(max_size=40))
def test_any_other_registration_id_names_no_slot_or_a_valid_one(text: str) -> None:
    slot = slots.slot_of_reg_id(text, 1024)
    assert slot is None or (0 <= slot < 1024 and len(text) == slots.REG_ID_LENGTH)


@given(st.integers(min_value=0, max_value=slots.MAX_SLOTS - 1), st.binary(min_size=4, max_size=4))
def test_a_token_names_its_slot(slot: int, rest: bytes) -> None:
    token = slots.token_prefix(slot) + rest
    assert len(token) == slots.TOKEN_LENGTH
    assert slots.slot_of_token(token, slots.MAX_SLOTS) == slot


@given(st.binary(max_size=8))
def test_tokens_of_other_lengths_name_no_slot(token: bytes) -> None:
    if len(token) != slots.TOKEN_LENGTH:
        assert slots.slot_of_token(token, 1024) is None
