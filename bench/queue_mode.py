"""Queue mode: sleepy devices with a command waiting; how soon after waking it is delivered.

dm_actor runs pinned to core 1 with `awake_time = 1` s (so that the devices are believed
asleep one second after their last message); on core 0 the lean devices and the application.
N devices register in queue mode (`b=U&Q`) and go to sleep (they ignore the server from then
on); after the awake time the application posts one command (GET /3/0/9) to each (202: queued).
Then the devices wake, at most `--window` at a time, each with an Update, and each measures the
time from sending its Update to receiving the command: the delivery latency after wake-up
(p50/p99). The application waits for every AsyncIDResponse on its WebSocket.

    python bench/queue_mode.py                       # 1000 devices
    python bench/queue_mode.py --devices 10000 --window 1000 --rounds 3

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _harness as h

CONFIG = "[delivery]\nawake_time = 1.0\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    target = h.start_server(store=args.store, config=CONFIG)
    devices = h.start_devices(target)
    app = h.start_app(target)
    try:
        devices.ask(f"register {args.devices} 500 86400 Q")
        devices.ask("sleep")
        app.ask("channel")
        time.sleep(2.0)
        posted = app.ask(f"post bench {args.devices} 16")
        asleep = devices.ask("stats").get("ignored_asleep", 0)
        with h.Meter({"server": target.proc, "devices": devices, "app": app}) as meter:
            woke = devices.ask(f"wake {args.window} 60")
            answered = app.ask(f"expect {args.devices} 30")
        r = {"devices": args.devices, "window": args.window,
             "accepted": posted["http_statuses"].get("202", 0),
             "sent_while_asleep": asleep, "delivered": woke["done"],
             "wake_to_command_p50_ms": woke["p50_ms"], "wake_to_command_p99_ms": woke["p99_ms"],
             "wake_to_command_max_ms": woke["max_ms"],
             "delivered_per_s": round(woke["done"] / woke["seconds"], 1),
             "answered": answered["answered"],
             "server_cpu_share": round(meter.share("server"), 3),
             "devices_cpu_share": round(meter.share("devices"), 3)}  # fmt: skip
        print(f"{args.devices} sleepy devices: delivered {r['delivered']}, p50 "
              f"{r['wake_to_command_p50_ms']} p99 {r['wake_to_command_p99_ms']} ms",
              file=sys.stderr)  # fmt: skip
        return r
    finally:
        app.stop()
        devices.stop()
        target.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--window", type=int, default=100, help="devices waking at once")
    h.common_arguments(parser)
    args = parser.parse_args()
    rounds = [run(args) for _ in range(args.rounds)]
    row = min(rounds, key=lambda r: r["wake_to_command_p99_ms"] or float("inf"))
    result = {"benchmark": "queue_mode", "store": args.store, "rounds": args.rounds,
              "machine": h.machine(), "results": [row]}  # fmt: skip
    h.emit(result, [row], ["devices", "window", "accepted", "delivered", "answered",
                           "wake_to_command_p50_ms", "wake_to_command_p99_ms",
                           "delivered_per_s", "server_cpu_share", "sent_while_asleep"])  # fmt: skip


if __name__ == "__main__":
    main()
