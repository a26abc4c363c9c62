"""Durable writes per second and commit latency: the PostgreSQL store against the SQLite store.

N tasks (1, 100, 1000 by default) each loop on what a 202 costs the store: `put_command` of a
new command, then `await durable()`, for `--seconds`. Per case: commands made durable per
second, commands per commit, the mean time of one durable write with one writer (a commit's
round trip: for SQLite the WAL fsync, for PostgreSQL the statements, the WAL flush and the
socket), and CPU per 1000 commands, this process's and (PostgreSQL) the server's
(`/proc/<pid>/stat` of the postmaster's children). Cases run in interleaved rounds; each keeps
its best round. Then, once: how long opening and `load()` take for `--records` registrations
and as many queued commands.

The PostgreSQL server is the tests' (tests/store/postgres.py: a temporary cluster run as the
`postgres` user on a Unix socket, fsync on, synchronous_commit on), started and removed here;
pinned with the bench when the bench is (`taskset` is inherited). SQLite writes in `--dir`
(default: a temporary directory), WAL with synchronous=FULL. Both with commit_interval 0.

    taskset -c 1 python bench/store_postgres.py [--rounds N] [--seconds S] [--writers 1,100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dm_actor.store.base import CommandRecord, RegistrationRecord
from dm_actor.store.postgres import PostgresStore
from dm_actor.store.sqlite import SqliteStore
from tests.store.postgres import PostgresServer

_ids = itertools.count()
_TICK = os.sysconf("SC_CLK_TCK")


def command(endpoint: str) -> CommandRecord:
    return CommandRecord(endpoint, f"{next(_ids):032x}", "PUT", "/3/0/14", b"+02:00", 0, None,
                         1.7e9, 1.7e9 + 7200, 3, 0, None, False, "app-1")  # fmt: skip


def registration(endpoint: str) -> RegistrationRecord:
    return RegistrationRecord(endpoint, endpoint[-8:], 86400, "1.1", "UQ", True,
                              "</1/0>,</3/0>,</5/0>,</3303/0>", 1.7e9, 1.7e9)  # fmt: skip


def server_cpu(server: PostgresServer | None) -> float:
    """CPU seconds of the PostgreSQL server's processes so far (0 without one)."""
    if server is None:
        return 0.0
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == postmaster or int(fields[1]) == postmaster:  # (fields[1]: the ppid)
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _writers(store: SqliteStore, writers: int, seconds: float) -> tuple[int, float]:
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
        await nursery.start(store.run)
        async with trio.open_nursery() as workers:
            for i in range(writers):
                workers.start_soon(writer, i)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return done, elapsed


class Engines:
    def __init__(self, directory: Path, server: PostgresServer) -> None:
        self.directory, self.server = directory, server

    def open(self, kind: str, name: str, **options: object) -> SqliteStore:
        if kind == "postgres":
            return PostgresStore(self.server.dsn(name), **options)  # type: ignore[arg-type]
        return SqliteStore(self.directory / f"{name}.sqlite3", **options)  # type: ignore[arg-type]

    def fresh(self, kind: str) -> str:
        if kind == "postgres":
            return self.server.create_database()
        return f"bench-{next(_ids)}"

    def drop(self, kind: str, name: str) -> None:
        if kind == "postgres":
            self.server.drop_database(name)
        else:
            for suffix in ("", "-wal", "-shm", ".lock", ".reserve"):
                Path(f"{self.directory / name}.sqlite3{suffix}").unlink(missing_ok=True)


