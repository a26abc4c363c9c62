"""Before/after: the end-to-end benchmarks on two source trees in the same run, interleaved.

Each benchmark runs old, new, old, new, ... (`--repeats` pairs), every run from its own tree:
the tree's own `bench/` scripts, working directory and `PYTHONPATH` set to the tree, the
interpreter of this script (the shared venv). The harness pins the server to core 1 and the
load to core 0; `memory.py` runs entirely on core 1. Before the first run the script checks,
for each tree, that `dm_actor` and `bench._harness` really import from that tree.

Benchmarks (sizes by flag):

- `registration_storm.py --devices N --targets dm_actor --sim-devices 0 --rounds 1`, memory
  store (and `--store sqlite` unless `--no-sqlite`);
- `update_storm.py --devices N --targets dm_actor --rounds 1`;
- `commands.py --rounds 1 --rates 5000 0 --devices D --seconds S` (`--compare-sqlite` unless
  `--no-sqlite`);
- `memory.py`'s `dm_actor` case alone at `--memory-devices` (default 100k), one fresh process
  per measurement (`--child dm_actor N`, what `memory.py` itself spawns), with the supervisor's
  `ADMISSION_WAIT` set to infinity first: `memory.py` feeds Registers in-process faster than
  the admission task drains them, and a full collection mid-batch sheds a batch otherwise
  (docs/benchmarks.md, "Session 3"). Memory only; no effect on the bytes measured.

Prints a markdown table: per metric the median of each side, new/old of the medians, the
new/old ratio of each pair (runs next to each other) and the spread of each side ((max - min)
/ median). On a shared machine read the server's CPU per operation (µs/op), and only a ratio
that stays on one side in every pair.

    python bench/before_after.py                                  # /work/base vs this tree
    python bench/before_after.py --old /work/base --new /work/base  # noise check
    python bench/before_after.py --devices 100000 --repeats 3       # the 100k storms
    python bench/before_after.py --only memory --memory-devices 1000000 --repeats 1  # 1M

The defaults (3 pairs, storms 10k, commands 3 s per rate, memory 100k, both stores) took 333 s
on the 2-core machine; `--devices 100000` makes each storm run ~10x longer. Memory at 1M is
not run by default: ~10x the 100k run (14-17 s there), so about 3 min and ~6 GB peak per run
(an estimate, not measured here).

Stdlib only; every run under a timeout, the whole run stops starting pairs after `--budget`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

HERE = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
Metrics = dict[str, float]

# memory.py's dm_actor case, run as memory.py does it for one case, with the admission wait off
_MEMORY_CHILD = """
import math, pkgutil, importlib, runpy, sys
import dm_actor.actors as actors
patched = []
for info in pkgutil.iter_modules(actors.__path__, "dm_actor.actors."):
    module = importlib.import_module(info.name)
    if hasattr(module, "ADMISSION_WAIT"):
        module.ADMISSION_WAIT = math.inf
        patched.append(info.name)
