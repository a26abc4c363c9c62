"""`AnswerMemory`: rule 1.7 for finished commands (pure, wall-clock floats).

Unit tests, and a Hypothesis state machine that drives submissions, finishing commands,
hand-overs and clock jumps against a model of the rule: a repeat within the window is 202
(WAITING while its AsyncIDResponse waits in the channel, REPLAY once it was handed over);
another device or request is 409; after the window, or once the bound pushed it out, it
is a new command. The bound only ever forgets: it never turns a new command into a repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dm_actor.delivery.answers import ENTRY_OVERHEAD, Answer, AnswerMemory, Repeat, request_key

T0 = 1_700_000_000.0
R1 = request_key("PUT", "/3/0/14", b"+02", None, None)
R2 = request_key("PUT", "/3/0/14", b"+03", None, None)


def answer(seq: int, *, at: float = T0, window: float = 7200.0, endpoint: str = "dev",
           request: bytes = R1, item: bytes = b'{"id":"a","status":200}') -> Answer:  # fmt: skip
    return Answer(endpoint=endpoint, request=request, seq=seq, item=item, finished_at=at,
                  forget_at=at + window)  # fmt: skip


def test_request_key_is_what_was_asked() -> None:
    assert request_key("PUT", "/3/0/14", b"+02", 0, None) == request_key(
        "PUT", "/3/0/14", b"+02", 0, None
    )
    variants = {
        request_key("PUT", "/3/0/14", b"+02", 0, None),
        request_key("POST", "/3/0/14", b"+02", 0, None),
        request_key("PUT", "/3/0/15", b"+02", 0, None),
        request_key("PUT", "/3/0/14", b"+03", 0, None),
        request_key("PUT", "/3/0/14", b"+02", None, None),
        request_key("PUT", "/3/0/14", b"+02", 0, 11542),
        request_key("PUT", "/3/0/14?pmin=1", b"+02", 0, None),
    }
    assert len(variants) == 7


def test_a_repeat_waits_then_replays_then_is_forgotten_after_its_window() -> None:
    memory = AnswerMemory(limit=10, byte_limit=1 << 20)
    assert memory.check("app", "a", "dev", R1, T0) is Repeat.NEW
    assert memory.remember("app", "a", answer(1, window=60), T0) == []
    assert memory.check("app", "a", "dev", R1, T0 + 1) is Repeat.WAITING
    assert memory.check("app", "a", "dev", R2, T0 + 1) is Repeat.IN_USE
    assert memory.check("app", "a", "other", R1, T0 + 1) is Repeat.IN_USE
    assert memory.check("app-2", "a", "other", R2, T0 + 1) is Repeat.NEW  # per application
    memory.handed_over("app", [1])
    assert memory.check("app", "a", "dev", R1, T0 + 2) is Repeat.REPLAY
    assert memory.replayed("app", "a").seq == 1
    assert memory.check("app", "a", "dev", R1, T0 + 3) is Repeat.WAITING
    memory.handed_over("app", [1])
    assert memory.check("app", "a", "dev", R1, T0 + 59) is Repeat.REPLAY
    assert memory.check("app", "a", "dev", R1, T0 + 60) is Repeat.NEW
    assert len(memory) == 0


def test_the_bound_forgets_the_oldest_by_count_and_by_bytes() -> None:
    memory = AnswerMemory(limit=2, byte_limit=1 << 20)
    memory.remember("app", "a", answer(1), T0)
    memory.remember("app", "b", answer(2), T0)
    memory.remember("other", "a", answer(3), T0)  # another application's count
    assert memory.remember("app", "c", answer(4), T0) == ["a"]
    assert [memory.get("app", i, T0) is not None for i in "abc"] == [False, True, True]
    big = b"x" * 1000
    cost = ENTRY_OVERHEAD + 1 + len(big)
    memory = AnswerMemory(limit=100, byte_limit=2 * cost)
    memory.remember("app", "a", answer(1, item=big), T0)
    memory.remember("app", "b", answer(2, item=big), T0)
    assert memory.remember("app", "c", answer(3, item=big), T0) == ["a"]
    # one answer larger than the byte bound is still kept (the newest always is)
    huge = AnswerMemory(limit=100, byte_limit=10)
    assert huge.remember("app", "a", answer(1, item=big), T0) == []
    assert huge.get("app", "a", T0) is not None


def test_a_remembered_id_finished_again_replaces_its_answer() -> None:
    """After the window the id's repeat was a new command; its new answer replaces the old
    (a hand-over of the old event's seq does not mark the new one)."""
    memory = AnswerMemory(limit=10, byte_limit=1 << 20)
    memory.remember("app", "a", answer(1, window=60), T0)
    memory.remember("app", "a", answer(2, at=T0 + 100), T0 + 100)
    memory.handed_over("app", [1])
    assert memory.check("app", "a", "dev", R1, T0 + 101) is Repeat.WAITING
    memory.handed_over("app", [2])
    assert memory.check("app", "a", "dev", R1, T0 + 101) is Repeat.REPLAY
    assert len(memory) == 1


def test_no_memory_at_all() -> None:
    memory = AnswerMemory(limit=0, byte_limit=1 << 20)
    assert memory.remember("app", "a", answer(1), T0) == []
    assert memory.check("app", "a", "dev", R1, T0) is Repeat.NEW


def test_forget_expired_walks_from_the_oldest() -> None:
    memory = AnswerMemory(limit=10, byte_limit=1 << 20)
    memory.remember("app", "a", answer(1, window=60), T0)
    memory.remember("app", "b", answer(2, window=7200), T0)
    memory.remember("app", "c", answer(3, window=60), T0)
    memory.remember("other", "a", answer(4, window=60), T0)
    assert memory.forget_expired(T0 + 60) == {"app": ["a"], "other": ["a"]}
    assert len(memory) == 2  # c waits behind b (a lookup forgets it at once)
    assert memory.get("app", "c", T0 + 60) is None
    assert memory.forget_expired(T0 + 7200) == {"app": ["b"]}
    assert len(memory) == 0


# -- the rule as a state machine ------------------------------------------------------------

OWNERS = ("app-a", "app-b")
IDS = ("r1", "r2", "r3")
ENDPOINTS = ("dev-1", "dev-2")
REQUESTS = (R1, R2)


@dataclass
class _Known:
    endpoint: str
    request: bytes
    seq: int
    forget_at: float
    waiting: bool
    order: int  # when it finished (for the bound)


class AnswersWorld(RuleBasedStateMachine):
    """The model keeps every finished command's answer; the memory may forget one early
    only when the bound made it (`limit` entries per owner)."""

    LIMIT = 1000

    def __init__(self) -> None:
        super().__init__()
        self.memory = AnswerMemory(limit=self.LIMIT, byte_limit=1 << 30)
        self.now = T0
        self.seq = 0
        self.model: dict[tuple[str, str], _Known] = {}
        self.evicted: set[tuple[str, str]] = set()  # forgotten by the bound (reported)

    def _alive(self, key: tuple[str, str]) -> _Known | None:
        known = self.model.get(key)
        if known is None or self.now >= known.forget_at or key in self.evicted:
            return None
        return known

    @rule(
        owner=st.sampled_from(OWNERS),
        async_id=st.sampled_from(IDS),
        endpoint=st.sampled_from(ENDPOINTS),
        request=st.sampled_from(REQUESTS),
    )
    def submit(self, owner: str, async_id: str, endpoint: str, request: bytes) -> None:
        verdict = self.memory.check(owner, async_id, endpoint, request, self.now)
        known = self._alive((owner, async_id))
        if known is None:
            expected = Repeat.NEW
        elif known.endpoint != endpoint or known.request != request:
            expected = Repeat.IN_USE
        else:
            expected = Repeat.WAITING if known.waiting else Repeat.REPLAY
        assert verdict is expected, (verdict, expected, known)
        if verdict is Repeat.REPLAY:
            assert self.memory.replayed(owner, async_id).seq == known.seq  # type: ignore[union-attr]
            known.waiting = True  # type: ignore[union-attr]

    @rule(
        owner=st.sampled_from(OWNERS),
        async_id=st.sampled_from(IDS),
        endpoint=st.sampled_from(ENDPOINTS),
        request=st.sampled_from(REQUESTS),
        window=st.sampled_from([60.0, 600.0, 7200.0]),
    )
    def finish(
        self, owner: str, async_id: str, endpoint: str, request: bytes, window: float
    ) -> None:
        """A command finishes: only one that is not remembered (a remembered id never
        reaches a queue: its repeat is answered, anything else is 409)."""
        key = (owner, async_id)
        if self._alive(key) is not None:
            return
        self.seq += 1
        forgotten = self.memory.remember(
            owner, async_id, answer(self.seq, at=self.now, window=window, endpoint=endpoint,
                                    request=request), self.now,
        )  # fmt: skip
        self.evicted.discard(key)
        self.model[key] = _Known(endpoint, request, self.seq, self.now + window, True, self.seq)
        for gone in forgotten:  # its window ended, or the bound pushed it out
            assert gone != async_id
            if self.now < self.model[owner, gone].forget_at:
                self.evicted.add((owner, gone))

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def hand_over(self, owner: str, data: st.DataObject) -> None:
        waiting = [(k, v) for k, v in self.model.items() if k[0] == owner and v.waiting]
        if not waiting:
            return
        chosen = data.draw(st.lists(st.sampled_from(waiting), unique_by=lambda kv: kv[0]))
        self.memory.handed_over(owner, [v.seq for _, v in chosen])
        for _, known in chosen:
            known.waiting = False

    @rule(seconds=st.sampled_from([1.0, 59.0, 61.0, 599.0, 3600.0, 7201.0]))
    def clock_jump(self, seconds: float) -> None:
        self.now += seconds

    @precondition(lambda self: self.now > T0)
    @rule()
    def sweep(self) -> None:
        for owner, ids in self.memory.forget_expired(self.now).items():
            for async_id in ids:
                known = self.model[owner, async_id]
                assert self.now >= known.forget_at

    @invariant()
    def bounded_and_accounted(self) -> None:
        memory = self.memory
        for owner, per in memory._by_owner.items():
            assert len(per) <= max(self.LIMIT, 1)
            assert memory._bytes[owner] == sum(
                ENTRY_OVERHEAD + len(i) + len(a.item) for i, a in per.items()
            )
        for (owner, seq), async_id in memory._waiting.items():
            remembered = memory._by_owner[owner][async_id]
            assert remembered.seq == seq and remembered.waiting

    @invariant()
    def only_the_bound_forgets_early(self) -> None:
        if len(IDS) <= self.LIMIT:
            assert not self.evicted


class SmallAnswersWorld(AnswersWorld):
    LIMIT = 2


_short = settings(max_examples=100, stateful_step_count=40)
TestAnswers = AnswersWorld.TestCase
TestAnswers.settings = _short
TestAnswersBounded = SmallAnswersWorld.TestCase
TestAnswersBounded.settings = _short
