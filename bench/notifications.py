"""Notifications: devices push Observe notifications; how many per second reach one WebSocket
subscriber.

dm_actor runs pinned to core 1; on core 0 the lean devices and the application. The
application opens a WebSocket channel and subscribes to `/3303/0/5700` on each of N devices
(`PUT /v2/subscriptions/bench-I/3303/0/5700`); the server observes each device (GET
Observe=0). Then the devices send NON 2.05 notifications (a fresh Observe number and Message ID
each, text payload) round-robin over the observations at each offered rate (`--rates`, in all)
for `--seconds`, and the subscriber counts what arrives in `notifications` arrays until it has
them all or none came for 2 s.

Reported: notifications/s received (first to last), the share of sent ones received (the rest
were dropped, by the kernel's socket buffer or the server), WebSocket messages (batches), the
server's CPU share and µs of server CPU per notification.

    python bench/notifications.py                      # 1000 devices; 10k, 30k, 60k/s offered
    python bench/notifications.py --rates 30000 --rounds 3 --profile py-spy

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _harness as h


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    target = h.start_server(store=args.store)
    devices = h.start_devices(target)
    app = h.start_app(target)
    rows: list[dict[str, Any]] = []
    try:
        devices.ask(f"register {args.devices} 500")
        app.ask("channel")
        app.ask(f"subscribe bench {args.devices} /3303/0/5700 16")
        deadline = time.monotonic() + 60
        while devices.ask("stats")["observations"] < args.devices:
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not observe every device")
            time.sleep(0.2)
        for rate in args.rates:
            app.ask("count")
            if args.profile == "py-spy":
                h.attach_profiler(target, f"notifications-{rate}")
            with h.Meter({"server": target.proc, "devices": devices, "app": app}) as meter:
                sent = devices.ask(f"notify {rate} {args.seconds}")
                got = app.ask(f"notifications {sent['sent']} 30")
            if target.profiler is not None:
                target.profiler.stop()
                print(f"== profile: notifications at {rate}/s\n"
                      f"{h.profile_report(target.profiler.out)}", file=sys.stderr)  # fmt: skip
                target.profiler = None
            r = {"offered": rate, "sent": sent["sent"], "sent_per_s": sent["rate"],
                 "received": got["received"], "received_per_s": got["rate"],
                 "delivered": round(got["received"] / max(sent["sent"], 1), 3),
                 "ws_messages": got["messages"],
                 "server_cpu_share": round(meter.share("server"), 3),
                 "server_us_per_notification": round(
                     meter.cpu["server"] / max(got["received"], 1) * 1e6, 1),
                 "devices_cpu_share": round(meter.share("devices"), 3),
                 "app_cpu_share": round(meter.share("app"), 3)}  # fmt: skip
            print(f"{rate}/s offered: {r['received_per_s']}/s received ({r['delivered']:.0%}), "
                  f"server CPU {r['server_cpu_share']:.0%}", file=sys.stderr)  # fmt: skip
            rows.append(r)
    finally:
        app.stop()
        devices.stop()
        target.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="+", default=[10000, 30000, 60000])
    parser.add_argument("--seconds", type=float, default=3.0)
    h.common_arguments(parser)
    args = parser.parse_args()
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for r in run(args):
            by_rate.setdefault(r["offered"], []).append(r)
    rows = [h.best(rs, "received_per_s") for rs in by_rate.values()]
    result = {"benchmark": "notifications", "store": args.store, "devices": args.devices,
              "rounds": args.rounds, "machine": h.machine(), "results": rows}  # fmt: skip
    h.emit(result, rows, ["offered", "sent_per_s", "received_per_s", "delivered", "ws_messages",
                          "server_cpu_share", "server_us_per_notification",
                          "devices_cpu_share", "app_cpu_share"])  # fmt: skip


if __name__ == "__main__":
    main()