print("ADMISSION_WAIT = inf in", patched or "no module", file=sys.stderr)
sys.argv = ["bench/memory.py", "--child", "dm_actor", sys.argv[1], "--batch", sys.argv[2]]
runpy.run_path("bench/memory.py", run_name="__main__")
"""


@dataclass
class Bench:
    """One benchmark: its command line for a tree and how to read its output."""

    name: str
    argv: list[str]
    parse: Callable[[str], Metrics]
    pin: str | None = None  # taskset the whole command (memory.py)


@dataclass
class Run:
    bench: str
    side: str
    tree: str
    seconds: float
    loadavg: float
    metrics: Metrics = field(default_factory=dict)
    error: str = ""
    note: str = ""


def _json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _storm(label: str) -> Callable[[str], Metrics]:
    def parse(out: str) -> Metrics:
        (r,) = _json_lines(out)[-1]["results"]
        m = {
            f"{label} server µs/op": r["target_us_per_op"],
            f"{label} rate /s (higher better)": r["rate"],
            f"{label} p99 ms": r["p99_ms"],
        }
        if "rss_bytes_per_device" in r:
            m[f"{label} server RSS B/device"] = r["rss_bytes_per_device"]
        return m

    return parse


def _commands(out: str) -> Metrics:
    m: Metrics = {}
    for r in _json_lines(out)[-1]["results"]:
        offered = r["offered"] if isinstance(r["offered"], str) else f"{r['offered']:.0f}/s"
        label = f"command, {r['store']}, {offered}:"
        m[f"{label} server µs/cmd"] = r["server_us_per_cmd"]
        m[f"{label} answered /s (higher better)"] = r["answered_per_s"]
        m[f"{label} e2e p99 ms"] = r["e2e_p99_ms"]
        if r.get("thread_us_per_cmd"):
            m[f"{label} writer thread µs/cmd"] = r["thread_us_per_cmd"]
    return m


def _memory(n: int) -> Callable[[str], Metrics]:
    def parse(out: str) -> Metrics:
        r = _json_lines(out)[-1]
        return {
            f"memory {n:,}: RSS B/idle device": r["bytes_per_device"],
            f"memory {n:,}: in-process Register/s (higher better)": r["registrations_per_s"],
            f"memory {n:,}: full gc.collect ms": r["gc_full_ms"],
        }

    return parse


def benches(args: argparse.Namespace) -> list[Bench]:
    n = str(args.devices)
    stores = ["memory"] if args.no_sqlite else ["memory", "sqlite"]
    storm = ["--devices", n, "--targets", "dm_actor", "--rounds", "1"]
    out = [
        Bench(
            f"registration_storm[{store}]",
            ["bench/registration_storm.py", *storm, "--sim-devices", "0", "--store", store],
            _storm(f"Register {args.devices:,}, {store}:"),
        )
        for store in stores
    ]
    out.append(
        Bench(
            "update_storm",
            ["bench/update_storm.py", *storm],
            _storm(f"Update {args.devices:,}, memory:"),
        )
    )
    cmd = ["bench/commands.py", "--rounds", "1", "--rates", *map(str, args.rates)]
    cmd += ["--devices", str(args.command_devices), "--seconds", str(args.command_seconds)]
    out.append(Bench("commands", cmd if args.no_sqlite else [*cmd, "--compare-sqlite"], _commands))
    out.append(
        Bench(
            "memory",
            ["-c", _MEMORY_CHILD, str(args.memory_devices), str(args.memory_batch)],
            _memory(args.memory_devices),
            pin="1",
        )
    )
    return [b for b in out if not args.only or any(b.name.startswith(o) for o in args.only)]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def check_tree(tree: Path) -> str:
    """Where `dm_actor` and the bench harness import from, run as the benchmarks run; fails
    unless both are inside `tree`."""
    code = (
        "import dm_actor, bench._harness as h, subprocess, sys; print(dm_actor.__file__); "
        "print(h.ROOT); print(subprocess.run([sys.executable, '-c', 'import dm_actor; "
        "print(dm_actor.__file__)'], cwd=h.ROOT, env={**__import__('os').environ, "
        "'PYTHONPATH': str(h.ROOT)}, capture_output=True, text=True).stdout.strip())"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True, check=True
    )
    package, root, server = done.stdout.split()
    for where in (package, root, server):
        if not Path(where).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"{tree}: imports from {where}, not from the tree")
    head = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h %s"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--short", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    changed = len(dirty.stdout.splitlines())
    return f"{head.stdout.strip()[:70]}{f' + {changed} uncommitted files' if changed else ''}"


def run_one(bench: Bench, side: str, tree: Path, timeout: float) -> Run:
    argv = [PYTHON, *bench.argv]
    if bench.pin is not None:
        argv = ["taskset", "-c", bench.pin, *argv]
    load = round(os.getloadavg()[0], 2)
    start = time.monotonic()
    run = Run(bench.name, side, str(tree), 0.0, load)
    try:
        done = subprocess.run(
            argv, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=timeout,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            run.error = f"exit {done.returncode}: {done.stderr.strip()[-400:]}"
        else:
            run.metrics = bench.parse(done.stdout)
        run.note = next((x for x in done.stderr.splitlines() if "ADMISSION_WAIT" in x), "")
    except subprocess.TimeoutExpired:
        run.error = f"timeout after {timeout:.0f} s"
    except (ValueError, KeyError, IndexError) as e:
        run.error = f"unreadable output: {e!r}"
    run.seconds = round(time.monotonic() - start, 1)
    return run


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(runs: Sequence[Run]) -> str:
    rows = [
        "| metric | old median | new median | new/old | new/old per pair | old spread | "
        "new spread | runs |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    names: dict[str, None] = {}
    for r in runs:
        names.update(dict.fromkeys(r.metrics))
    for name in names:
        sides: dict[str, list[float]] = {"old": [], "new": []}
        pairs: list[float] = []
        old_last: float | None = None
        for r in runs:
            if name not in r.metrics:
                continue
            value = r.metrics[name]
            sides[r.side].append(value)
            if r.side == "old":
                old_last = value
            elif old_last:
                pairs.append(value / old_last)
                old_last = None
        old, new = sides["old"], sides["new"]
        if not old or not new:
            continue
        om, nm = statistics.median(old), statistics.median(new)
        spread = {s: (max(v) - min(v)) / statistics.median(v) if statistics.median(v) else 0.0
                  for s, v in sides.items()}  # fmt: skip
        rows.append(
            f"| {name} | {_fmt(om)} | {_fmt(nm)} | {nm / om if om else float('nan'):.3f} | "
            f"{', '.join(f'{p:.2f}' for p in pairs)} | ±{spread['old'] / 2:.0%} | "
            f"±{spread['new'] / 2:.0%} | {len(old)}+{len(new)} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--old", type=Path, default=Path("/work/base"))
    parser.add_argument("--new", type=Path, default=HERE)
    parser.add_argument("--repeats", type=int, default=3, help="old/new pairs per benchmark")
    parser.add_argument("--devices", type=int, default=10_000, help="registration/update storms")
    parser.add_argument("--memory-devices", type=int, default=100_000)
    parser.add_argument("--memory-batch", type=int, default=1000)
    parser.add_argument("--command-devices", type=int, default=1000)
    parser.add_argument("--command-seconds", type=float, default=3.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[5000, 0])
    parser.add_argument("--no-sqlite", action="store_true", help="the memory store only")
    parser.add_argument("--only", nargs="+", metavar="BENCH",
                        help="registration_storm, update_storm, commands, memory")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="per run (seconds)")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="start no new pair after this many seconds")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--raw", type=Path, help="write every run as JSON here")
    args = parser.parse_args(argv)
    old, new = args.old.resolve(), args.new.resolve()
    heads = {"old": check_tree(old), "new": check_tree(new)}
    differ = subprocess.run(
        ["diff", "-rq", "-x", "__pycache__", str(old / "bench"), str(new / "bench")],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    start = time.monotonic()
    runs: list[Run] = []
    todo = benches(args)
    for i in range(args.repeats):
        if i and time.monotonic() - start > args.budget:
            print(f"budget spent: stopped after {i} pairs", file=sys.stderr)
            break
        for bench in todo:
            for side, tree in (("old", old), ("new", new)):
                run = run_one(bench, side, tree, args.timeout)
                runs.append(run)
                print(f"[{i + 1}/{args.repeats}] {bench.name} {side}: {run.seconds} s, load "
                      f"{run.loadavg} {run.error or ''}", file=sys.stderr)  # fmt: skip
    loads = [r.loadavg for r in runs]
    report = [
        f"old = {old} ({heads['old']})",
        f"new = {new} ({heads['new']})",
        "",
        f"{args.repeats} pairs old/new interleaved; storms {args.devices:,} devices, memory "
        f"{args.memory_devices:,}; {time.monotonic() - start:.0f} s in all; load average "
        f"{min(loads):.2f}-{max(loads):.2f} at the runs' starts; spread = ±(max - min) / 2 "
        "/ median. Lower is better unless the metric says otherwise.",
        "",
        table(runs),
    ]
    if differ:
        report += ["", "bench/ differs between the trees (each tree ran its own scripts):", "",
                   *(f"    {line}" for line in differ.splitlines())]  # fmt: skip
    notes = {f"{r.bench} {r.side}: {r.note}" for r in runs if r.note}
    if notes:
        report += ["", *sorted(notes)]
    failed = [r for r in runs if r.error]
    if failed:
        report += ["", "failed runs:", *(f"- {r.bench} {r.side}: {r.error}" for r in failed)]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.raw:
        args.raw.write_text(json.dumps([r.__dict__ for r in runs], indent=1))


if __name__ == "__main__":
    main()
