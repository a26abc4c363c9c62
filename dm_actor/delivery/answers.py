"""What an application's finished async-ids stand for: rule 1.7 once the command finished.

An async-id is unique per application, across its devices. While its command is unfinished,
its device's `DeviceQueue` knows it; once it finished, its AsyncIDResponse is remembered here
for the command's window (`expiry-seconds` from the end), so that a repeat of the same request
is answered with the same AsyncIDResponse (same body, same `seq`, hence the same `uid`) and
never executed again, and a different request, or another device, with the id gets 409.

Bounded: per application at most `limit` answers and `byte_limit` bytes of them (the oldest
finished go first), and none past its window. Pure: no I/O, no clock; `now` is wall-clock
time (the answers outlive a restart in the store).
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from collections.abc import Iterable

#: what one remembered answer costs besides its body (the object, its keys, the indexes)
ENTRY_OVERHEAD = 256

_pack = msgspec.msgpack.encode


def request_key(
    method: str, uri: str, payload: bytes, content_format: int | None, accept: int | None
) -> bytes:
    """What makes two submissions "the same request" (rule 1.7), as a 16-byte digest:
    the method, the normalised `uri` (query included), the payload, its content format and
    the Accept. Not `retry` or `expiry-seconds`: they are how, not what."""
    return hashlib.blake2b(
        _pack((method, uri, payload, content_format, accept)), digest_size=16
    ).digest()


class Repeat(enum.Enum):
    """What a submission with a remembered async-id is (`AnswerMemory.check`)."""

    NEW = "new"  # not remembered (never, or no longer): the device's queue decides
    IN_USE = "in_use"  # another device or another request: 409 ASYNC_ID_IN_USE
    WAITING = "waiting"  # a repeat, its AsyncIDResponse not handed over yet: 202, no more
    REPLAY = "replay"  # a repeat after its AsyncIDResponse was handed over: 202 and it again


@dataclass(slots=True, kw_only=True)
class Answer:
    """One finished command's AsyncIDResponse as remembered for repeats."""

    endpoint: str
    request: bytes  # `request_key` of the command
    seq: int  # the durable event's number (its `uid`)
    item: bytes  # the AsyncIDResponse, JSON
    finished_at: float  # wall clock
    forget_at: float  # wall clock: the end of its window
    waiting: bool = True  # its AsyncIDResponse waits in the channel (not handed over)


class AnswerMemory:
    """The remembered answers of every application, by owner and async-id."""

    __slots__ = ("_by_owner", "_bytes", "_waiting", "byte_limit", "limit")

    def __init__(self, *, limit: int, byte_limit: int) -> None:
        self.limit = limit
        self.byte_limit = byte_limit
        self._by_owner: dict[str, dict[str, Answer]] = {}  # in the order they finished
        self._bytes: dict[str, int] = {}
        self._waiting: dict[tuple[str, int], str] = {}  # (owner, seq) -> async-id

    def __len__(self) -> int:
        return sum(map(len, self._by_owner.values()))

    def get(self, owner: str, async_id: str, now: float) -> Answer | None:
        """The answer remembered for `owner`'s `async_id`, if its window has not ended."""
        per = self._by_owner.get(owner)
        answer = None if per is None else per.get(async_id)
        if answer is not None and now >= answer.forget_at:
            self._drop(owner, async_id)
            return None
        return answer

    def check(self, owner: str, async_id: str, endpoint: str, request: bytes, now: float) -> Repeat:
        """What a submission of `request` to `endpoint` with this id is (rule 1.7)."""
        answer = self.get(owner, async_id, now)
        if answer is None:
            return Repeat.NEW
        if answer.endpoint != endpoint or answer.request != request:
            return Repeat.IN_USE
        return Repeat.WAITING if answer.waiting else Repeat.REPLAY

    def remember(self, owner: str, async_id: str, answer: Answer, now: float) -> list[str]:
        """Keep `answer` (its AsyncIDResponse is waiting to be handed over, or not:
        `answer.waiting`). Returns the async-ids forgotten to stay within the bounds (the
        caller forgets them in the store too); those whose window ended go on the way."""
        self._drop(owner, async_id)
        if self.limit <= 0:
            return []
        per = self._by_owner.setdefault(owner, {})
        per[async_id] = answer
        size = self._bytes.get(owner, 0) + _cost(async_id, answer)
        self._bytes[owner] = size
        if answer.waiting:
            self._waiting[owner, answer.seq] = async_id
        forgotten: list[str] = []
        while True:  # the oldest first; stop at the first one that stays
            oldest = next(iter(per))
            if oldest == async_id:
                break
            if not (
                len(per) > self.limit
                or self._bytes[owner] > self.byte_limit
                or now >= per[oldest].forget_at
            ):
                break
            self._drop(owner, oldest)
            forgotten.append(oldest)
        return forgotten

    def replayed(self, owner: str, async_id: str) -> Answer:
        """A repeat sends the answer again: it waits for a hand-over once more."""
        answer = self._by_owner[owner][async_id]
        answer.waiting = True
        self._waiting[owner, answer.seq] = async_id
        return answer

    def handed_over(self, owner: str, seqs: Iterable[int]) -> None:
        """`owner`'s channel handed over (or dropped) the events `seqs`: a repeat of one of
        these answers now gets it again."""
        waiting = self._waiting
        if not waiting:
            return
        per = self._by_owner.get(owner)
        for seq in seqs:
            async_id = waiting.pop((owner, seq), None)
            if async_id is not None and per is not None:
                answer = per.get(async_id)
                if answer is not None and answer.seq == seq:
                    answer.waiting = False

    def waiting_again(self, owner: str, seqs: Iterable[int]) -> set[int]:
        """Those of `seqs` whose AsyncIDResponse waits for a hand-over: after `handed_over`,
        only one sent again by a repeat (`replayed`)."""
        waiting = self._waiting
        return {seq for seq in seqs if (owner, seq) in waiting} if waiting else set()

    def forget_expired(self, now: float) -> dict[str, list[str]]:
        """Forget, per owner, the oldest answers whose window ended, up to the first that
        stays (cheap enough to call every sweep: it visits what it forgets and one more per
        owner; one behind a longer window goes when it reaches the front, is looked up, or
        the bound pushes it out). Returns them by owner."""
        gone: dict[str, list[str]] = {}
        for owner, per in list(self._by_owner.items()):
            while per:
                async_id, answer = next(iter(per.items()))
                if now < answer.forget_at:
                    break
                self._drop(owner, async_id)
                gone.setdefault(owner, []).append(async_id)
        return gone

    def _drop(self, owner: str, async_id: str) -> None:
        per = self._by_owner.get(owner)
        answer = None if per is None else per.pop(async_id, None)
        if answer is None or per is None:
            return
        self._waiting.pop((owner, answer.seq), None)
        self._bytes[owner] -= _cost(async_id, answer)
        if not per:
            del self._by_owner[owner]
            del self._bytes[owner]


def _cost(async_id: str, answer: Answer) -> int:
    return ENTRY_OVERHEAD + len(async_id) + len(answer.item)
