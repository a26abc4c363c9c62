"""Registration storm: N new devices register as fast as the server answers.

Each target runs in its own process pinned to core 1 (`taskset -c 1`); the lean devices
(`_devices.py`) run pinned to core 0, each Register a real LwM2M 1.1 Register (`POST
/rd?ep=bench-I&lt=86400&lwm2m=1.1&b=U`, link-format objects) from its own source address,
at most `--window` in flight (a closed loop: the next device registers when one is answered).
Targets, in interleaved rounds (best round kept):

- `dm_actor`: `dm-actor serve --store memory` (or sqlite);
- `floor`: `bench/baselines/floor.py`, a Trio UDP responder answering 2.01 from the header;
- `aiocoap`: `bench/baselines/aiocoap_rd.py`, an aiocoap resource directory (at most
  `--aiocoap-devices`: it answers ~1k/s, and its rate does not depend on N; with at most
  `--aiocoap-window` in flight, as its default socket buffer drops larger bursts).

Reported per target and N: registrations/s, Register round trip p50/p99, the target's CPU
over the phase (share of a core, and µs per registration: the number that does not move with
the other work on this shared machine), the load's CPU share, and the target's RSS per
registered device. dm_actor's rate is given as a fraction of the floor and a multiple of
aiocoap. Finally `dm-actor simulate` (the full simulator, `--sim-devices`) registers against
the floor to show how much the simulator itself can drive, and its own CPU.

    python bench/registration_storm.py                       # N = 10k
    python bench/registration_storm.py --devices 10000 100000 --rounds 3
    python bench/registration_storm.py --devices 10000 --profile py-spy
    python bench/registration_storm.py --devices 1000 10000 30000 100000 --plot docs/

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import _harness as h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10000])
    parser.add_argument("--window", type=int, default=1000, help="Registers in flight")
    parser.add_argument("--aiocoap-devices", type=int, default=10000)
    parser.add_argument(
        "--aiocoap-window",
        type=int,
        default=50,
        help="aiocoap's window: its default socket buffer drops a larger burst",
    )
    parser.add_argument("--sim-devices", type=int, default=20000,
                        help="simulator devices against the floor (0: none)")  # fmt: skip
    parser.add_argument("--targets", nargs="+", default=["dm_actor", "floor", "aiocoap"])
    parser.add_argument("--plot", type=Path, help="write throughput and memory plots here")
    h.common_arguments(parser)
    args = parser.parse_args()

    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_no in range(args.rounds):
        targets = (
            args.targets[round_no % len(args.targets) :]
            + args.targets[: round_no % len(args.targets)]
        )
        for n in args.devices:
            for kind in targets:
                count = min(n, args.aiocoap_devices) if kind == "aiocoap" else n
                if (
                    kind == "aiocoap"
                    and (kind, count) in runs
                    and len(runs[kind, count]) > round_no
                ):
                    continue  # capped: already measured at this size in this round
                window = args.aiocoap_window if kind == "aiocoap" else args.window
                r = h.coap_storm(kind, count, window, ["register"], store=args.store,
                                 profile=args.profile)["register"]  # fmt: skip
                profile = r.pop("profile", None)
                if profile:
                    print(f"== profile: {kind} register N={count}\n{profile}", file=sys.stderr)
                print(f"[round {round_no}] {kind} N={count}: {r['rate']:,.0f}/s "
                      f"p99 {r['p99_ms']} ms, target CPU {r['target_cpu_share']:.0%}",
                      file=sys.stderr)  # fmt: skip
                runs.setdefault((kind, count), []).append(r)

    rows: list[dict[str, Any]] = []
    for (kind, _n), rounds in runs.items():
        r = h.best(rounds)
        rows.append({"target": kind, "devices": r["expected"], **r})
    for row in rows:
        if row["target"] != "dm_actor":
            continue
        floor = _find(rows, "floor", row["devices"])
        aio = _find(rows, "aiocoap", None)
        if floor:
            row["of_floor"] = round(row["rate"] / floor["rate"], 3)
            row["cpu_of_floor"] = round(floor["target_us_per_op"] / row["target_us_per_op"], 3)
        if aio:
            row["x_aiocoap"] = round(row["rate"] / aio["rate"], 2)
            row["cpu_x_aiocoap"] = round(aio["target_us_per_op"] / row["target_us_per_op"], 2)

    sim = None
    if args.sim_devices:
        floor_target = h.start_baseline("floor")
        try:
            with h.Meter({"floor": floor_target.proc}) as meter:
                sim = h.run_simulator(floor_target, args.sim_devices, 5 + args.sim_devices / 5000)
            sim = {
                k: sim.get(k)
                for k in (
                    "devices",
                    "all_registered_after_s",
                    "first_registrations_per_s",
                    "cpu_s",
                    "seconds",
                )
            }
            sim["floor_cpu_s"] = round(meter.cpu["floor"], 3)
        finally:
            floor_target.stop()

    result = {"benchmark": "registration_storm", "store": args.store, "window": args.window,
              "rounds": args.rounds, "machine": h.machine(), "results": rows,
              "simulator_vs_floor": sim}  # fmt: skip
    h.emit(result, rows, ["target", "devices", "rate", "p50_ms", "p99_ms", "target_cpu_share",
                          "target_us_per_op", "load_cpu_share", "rss_bytes_per_device",
                          "of_floor", "x_aiocoap", "cpu_x_aiocoap", "retransmits"])  # fmt: skip
    if sim:
        print(f"simulator vs floor: {sim['devices']} devices registered at "
              f"{sim['first_registrations_per_s']}/s, simulator CPU {sim['cpu_s']} s over "
              f"{sim['all_registered_after_s']} s")  # fmt: skip
    if args.plot:
        plot(rows, args.plot)


def _find(rows: list[dict[str, Any]], kind: str, n: int | None) -> dict[str, Any] | None:
    found = [r for r in rows if r["target"] == kind and (n is None or r["devices"] == n)]
    if not found and n is not None:
        found = [r for r in rows if r["target"] == kind]
    return found[-1] if found else None


def plot(rows: list[dict[str, Any]], where: Path) -> None:
    """Registrations/s and RSS per device against N (matplotlib, from the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("dm_actor", "floor", "aiocoap"):
        pts = sorted((r for r in rows if r["target"] == kind), key=lambda r: r["devices"])
        if not pts:
            continue
        xs = [r["devices"] for r in pts]
        ax1.plot(xs, [r["rate"] for r in pts], marker="o", label=kind)
        if kind == "dm_actor":
            ax2.plot(xs, [r["rss_bytes_per_device"] for r in pts], marker="o", label=kind)
    ax1.set(xscale="log", xlabel="devices (N)", ylabel="registrations/s",
            title="Registration storm (target on one core)")  # fmt: skip
    ax2.axhline(4096, color="grey", linestyle="--", label="goal: 4 KB")
    ax2.set_ylim(bottom=0)
    ax2.set(xscale="log", xlabel="devices (N)", ylabel="server RSS per device (bytes)",
            title="Memory per registered device")  # fmt: skip
    ax1.legend()
    ax2.legend()
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    where.mkdir(parents=True, exist_ok=True)
    fig.savefig(where / "registration_storm.png", dpi=100)


if __name__ == "__main__":
    main()
