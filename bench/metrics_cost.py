"""What the observability of issue 16 costs, in process (`taskset -c 1` recommended):

- per finished command: the outcome count and the latency histogram's `observe`;
- per HTTP request: the two context variables set (route, log fields) and the response count;
- per scrape: `GET /metrics`'s text for N registered devices (the collector walks them once
  for `dm_actor_devices_registered`), on stand-ins for the server's parts.

    taskset -c 1 python bench/metrics_cost.py --devices 1000 100000

Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import time
import timeit
from types import SimpleNamespace
from typing import Any

import trio

from dm_actor.api.metrics import ROUTE, Observability, _Collector
from dm_actor.histogram import LATENCY_BOUNDS, Histogram
from dm_actor.logformat import LOG_CONTEXT, RequestLog


def per_call(stmt: Any, number: int = 200_000) -> float:
    """Nanoseconds per call of `stmt` (best of 5)."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e9


class _Events:
    """The event stream's part the collector reads."""

    dropped = 0

    def __len__(self) -> int:
        return 0


def stand_in(devices: int) -> Any:
    """An object with what the collector reads of an `HttpServer`, `devices` registered."""
    by_endpoint = {
        f"dev-{i}": SimpleNamespace(
            reg=SimpleNamespace(transports="U", queue_mode=i % 3 == 0), addr=("10.0.0.1", i)
        )
        for i in range(devices)
    }
    registry = SimpleNamespace(
        outcomes={(200, None): 10, (504, "TIMEOUT"): 1},
        delivery_latency=Histogram(LATENCY_BOUNDS),
        awaiting=0,
    )
    sup = SimpleNamespace(
        by_endpoint=by_endpoint,
        credentials={},
        registry=registry,
        statistics={"registrations": devices},
        store=SimpleNamespace(backlog=lambda: 0, healthy=lambda: True),
        events=_Events(),
        store_behind=lambda: False,
    )
    kinds = ("bad_requests", "connections_shed", "head_timeouts", "body_timeouts",
             "send_timeouts", "refused_per_address", "server_errors", "accept_errors",
             "websockets_too_slow")  # fmt: skip
    stats = SimpleNamespace(served=1, connections=1, **dict.fromkeys(kinds, 0))
    return SimpleNamespace(
        api=SimpleNamespace(sup=sup),
        hub=SimpleNamespace(channels={}, unrouted=0, tap=None),
        stopping=False,
        reserve_refused=0,
        statistics=lambda: stats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1000, 100_000])
    args = parser.parse_args()
    h = Histogram(LATENCY_BOUNDS)
    outcomes: dict[tuple[int, str | None], int] = {}
    key = (200, None)

    def finished() -> None:
        outcomes[key] = outcomes.get(key, 0) + 1
        h.observe(0.0042)

    print(f"per finished command (outcome + histogram): {per_call(finished):.0f} ns")
    obs = Observability(stand_in(0))
    target = b"/v2/device-requests/dev-1?async-id=a1"

    def request() -> None:
        ROUTE.set("-")
        LOG_CONTEXT.set(None)
        LOG_CONTEXT.set(RequestLog(target, "0123456789abcdef0000000000000001"))
        ROUTE.set("/v2/device-requests/{device-id}")
        obs.count(202)

    print(f"per HTTP request (context variables + response count): {per_call(request):.0f} ns")
    for n in args.devices:
        obs = Observability(stand_in(n))
        list(_Collector(obs).collect())  # warm
        t0 = time.perf_counter()
        text = trio.run(obs.scrape)
        took = time.perf_counter() - t0
        print(f"scrape, {n} devices: {took * 1000:.1f} ms ({len(text)} bytes)")


if __name__ == "__main__":
    main()
