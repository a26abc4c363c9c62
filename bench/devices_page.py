"""What one page of `GET /v3/devices` costs the server, at 100k and 1M devices (issue 14 item 2).

In process, no sockets: the real `Api._devices` handler (query parsing, filters, the page walk,
`total_count`, the JSON body) over a directory of N registered devices (light stand-ins for
the actors: the handler reads `endpoint` and the registration's fields only) and N/10
de-registered ones (`Directory` records). Each case is one request; its result is the best of
`--rounds` timings of a batch of calls (enough calls to last `--batch` seconds, at most 1000),
per call. Bounded: the largest case is a few seconds in all.

    taskset -c 1 python bench/devices_page.py [--sizes 100000 1000000] [--rounds 5]

Also the longest the event loop is held in one stretch while one such request is answered (a
ticker task notes the gaps between its turns): a scan yields every `devices.CHUNK` records.
Times are CPU time of this process (`time.process_time`): on a shared machine, wall time
also counts the moments other processes had the core.

Prints one JSON line, then a table (microseconds per call, and the longest stall in ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from types import SimpleNamespace
from typing import Any

import trio
from sortedcontainers import SortedList

from dm_actor.actors.directory import Directory
from dm_actor.api.routes import Api, Request

PAGE = "limit=50"


class _Reg:
    __slots__ = ("binding", "endpoint", "endpoint_type", "lifetime", "lwm2m_version",
                 "queue_mode", "registered_at", "updated_at")  # fmt: skip

    def __init__(self, endpoint: str, t: float) -> None:
        self.endpoint = endpoint
        self.endpoint_type = None
        self.registered_at = t
        self.updated_at = t
        self.lwm2m_version = "1.1"
        self.binding = "U"
        self.queue_mode = False
        self.lifetime = 86400


class _Actor:
    __slots__ = ("endpoint", "reg")

    def __init__(self, reg: _Reg) -> None:
        self.endpoint = reg.endpoint
        self.reg = reg


def build(n: int) -> Api:
    """An Api over n registered devices (dev-000000..., registered one a second) and n/10
    de-registered ones (gone-...)."""
    by_endpoint: dict[str, Any] = {}
    for i in range(n):
        reg = _Reg(f"dev-{i:07d}", float(i))
        by_endpoint[reg.endpoint] = _Actor(reg)
    directory = Directory(1e12, n)
    for i in range(n // 10):
        directory.retain(_Reg(f"gone-{i:07d}", float(i)), float(n + i))  # type: ignore[arg-type]
    sup = SimpleNamespace(
        by_endpoint=by_endpoint,
        endpoint_names=SortedList(by_endpoint),
        registry=SimpleNamespace(directory=directory),
        wall_offset=1.7e9,
        now=lambda: float(n),
    )
    return Api(sup, None, webhooks=object())  # type: ignore[arg-type]


def cases(n: int) -> dict[str, str]:
    mid = f"dev-{n // 2:07d}"
    half = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1.7e9 + n // 2))
    ids = ",".join(f"dev-{i:07d}" for i in range(0, n, n // 50))
    return {
        "page": PAGE,
        "page after=": f"{PAGE}&after={mid}",
        "page DESC after=": f"{PAGE}&order=DESC&after={mid}",
        "state=registered": f"{PAGE}&filter=state%3Dregistered",
        "state__eq=deregistered": f"{PAGE}&state__eq=deregistered",
        "state__neq=registered after=": f"{PAGE}&state__neq=registered&after=gone-0001000",
        "created_at__gte (half)": f"{PAGE}&created_at__gte={half}",
        "created_at__gte after=": f"{PAGE}&created_at__gte={half}&after={mid}",
        "endpoint_type__eq (none)": f"{PAGE}&endpoint_type__eq=sensor",
        "id__in (50 ids)": f"{PAGE}&id__in={ids}",
    }


def _query(q: str) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(q))


async def timed(api: Api, query: str, rounds: int, batch: float) -> tuple[float, int]:
    req = Request(b"GET", ["v3", "devices"], _query(query), b"", "app")
    status, _, body = await api._devices(req)
    assert status == 200, body[:200]
    start = time.process_time()
    await api._devices(req)
    once = time.process_time() - start
    calls = max(1, min(1000, int(batch / max(once, 1e-7))))
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            await api._devices(req)
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6, len(json.loads(body)["data"])


async def longest_stall(api: Api, query: str) -> float:
    """The longest the handler keeps the event loop in one call (ms): a ticker task notes
    the gaps between its turns while one request is answered."""
    req = Request(b"GET", ["v3", "devices"], _query(query), b"", "app")
    gaps = [0.0]
    done = False

    async def ticker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last = time.process_time()
        task_status.started()
        while True:  # (its last gap ends after the answer: a handler that never yields)
            await trio.lowlevel.checkpoint()
            now = time.process_time()
            gaps.append(now - last)
            last = now
            if done:
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        await api._devices(req)
        done = True
    return max(gaps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=float, default=0.05)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    stalls: dict[str, dict[str, float]] = {}

    async def measure() -> None:
        for n in args.sizes:
            api = build(n)
            gc.collect()
            gc.freeze()  # (as the server does: no full collections over the devices)
            for name, query in cases(n).items():
                us, _ = await timed(api, query, args.rounds, args.batch)
                results.setdefault(name, {})[str(n)] = round(us, 1)
                stall = await longest_stall(api, query)
                stalls.setdefault(name, {})[str(n)] = round(stall, 2)
            del api
            gc.unfreeze()
            gc.collect()

    trio.run(measure)
    print(json.dumps({"python": platform.python_version(), "us_per_call": results,
                      "longest_stall_ms": stalls}))  # fmt: skip
    width = max(map(len, results))
    head = "  ".join(f"{n:>10}" for n in args.sizes)
    print(f"{'us per call':<{width}}  {head}   longest stall (ms)", file=sys.stderr)
    for name, row in results.items():
        cells = "  ".join(f"{row[str(n)]:>10.1f}" for n in args.sizes)
        stall = "  ".join(f"{stalls[name][str(n)]:>8.2f}" for n in args.sizes)
        print(f"{name:<{width}}  {cells}   {stall}", file=sys.stderr)


if __name__ == "__main__":
    main()
