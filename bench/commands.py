"""Commands end to end: REST in, CoAP to the device and back, the answer on the WebSocket.

dm_actor runs pinned to core 1. On core 0: M lean devices (`_devices.py`, answering GET
/3/0/9 with 2.05 and Max-Age 0, so the server's cache never answers for them) and the
application (`_app.py`): a WebSocket channel, and `--connections` keep-alive HTTP connections
posting `POST /v2/device-requests/bench-I?async-id=...` with `{"method":"GET","uri":"/3/0/9"}`
round-robin over the devices.

- At each fixed offered load (`--rates`, commands/s in all, paced per connection: an open
  loop while the server keeps up) for `--seconds`, then until every answer arrived.
- `max`: a closed loop, at most 8 commands per connection waiting for their answer.

Latency: from writing the POST to decoding the AsyncIDResponse from the WebSocket (p50/p99);
the 202's own round trip apart. Also the server's CPU share and µs of server CPU per command.
`--compare-sqlite` runs everything again with `--store sqlite` and reports sqlite/memory;
`--commit-intervals 0 0.001` adds SQLite runs with those `[server] commit_interval` values.

    python bench/commands.py                          # 1k, 2k, 5k/s and max, memory store
    python bench/commands.py --rates 5000 --rounds 3 --compare-sqlite
    python bench/commands.py --rates 0 --profile py-spy

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _harness as h


def run(
    store: str, args: argparse.Namespace, interval: float | None = None
) -> list[dict[str, Any]]:
    config = None if interval is None else f"[server]\ncommit_interval = {interval}\n"
    target = h.start_server(store=store, config=config)
    if interval is not None:
        store = f"sqlite {interval * 1000:g} ms"
    devices = h.start_devices(target)
    app = h.start_app(target)
    rows: list[dict[str, Any]] = []
    try:
        devices.ask(f"register {args.devices} 500")
        app.ask("channel")
        app.ask(f"commands bench {args.devices} 500 1 {args.connections}")  # warm-up
        for rate in args.rates:
            if args.profile == "py-spy":
                h.attach_profiler(target, f"commands-{rate}")
            procs = {"server": target.proc, "devices": devices, "app": app}
            with h.Meter(procs) as meter:
                r = app.ask(f"commands bench {args.devices} {rate} {args.seconds} "
                            f"{args.connections}")  # fmt: skip
            if target.profiler is not None:
                target.profiler.stop()
                print(f"== profile: commands at {rate or 'max'}/s ({store})\n"
                      f"{h.profile_report(target.profiler.out)}", file=sys.stderr)  # fmt: skip
                target.profiler = None
            r["store"] = store
            r["offered"] = rate or "max"
            r["server_cpu_share"] = round(meter.share("server"), 3)
            r["server_us_per_cmd"] = round(meter.cpu["server"] / max(r["answered"], 1) * 1e6, 1)
            # of which in threads other than the event loop's: the SQLite writer's commits
            r["thread_us_per_cmd"] = round(
                meter.other_threads["server"] / max(r["answered"], 1) * 1e6, 1
            )
            r["devices_cpu_share"] = round(meter.share("devices"), 3)
            r["app_cpu_share"] = round(meter.share("app"), 3)
            print(f"{store} {r['offered']}/s: answered {r['answered_per_s']:,.0f}/s "
                  f"p50 {r['e2e_p50_ms']} p99 {r['e2e_p99_ms']} ms, server CPU "
                  f"{r['server_cpu_share']:.0%}", file=sys.stderr)  # fmt: skip
            rows.append(r)
    finally:
        app.stop()
        devices.stop()
        target.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 5000, 0],
                        help="offered commands/s (0: max, closed loop)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--compare-sqlite", action="store_true")
    parser.add_argument("--commit-intervals", type=float, nargs="*", default=[], metavar="S",
                        help="also run --store sqlite with these [server] commit_interval "
                             "values (seconds)")  # fmt: skip
    h.common_arguments(parser)
    args = parser.parse_args()
    cases: list[tuple[str, float | None]] = [(args.store, None)]
    if args.compare_sqlite and args.store != "sqlite":
        cases.append(("sqlite", None))
    cases += [("sqlite", interval) for interval in args.commit_intervals]
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for store, interval in cases:
            for r in run(store, args, interval):
                by_case.setdefault((r["store"], str(r["offered"])), []).append(r)
    rows = [h.best(rs, "answered_per_s") for rs in by_case.values()]
    for row in rows:
        if row["store"] != "memory":
            mem = by_case.get(("memory", str(row["offered"])))
            if mem:
                row["of_memory"] = round(row["answered_per_s"] / h.best(mem, "answered_per_s")
                                         ["answered_per_s"], 3)  # fmt: skip
    result = {"benchmark": "commands", "devices": args.devices, "connections": args.connections,
              "rounds": args.rounds, "machine": h.machine(), "results": rows}  # fmt: skip
    h.emit(result, rows, ["store", "offered", "answered_per_s", "e2e_p50_ms", "e2e_p99_ms",
                          "accept_p50_ms", "accept_p99_ms", "server_cpu_share",
                          "server_us_per_cmd", "thread_us_per_cmd", "devices_cpu_share",
                          "app_cpu_share", "of_memory"])  # fmt: skip


if __name__ == "__main__":
    main()
