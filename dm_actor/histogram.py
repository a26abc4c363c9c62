"""A fixed-bucket histogram cheap enough to record on a hot path (one bisect, two adds).

Pure: no I/O, no clock; the metrics endpoint (`dm_actor.api.metrics`) reads it at scrape
time and exposes it in Prometheus's form (cumulative buckets, `le` inclusive).
"""

from __future__ import annotations

from bisect import bisect_left

#: delivery latency (202 to AsyncIDResponse), seconds: a reachable device answers in
#: milliseconds, a retransmitted one in seconds, a queue-mode one at its next wake-up
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  300.0, 3600.0)  # fmt: skip
#: a store commit (one transaction with its fsync), seconds
COMMIT_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
#: the event loop's lag (how late a sleep wakes), seconds
LAG_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    """Counts of observations per bucket (`bounds` ascending; one more bucket for the rest)
    and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus's buckets: (`le`, observations at or below it), `+Inf` last."""
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out
