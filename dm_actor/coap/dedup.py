"""Message deduplication for one peer (RFC 7252 4.5): recently seen Message IDs and our replies.

The owner is per peer, so the Message ID alone is the key. Each entry lives until its own
expiry time (EXCHANGE_LIFETIME for CON, NON_LIFETIME for NON, chosen by the caller); entries are
dropped lazily when messages arrive, and the oldest *answered* entry goes first when the cache
is full. An entry not yet answered is a request still being processed (its answer may wait for
the store): forgetting it would let a retransmission be processed a second time and answered
twice, so it is never evicted. When every entry is in process a new message is not taken (the
peer retransmits it later: CoAP's own back-off). This module never reads a clock (time comes
in as `now`) and never sends anything: it only remembers.
"""

from __future__ import annotations

#: (expiry time, the reply we sent for that message or None while unanswered)
Entry = tuple[float, bytes | None]

#: What `seen` returns for a new message when every entry is still in process: treat it as a
#: duplicate not yet answered (drop it; the peer retransmits).
BUSY: Entry = (0.0, None)


class DedupCache:
    """A bounded, insertion-ordered map from Message ID to `Entry`."""

    __slots__ = ("_entries", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("dedup limit must be at least 1")
        self._entries: dict[int, Entry] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, mid: int, now: float, lifetime: float) -> Entry | None:
        """Look up a received message; remember it if it is new.

        Args:
            mid: the received Message ID.
            now: the current time.
            lifetime: how long a new entry is remembered.

        Returns:
            The live entry if `mid` is a duplicate (its reply, if any, should be sent again),
            `BUSY` if `mid` is new but `limit` messages are still unanswered (drop it), else
            None after recording `mid` as unanswered.
        """
        entries = self._entries
        while entries:
            oldest = next(iter(entries))
            if entries[oldest][0] > now:
                break
            del entries[oldest]
        entry = entries.get(mid)
        if entry is not None:
            if entry[0] > now:
                return entry
            del entries[mid]
        if len(entries) >= self.limit:
            answered = next((m for m, e in entries.items() if e[1] is not None), None)
            if answered is None:
                return BUSY
            del entries[answered]
        entries[mid] = (now + lifetime, None)
        return None

    def reply(self, mid: int) -> bytes | None:
        """The reply remembered for `mid`, or None (unanswered, expired or evicted)."""
        entry = self._entries.get(mid)
        return None if entry is None else entry[1]

    def answer(self, mid: int, reply: bytes) -> None:
        """Remember the reply sent for `mid`, if `mid` is still remembered (b"": handled, with
        nothing to send again, e.g. a NON message)."""
        entry = self._entries.get(mid)
        if entry is not None:
            self._entries[mid] = (entry[0], reply)
