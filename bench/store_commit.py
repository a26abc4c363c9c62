"""Durable writes per second: the SQLite store's group commit against the memory store.

N tasks (1, 100, 1000 by default) each loop on what a 202 costs the store: `put_command` of a
new command, then `await durable()`, for `--seconds`; the rate is commands made durable per
second. The SQLite store writes a fresh file in `--dir` (default: a temporary directory; put
it on the disk the data directory will use) with WAL and synchronous=FULL, so every commit
fsyncs. Cases run in interleaved rounds, in an order rotated per round; each keeps its best
round. Then, once: how long opening (with `PRAGMA quick_check`) and `load()` take for a store
of `--records` registrations and as many queued commands. Prints one JSON line, then a table.

    python bench/store_commit.py [--rounds N] [--seconds S] [--writers 1,100,1000] [--dir PATH]
    taskset -c 1 python bench/store_commit.py      # pinned to one core
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import trio

from dm_actor.store.base import CommandRecord, RegistrationRecord, Store
from dm_actor.store.memory import MemoryStore
from dm_actor.store.sqlite import SqliteStore

_ids = itertools.count()


def command(endpoint: str) -> CommandRecord:
    return CommandRecord(endpoint, f"{next(_ids):032x}", "PUT", "/3/0/14", b"+02:00", 0, None,
                         1.7e9, 1.7e9 + 7200, 3, 0, None, False, "app-1")  # fmt: skip


def registration(endpoint: str) -> RegistrationRecord:
    return RegistrationRecord(endpoint, endpoint[-8:], 86400, "1.1", "UQ", True,
                              "</1/0>,</3/0>,</5/0>,</3303/0>", 1.7e9, 1.7e9)  # fmt: skip


async def _writers(store: Store, writers: int, seconds: float) -> tuple[int, float]:
    """Commands made durable and the seconds it took."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def writer(i: int) -> None:
        nonlocal done
        endpoint = f"device-{i:06}"
        while time.perf_counter() < deadline:
            store.put_command(command(endpoint))
            await store.durable()
            done += 1

    async with trio.open_nursery() as nursery:
        if isinstance(store, SqliteStore):
            await nursery.start(store.run)
        async with trio.open_nursery() as workers:
            for i in range(writers):
                workers.start_soon(writer, i)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return done, elapsed


def one_case(kind: str, writers: int, seconds: float, directory: Path) -> dict[str, float]:
    if kind == "memory":
        done, elapsed = trio.run(_writers, MemoryStore(), writers, seconds)
        return {"rate": done / elapsed}
    path = directory / f"bench-{writers}.sqlite3"
    store = SqliteStore(path)
    try:
        done, elapsed = trio.run(_writers, store, writers, seconds)
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"rate": done / elapsed, "per_commit": done / max(1, store.transactions)}


def load_time(records: int, directory: Path) -> dict[str, float]:
    """Seconds to open (quick_check included) and load a store of `records` devices."""
    path = directory / "bench-load.sqlite3"
    store = SqliteStore(path, max_batch=records * 2 + 1)

    async def fill() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for i in range(records):
                store.put_registration(registration(f"device-{i:07}"))
                store.put_command(command(f"device-{i:07}"))
            await store.durable()
            nursery.cancel_scope.cancel()

    trio.run(fill)
    store.close()
    start = time.perf_counter()
    store = SqliteStore(path)
    opened = time.perf_counter()
    snapshot = store.load()
    loaded = time.perf_counter()
    store.close()
    assert len(snapshot.commands) == records
    size = path.stat().st_size
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"open_s": opened - start, "load_s": loaded - opened, "file_mb": size / 2**20}


def run(rounds: int, seconds: float, writer_counts: list[int], directory: Path, records: int
        ) -> dict[str, object]:  # fmt: skip
    names = [(kind, n) for n in writer_counts for kind in ("memory", "sqlite")]
    best: dict[tuple[str, int], dict[str, float]] = {}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            result = one_case(*name, seconds, directory)
            if name not in best or result["rate"] > best[name]["rate"]:
                best[name] = result
    out: dict[str, object] = {
        "bench": "store",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": sorted(os.sched_getaffinity(0)),
        "rounds": rounds,
        "seconds": seconds,
    }
    for n in writer_counts:
        memory, sqlite = best["memory", n], best["sqlite", n]
        out[f"memory_{n}_per_s"] = round(memory["rate"])
        out[f"sqlite_{n}_per_s"] = round(sqlite["rate"])
        out[f"sqlite_{n}_per_commit"] = round(sqlite["per_commit"], 1)
        out[f"ratio_{n}"] = round(sqlite["rate"] / memory["rate"], 3)
    if records:
        out |= {
            f"load_{records}_{k}": round(v, 3) for k, v in load_time(records, directory).items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (best wins)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per timed case")
    parser.add_argument("--writers", default="1,100,1000", help="concurrent writer counts")
    parser.add_argument("--dir", type=Path, help="where the store files go (default: a temp dir)")
    parser.add_argument("--records", type=int, default=100_000, help="devices for the load time")
    args = parser.parse_args(argv)
    writer_counts = [int(n) for n in args.writers.split(",")]
    if args.rounds < 1 or args.seconds <= 0 or min(writer_counts) < 1 or args.records < 0:
        parser.error("--rounds, --seconds, --writers must be positive, --records >= 0")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        result = run(args.rounds, args.seconds, writer_counts, Path(directory), args.records)
    print(json.dumps(result))
    print(f"{'writers':>8} {'memory/s':>12} {'sqlite/s':>12} {'ratio':>7} {'per commit':>11}")
    for n in writer_counts:
        print(f"{n:>8} {result[f'memory_{n}_per_s']:>12,} {result[f'sqlite_{n}_per_s']:>12,} "
              f"{result[f'ratio_{n}']:>7.3f} {result[f'sqlite_{n}_per_commit']:>11}")  # fmt: skip
    if args.records:
        r = args.records
        times = [result[f"load_{r}_{k}"] for k in ("open_s", "load_s", "file_mb")]
        print(f"{r:,} registrations + {r:,} commands: open+check {times[0]} s, "
              f"load {times[1]} s, file {times[2]} MB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