def one_case(engines: Engines, kind: str, writers: int, seconds: float) -> dict[str, float]:
    name = engines.fresh(kind)
    store = engines.open(kind, name)
    server = engines.server if kind == "postgres" else None
    try:
        cpu0, srv0 = own_cpu(), server_cpu(server)
        done, elapsed = trio.run(_writers, store, writers, seconds)
        cpu, srv = own_cpu() - cpu0, server_cpu(server) - srv0
    finally:
        store.close()
        engines.drop(kind, name)
    return {
        "rate": done / elapsed,
        "per_commit": done / max(1, store.transactions),
        "latency_ms": 1000 * elapsed / max(1, done) * writers,
        "cpu_ms_per_1k": 1e6 * cpu / max(1, done),
        "server_cpu_ms_per_1k": 1e6 * srv / max(1, done),
    }


def load_time(engines: Engines, kind: str, records: int) -> dict[str, float]:
    name = engines.fresh(kind)
    store = engines.open(kind, name, max_batch=records * 2 + 1)

    async def fill() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for i in range(records):
                store.put_registration(registration(f"device-{i:07}"))
                store.put_command(command(f"device-{i:07}"))
            await store.durable()
            nursery.cancel_scope.cancel()

    try:
        started = time.perf_counter()
        trio.run(fill)
        filled = time.perf_counter()
        store.close()
        store = engines.open(kind, name)
        opened = time.perf_counter()
        snapshot = store.load()
        loaded = time.perf_counter()
        store.close()
        assert len(snapshot.commands) == records
    finally:
        engines.drop(kind, name)
    return {"fill_s": filled - started, "open_s": opened - filled, "load_s": loaded - opened}


def run(args: argparse.Namespace, engines: Engines) -> dict[str, object]:
    writer_counts = [int(n) for n in args.writers.split(",")]
    names = [(kind, n) for n in writer_counts for kind in ("sqlite", "postgres")]
    best: dict[tuple[str, int], dict[str, float]] = {}
    for r in range(args.rounds):
        for kind, n in names[r % len(names) :] + names[: r % len(names)]:
            result = one_case(engines, kind, n, args.seconds)
            if (kind, n) not in best or result["rate"] > best[kind, n]["rate"]:
                best[kind, n] = result
    with psycopg.connect(engines.server.dsn()) as pg:
        version = pg.execute("SHOW server_version").fetchone()
    out: dict[str, object] = {
        "bench": "store_postgres",
        "python": platform.python_version(),
        "postgres": version[0] if version else "?",
        "psycopg": psycopg.__version__,
        "cpus": sorted(os.sched_getaffinity(0)),
        "rounds": args.rounds,
        "seconds": args.seconds,
    }
    for (kind, n), result in sorted(best.items()):
        out |= {f"{kind}_{n}_{k}": round(v, 2) for k, v in result.items()}
    if args.records:
        for kind in ("sqlite", "postgres"):
            times = load_time(engines, kind, args.records)
            out |= {f"{kind}_load_{args.records}_{k}": round(v, 3) for k, v in times.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per case (best wins)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per timed case")
    parser.add_argument("--writers", default="1,100,1000", help="concurrent writer counts")
    parser.add_argument("--dir", type=Path, help="where the SQLite files go (default: temp)")
    parser.add_argument("--records", type=int, default=20_000, help="devices for the load time")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.records < 0:
        parser.error("--rounds, --seconds must be positive, --records >= 0")
    server = PostgresServer()
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            result = run(args, Engines(Path(directory), server))
    finally:
        server.remove()
    print(json.dumps(result))
    print(f"{'case':>14} {'commands/s':>11} {'per commit':>11} {'latency ms':>11} "
          f"{'CPU ms/1k':>10} {'server CPU ms/1k':>17}")  # fmt: skip
    for n in args.writers.split(","):
        for kind in ("sqlite", "postgres"):
            k = f"{kind}_{n}_"
            cells = [result[k + f] for f in ("per_commit", "latency_ms", "cpu_ms_per_1k")]
            by_server = result[k + "server_cpu_ms_per_1k"]
            print(f"{kind + ' x' + n:>14} {result[k + 'rate']:>11,.0f} {cells[0]:>11} "
                  f"{cells[1]:>11} {cells[2]:>10} {by_server:>17}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
