"""Commands end to end over DTLS versus plain CoAP, in the same run against the same server.

`bench/commands.py`'s measurement, with two device fleets registered at once: M plain
devices (`_devices.py`, `bench-I`) and M DTLS devices (`_dtls_devices.py`, `sec-I`, one PSK
session each, made with the project's `DtlsClient`; their credentials PUT with an admin key
first). The server on core 1, devices and the application on core 0. For each offered rate
(`--rates`; 0: a closed loop, at most 8 commands per connection in flight) the two sides run
one after the other, in an order rotated each round; each side keeps its best round.

Reported per side: answered/s, latency p50/p99 (POST written -> AsyncIDResponse decoded on the
WebSocket), the server's CPU share and µs of server CPU per command; and the DTLS side's µs
per command over the plain side's (goal: at most 1.20).

    python bench/dtls_commands.py                               # 1,000 devices each, 1k/s and max
    python bench/dtls_commands.py --rates 0 --rounds 3 --profile py-spy

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from typing import Any

import _harness as h

from dm_actor.sim.secure import derived_key

ADMIN_KEY = "adm_bench_0123456789abcdef"
SECRET = "bench"


def provision(target: h.Target, prefix: str, n: int) -> None:
    """PUT the DTLS devices' credentials (identity = name, key derived from SECRET)."""
    conn = http.client.HTTPConnection("127.0.0.1", target.http_port, timeout=30)
    try:
        for i in range(n):
            name = f"{prefix}-{i}"
            body = json.dumps({"psk_identity": name,
                               "psk_key": derived_key(SECRET.encode(), name).hex()})  # fmt: skip
            headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
            conn.request("PUT", f"/v3/device-credentials/{name}", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status >= 300:
                raise RuntimeError(f"PUT credentials of {name}: {response.status}")
    finally:
        conn.close()


def run(args: argparse.Namespace, rounds: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
    coaps = h.free_port()
    config = f'[api]\nadmin_keys = ["{ADMIN_KEY}"]\n[security]\ncoaps_port = {coaps}\n'
    target = h.start_server(store=args.store, config=config)
    plain = h.start_devices(target)
    secure = h.Proc([h.PYTHON, str(h.BENCH / "_dtls_devices.py"), f"127.0.0.1:{coaps}", "sec",
                     SECRET], h.LOAD_CPU, stdin=True, name="dtls-devices")  # fmt: skip
    app = h.start_app(target)
    try:
        secure.read_json(30)
        provision(target, "sec", args.devices)
        plain.ask(f"register {args.devices} 500")
        with h.Meter({"server": target.proc}) as meter:
            secure.ask(f"register {args.devices} 500")
        reg = secure.ask("stats")
        print(f"dtls: {reg.get('handshakes', 0)} handshakes + Registers in {meter.wall:.2f} s, "
              f"server {meter.cpu['server'] / max(args.devices, 1) * 1e6:.0f} µs per device",
              file=sys.stderr)  # fmt: skip
        if reg.get("handshake_failures") or reg.get("registered") != args.devices:
            raise RuntimeError(f"DTLS devices not all registered: {reg}")
        app.ask("channel")
        for prefix in ("bench", "sec"):  # warm-up
            app.ask(f"commands {prefix} {args.devices} 500 1 {args.connections}")
        for rate in args.rates:
            sides = [("plain", "bench", plain), ("dtls", "sec", secure)]
            if len(rounds.get(("plain", str(rate or "max")), ())) % 2:
                sides.reverse()
            for side, prefix, devices in sides:
                if args.profile == "py-spy":
                    h.attach_profiler(target, f"dtls-commands-{side}-{rate}")
                procs = {"server": target.proc, "devices": devices, "app": app}
                with h.Meter(procs) as meter:
                    r = app.ask(f"commands {prefix} {args.devices} {rate} {args.seconds} "
                                f"{args.connections}")  # fmt: skip
                if target.profiler is not None:
                    target.profiler.stop()
                    print(f"== profile: {side} commands at {rate or 'max'}/s\n"
                          f"{h.profile_report(target.profiler.out)}", file=sys.stderr)  # fmt: skip
                    target.profiler = None
                r["side"] = side
                r["offered"] = rate or "max"
                r["server_cpu_share"] = round(meter.share("server"), 3)
                r["server_us_per_cmd"] = round(meter.cpu["server"] / max(r["answered"], 1) * 1e6, 1)
                r["devices_cpu_share"] = round(meter.share("devices"), 3)
                print(f"{side} {r['offered']}/s: answered {r['answered_per_s']:,.0f}/s p50 "
                      f"{r['e2e_p50_ms']} p99 {r['e2e_p99_ms']} ms, server "
                      f"{r['server_us_per_cmd']} µs/cmd", file=sys.stderr)  # fmt: skip
                rounds.setdefault((side, str(r["offered"])), []).append(r)
        stats = secure.ask("stats")
        if stats.get("dtls_dropped") or stats.get("no_session"):
            print(f"dtls devices: {stats}", file=sys.stderr)
    finally:
        app.stop()
        secure.stop()
        plain.stop()
        target.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="of each kind")
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 0],
                        help="offered commands/s (0: max, closed loop)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=16)
    h.common_arguments(parser)
    args = parser.parse_args()
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        run(args, by_case)
    rows: list[dict[str, Any]] = []
    for rs in by_case.values():
        # the best round is the cheapest one per command (CPU is what is compared)
        row = min(rs, key=lambda r: r["server_us_per_cmd"])
        rows.append(row)
    for row in rows:
        if row["side"] == "dtls":
            base = next(r for r in rows if r["side"] == "plain" and r["offered"] == row["offered"])
            row["cpu_vs_plain"] = round(row["server_us_per_cmd"] / base["server_us_per_cmd"], 3)
    rows.sort(key=lambda r: (str(r["offered"]), r["side"] != "plain"))
    result = {"benchmark": "dtls_commands", "devices": args.devices, "store": args.store,
              "connections": args.connections, "rounds": args.rounds, "machine": h.machine(),
              "results": rows}  # fmt: skip
    h.emit(result, rows, ["side", "offered", "answered_per_s", "e2e_p50_ms", "e2e_p99_ms",
                          "server_cpu_share", "server_us_per_cmd", "devices_cpu_share",
                          "cpu_vs_plain"])  # fmt: skip


if __name__ == "__main__":
    main()
