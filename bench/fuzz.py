"""The long run of the server-level mutation fuzzer (`tests/adversarial/fuzzer.py`).

Hostile datagrams and TCP messages, seeded from the real clients' bytes in `tests/vectors/`,
into a real `Supervisor` with its device actors, through its transport callbacks, in virtual
time; episodes of `--episode` inputs, each on a fresh supervisor and ended by a healthy device
that must register and have a command answered. Reports the inputs run, the crashes (an
exception that escaped, a bug the crash boundary had to contain, or a broken invariant) with
a minimised reproducer for each distinct one, and the process's RSS before and after.

    taskset -c 1 timeout 1800 python bench/fuzz.py --datagrams 1000000
    python bench/fuzz.py --datagrams 200000 --seed 7 --findings /tmp/findings.md

Prints one JSON line, then the reproducers (if any).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.adversarial.fuzzer import Crash, Fuzzer, Totals  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    return round(int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE / 2**20, 1)


async def run(args: argparse.Namespace) -> dict[str, object]:
    fuzzer = Fuzzer(seed=args.seed, episode=args.episode)
    # warm-up: imports, caches and the allocator's first arenas are not what we measure
    await fuzzer.run(min(args.episode, 5000))
    fuzzer.totals = Totals()
    gc.collect()
    rss_before = rss_mib()
    cpu0, wall0 = time.process_time(), time.monotonic()
    totals = await fuzzer.run(args.datagrams, stop_after_crashes=args.max_crashes)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    gc.collect()
    rss_after = rss_mib()
    distinct: dict[str, Crash] = {}
    for crash in totals.crashes:
        distinct.setdefault(crash.signature, crash)
    minimized = [await fuzzer.minimize(c, budget=args.minimize_budget) for c in distinct.values()]
    result: dict[str, object] = {
        "benchmark": "fuzz",
        "seed": args.seed,
        "inputs": totals.inputs,
        "udp_datagrams": totals.datagrams,
        "tcp_messages": totals.tcp_messages,
        "episodes": totals.episodes,
        "healthy_checks": totals.healthy_checks,
        "crashes": len(totals.crashes),
        "crash_signatures": totals.signatures(),
        "decode_errors": totals.decode_errors,
        "device_errors": totals.device_errors,
        "registrations": totals.registrations,
        "commands_submitted": totals.submits,
        "inputs_per_s": round(totals.inputs / wall, 1) if wall else None,
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
        "rss_mib_before": rss_before,
        "rss_mib_after": rss_after,
    }
    print(json.dumps(result), flush=True)
    for crash in minimized:
        print(f"\n== {crash.signature}\n{crash.reproducer()}\n{crash.traceback}")
    if args.findings is not None and minimized:
        with args.findings.open("a") as out:
            for crash in minimized:
                out.write(f"\n## {crash.signature}\n\n```\n{crash.reproducer()}\n"
                          f"{crash.traceback}```\n")  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=1_000_000,
                        help="inputs to run (UDP datagrams and TCP messages)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0x10)
    parser.add_argument("--episode", type=int, default=5000,
                        help="inputs per episode (a fresh supervisor each)")  # fmt: skip
    parser.add_argument("--max-crashes", type=int, default=100, help="stop after this many")
    parser.add_argument("--minimize-budget", type=int, default=300,
                        help="replays to minimise each distinct crash")  # fmt: skip
    parser.add_argument("--findings", type=Path, help="append the reproducers to this file")
    args = parser.parse_args()
    trio.run(run, args, clock=trio.testing.MockClock(autojump_threshold=0))


if __name__ == "__main__":
    main()
