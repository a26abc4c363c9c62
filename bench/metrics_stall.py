"""How long `GET /metrics` holds the event loop at N registered devices: one scrape, and
`--concurrent` scrapes that arrive together (as several Prometheus servers' may).

A ticker task yields in a loop and records the longest gap between its turns: the longest
time any other task (a datagram's, a request's) would have waited for the loop. Stand-ins
for the server's parts (bench/metrics_cost.py), in process:

    taskset -c 1 python bench/metrics_stall.py --devices 100000 --concurrent 8
"""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

import trio
import trio.lowlevel
from metrics_cost import stand_in

from dm_actor.api.metrics import Observability


async def _answer(obs: Observability) -> bytes:
    answer: Any = obs.answer(b"GET", "/metrics", None)
    if inspect.isawaitable(answer):  # (before the scrape became async it was not)
        answer = await answer
    return bytes(answer[2])


async def measure(devices: int, concurrent: int) -> tuple[float, float]:
    """(the longest loop hold, the time until every scrape is answered), seconds."""
    obs = Observability(stand_in(devices), public=True)
    await _answer(obs)  # warm
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await trio.lowlevel.checkpoint()
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        t0 = time.perf_counter()
        async with trio.open_nursery() as scrapes:
            for _ in range(concurrent):
                scrapes.start_soon(_answer, obs)
        took = time.perf_counter() - t0
        done = True
    return longest, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100_000])
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    for n in args.devices:
        for k in sorted({1, args.concurrent}):
            longest, took = trio.run(measure, n, k)
            print(f"{n} devices, {k} scrape(s) together: loop held at most "
                  f"{longest * 1000:.1f} ms, all answered in {took * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
