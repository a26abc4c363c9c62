"""The fresh-value cache of one device: answers to GETs while their Max-Age lasts.

Only what a request without Accept got is kept (and served only to such requests: a TLV
answer is not a text one); a successful write, execute or delete of a path makes the values
of the path, its parents and its children stale. At most `LIMIT` paths per device, the
oldest written first out. Times are the caller's `now`; this module reads no clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dm_actor.delivery.outcomes import Outcome

LIMIT = 8


def _related(a: str, b: str) -> bool:
    """Whether one of two paths contains the other (`/3/0` and `/3/0/1`)."""
    return a.startswith(b + "/") or b.startswith(a + "/")


class ValueCache:
    """Fresh values by path (a dict made on first use: most devices never have one)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Outcome]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uri: str, now: float) -> Outcome | None:
        """A fresh value for a GET of `uri` (Max-Age not passed), else None."""
        entries = self._entries
        hit = entries.get(uri)
        if hit is None:
            return None
        if hit[0] <= now:
            del entries[uri]
            return None
        return hit[1]

    def remember(self, uri: str, outcome: Outcome, now: float) -> None:
        """Keep a 2.05's value for its Max-Age (nothing for Max-Age 0 or an error)."""
        if not outcome.max_age or outcome.status != 200:
            return
        entries = self._entries
        entries.pop(uri, None)
        entries[uri] = (now + outcome.max_age, outcome)
        if len(entries) > LIMIT:
            del entries[next(iter(entries))]

    def forget(self, uri: str) -> None:
        """A write, execute or delete of `uri` succeeded: it, its parents and its children
        are stale (issue 13: a GET after a PUT returned the old value)."""
        entries = self._entries
        for key in [k for k in entries if k == uri or _related(k, uri)]:
            del entries[key]
