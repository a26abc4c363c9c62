"""One application's notification latency, with and without another application's stalled
WebSocket subscriber (issue 10, item 8).

The server (in this process: the supervisor, the hub, the HTTP port, the SQLite store in a
temporary directory) gets `--rate` events per second for every application, published into
its event stream as a device's notifications would be (each stamped with the wall time). A
client process (`--client`, started by this script) connects application A's WebSocket and
reads everything, measuring each event's latency (arrival minus stamp); with `--stalled` it
also connects application B's WebSocket and never reads from it. Reported: A's latency
p50/p99/max over the last `--measure` seconds of the run (B's channel is full by then at the
default rate), B's channel status and drops.

    python bench/stalled_subscriber.py                 # both runs, 4,000 events/s, 45 s each
    python bench/stalled_subscriber.py --stalled-only --seconds 40

Bounded: each run stops by itself after `--seconds`. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

KEY_A, KEY_B = "ak_bench_a", "ak_bench_b"


async def _put_channel(port: int, key: str) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"PUT /v2/notification/websocket HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n"
            b"Authorization: Bearer %s\r\n\r\n" % key.encode()
        )
        await stream.receive_some(4096)


async def client(port: int, stalled: bool, seconds: float, measure: float) -> dict[str, Any]:
    """A's reading subscriber (and B's stalled one): A's latencies in the measured window."""
    await _put_channel(port, KEY_A)
    if stalled:
        await _put_channel(port, KEY_B)
    url = f"ws://127.0.0.1:{port}/v2/notification/websocket-connect"
    latencies: list[float] = []
    received = 0
    start = time.time()
    window = start + seconds - measure
    closed_b: list[object] = []
    async with trio.open_nursery() as nursery:

        async def stalled_b() -> None:
            async with open_websocket_url(
                url, subprotocols=["wss", f"pelion_{KEY_B}"], max_message_size=1 << 26
            ) as ws:
                await trio.sleep(seconds + 5)  # never reads: its reader stops after one frame
                closed_b.append(ws.closed)

        if stalled:
            nursery.start_soon(stalled_b)
        async with open_websocket_url(
            url, subprotocols=["wss", f"pelion_{KEY_A}"], max_message_size=1 << 26
        ) as ws:
            with trio.move_on_after(seconds):
                while True:
                    try:
                        message = json.loads(await ws.get_message())
                    except ConnectionClosed:
                        break
                    now = time.time()
                    for item in message.get("notifications", ()):
                        received += 1
                        if item["t"] >= window:
                            latencies.append(now - item["t"])
        nursery.cancel_scope.cancel()
    latencies.sort()

    def q(p: float) -> float | None:
        return round(1000 * latencies[int(p * (len(latencies) - 1))], 2) if latencies else None

    return {"received": received, "measured": len(latencies), "p50_ms": q(0.5),
            "p99_ms": q(0.99), "max_ms": q(1.0), "b_closed": str(closed_b[:1])}  # fmt: skip


