"""Update storm: N registered devices each send one Update (`POST /rd/<id>`), as fast as the
server answers.

Like `registration_storm.py` (targets pinned to core 1, lean devices to core 0, a closed loop
with at most `--window` Updates in flight, interleaved rounds, best kept), but the measured
phase is the Updates that follow the registration of all N devices. Targets: dm_actor
(`--store memory` or sqlite), the floor (Trio, answers 2.04 from the header) and aiocoap
(looks the registration id up, 2.04 or 4.04; at most `--aiocoap-devices`, `--aiocoap-window`
in flight).

    python bench/update_storm.py                          # N = 10k
    python bench/update_storm.py --devices 100000 --rounds 3
    python bench/update_storm.py --profile py-spy

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _harness as h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10000])
    parser.add_argument("--window", type=int, default=1000, help="Updates in flight")
    parser.add_argument("--aiocoap-devices", type=int, default=10000)
    parser.add_argument("--aiocoap-window", type=int, default=50)
    parser.add_argument("--targets", nargs="+", default=["dm_actor", "floor", "aiocoap"])
    h.common_arguments(parser)
    args = parser.parse_args()

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_no in range(args.rounds):
        shift = round_no % len(args.targets)
        for n in args.devices:
            for kind in args.targets[shift:] + args.targets[:shift]:
                count = min(n, args.aiocoap_devices) if kind == "aiocoap" else n
                if kind == "aiocoap" and len(runs.get((kind, count), ())) > round_no:
                    continue  # capped: already measured at this size in this round
                window = args.aiocoap_window if kind == "aiocoap" else args.window
                r = h.coap_storm(kind, count, window, ["register", "update"], store=args.store,
                                 profile=args.profile)["update"]  # fmt: skip
                profile = r.pop("profile", None)
                if profile:
                    print(f"== profile: {kind} update N={count}\n{profile}", file=sys.stderr)
                print(f"[round {round_no}] {kind} N={count}: {r['rate']:,.0f} Updates/s "
                      f"p99 {r['p99_ms']} ms, target CPU {r['target_cpu_share']:.0%}",
                      file=sys.stderr)  # fmt: skip
                runs.setdefault((kind, count), []).append(r)

    rows = [{"target": kind, "devices": h.best(rs)["expected"], **h.best(rs)}
            for (kind, _n), rs in runs.items()]  # fmt: skip
    for row in rows:
        if row["target"] != "dm_actor":
            continue
        for other in rows:
            if other["target"] == "floor" and other["devices"] == row["devices"]:
                row["of_floor"] = round(row["rate"] / other["rate"], 3)
            if other["target"] == "aiocoap":
                row["x_aiocoap"] = round(row["rate"] / other["rate"], 2)
                row["cpu_x_aiocoap"] = round(other["target_us_per_op"] / row["target_us_per_op"], 2)
    result = {"benchmark": "update_storm", "store": args.store, "window": args.window,
              "rounds": args.rounds, "machine": h.machine(), "results": rows}  # fmt: skip
    h.emit(result, rows, ["target", "devices", "rate", "p50_ms", "p99_ms", "target_cpu_share",
                          "target_us_per_op", "load_cpu_share", "of_floor", "x_aiocoap",
                          "cpu_x_aiocoap", "errors", "retransmits"])  # fmt: skip


if __name__ == "__main__":
    main()