async def server_run(args: argparse.Namespace, stalled: bool) -> dict[str, Any]:
    from dm_actor import app
    from dm_actor.api.auth import ApiKeys
    from dm_actor.config import parse_settings

    with tempfile.TemporaryDirectory() as data_dir:
        settings = parse_settings(
            f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\n'
            f'data_dir = "{data_dir}"\nlog_level = "warning"\n'
        )
        async with trio.open_nursery() as nursery:
            listening: app.Listening = await nursery.start(
                lambda task_status: app.serve(
                    settings, api_keys=ApiKeys([KEY_A, KEY_B]), task_status=task_status
                )
            )
            assert listening.http is not None
            port = listening.http[1]
            argv = [sys.executable, __file__, "--client", str(port), "--seconds",
                    str(args.seconds), "--measure", str(args.measure)]  # fmt: skip
            if stalled:
                argv.append("--stalled")
            proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
            await trio.sleep(1)  # both sockets connected
            lags: list[float] = []
            measure_from = trio.current_time() + args.seconds - args.measure

            async def loop_lag() -> None:
                """How late a 1 ms sleep wakes: the longest steps the event loop ran."""
                while True:
                    before = trio.current_time()
                    await trio.sleep(0.001)
                    if before >= measure_from:
                        lags.append(trio.current_time() - before - 0.001)

            nursery.start_soon(loop_lag)
            hub = _hub(listening.supervisor.events)
            spills: list[float] = []  # CPU seconds of the main thread in each spill step
            spill = hub.spill

            def timed_spill(*a: Any) -> Any:
                before = time.thread_time()
                try:
                    return spill(*a)
                finally:
                    if trio.current_time() >= measure_from:
                        spills.append(time.thread_time() - before)

            hub.spill = timed_spill
            cpu_at: list[float] = []
            events = listening.supervisor.events
            tick = 0.01
            per_tick = max(1, int(args.rate * tick))
            published = 0
            stop = trio.current_time() + args.seconds
            next_tick = trio.current_time()
            while trio.current_time() < stop:
                if not cpu_at and trio.current_time() >= measure_from:
                    cpu_at.append(time.process_time())
                now = time.time()
                for _ in range(per_tick):
                    item = {"ep": "bench", "path": "/3303/0/5700", "ct": "text/plain",
                            "payload": "MjEuNQ==", "max-age": 60, "t": now}  # fmt: skip
                    events.publish("notifications", item)
                published += per_tick
                next_tick += tick
                await trio.sleep_until(next_tick)
            cpu = time.process_time() - cpu_at[0] if cpu_at else 0.0
            hub_b = [c for c in hub.channels.values() if c.app != _owner(KEY_A)]
            b_state = {}
            if hub_b:  # (B's client is still connected, or was closed by the server)
                channel = hub_b[0]
                b_state = {"b_status": "connected" if channel.session else "disconnected",
                           "b_queue": len(channel), "b_dropped": channel.dropped}  # fmt: skip
            assert proc.stdout is not None
            out = b""
            while chunk := await proc.stdout.receive_some():
                out += chunk
            await proc.wait()
            result: dict[str, Any] = json.loads(out)
            result.update(b_state)
            result["server_cpu_s_per_s"] = round(cpu / args.measure, 3)  # (all its threads)
            if spills:
                result["spill_cpu_ms_max"] = round(1000 * max(spills), 2)
                result["spill_cpu_ms_per_s"] = round(1000 * sum(spills) / args.measure, 2)
            lags.sort()
            if lags:
                result["loop_lag_p99_ms"] = round(1000 * lags[int(0.99 * (len(lags) - 1))], 2)
                result["loop_lag_max_ms"] = round(1000 * lags[-1], 2)
            result["published"] = published
            result["stalled"] = stalled
            nursery.cancel_scope.cancel()
    return result


def _owner(key: str) -> str | None:
    from dm_actor.api.auth import ApiKeys

    return ApiKeys([KEY_A, KEY_B]).owner(key)


def _hub(events: object) -> Any:
    """The hub of the running HTTP server, the reader of `events` (found through the garbage
    collector: the server object is not exported, and this is a measurement script)."""
    import gc

    from dm_actor.api.channels import NotificationHub

    gc.unfreeze()
    hubs = [o for o in gc.get_objects() if isinstance(o, NotificationHub)]
    return next(h for h in hubs if h.events is events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=4000, help="events/s for every application")
    parser.add_argument("--seconds", type=float, default=45.0, help="length of each run")
    parser.add_argument("--measure", type=float, default=15.0, help="the last S seconds count")
    parser.add_argument("--stalled-only", action="store_true")
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stalled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        print(json.dumps(trio.run(client, args.client, args.stalled, args.seconds,
                                  args.measure)))  # fmt: skip
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    for stalled in (True,) if args.stalled_only else (False, True):
        print(json.dumps(trio.run(server_run, args, stalled)), flush=True)


if __name__ == "__main__":
    main()
