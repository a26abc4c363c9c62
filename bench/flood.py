"""Registration flood (issue 10, item 7): new devices register at an offered rate, open loop,
while an application works.

The server (`dm-actor serve`, SQLite store by default) runs pinned to core 1; the load and
the application run pinned to core 0. First `--healthy` devices register (closed loop) and
stay to answer commands. Then `--devices` new devices send their Register at `--rate` per
second, whatever the server answers (open loop: the next one does not wait), each behaving
as an honest CoAP client: retransmission after 2-3 s doubling up to 4 times (RFC 7252), a
5.03 obeyed by retrying after its Max-Age with a new Message ID. Meanwhile the application
(one process, Trio) sends `GET /v3/devices?limit=2` every `--get-interval` seconds on a
keep-alive connection, and every `--command-interval` seconds a command (GET /3/0/0) to a
healthy device, timed from the POST to its AsyncIDResponse on the WebSocket channel (which
also receives every registration event, as a real application's would).

Reported: registrations per second (2.01s answered over the flood), the offered rate the
load achieved, Register latency p50/p99, retransmissions, 5.03s, devices that gave up; the
GET's p50/p99/max and the command latencies (p50/max, and how many over 2 s); the kernel's
drop counter of the server's UDP socket (`/proc/net/udp`, the `drops` column); the server's
CPU share and RSS. Goals (issue 10): GET p99 < 500 ms, every command answered within 2 s.

    python bench/flood.py                                   # 100k devices at 5,000/s
    python bench/flood.py --devices 20000 --rate 20000 --store memory
    python bench/flood.py --profile py-spy                  # where the server's time goes

`--load HOST:PORT` runs the load process itself (driven over stdin; used by this script and
by tests/adversarial/test_flood.py).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import heapq
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _devices

from dm_actor.coap.message import Message, decode, encode, path_options, query_options

FLOOD = 4  # the token's kind byte of a flood Register
ACK_TIMEOUT, RANDOM_FACTOR, MAX_RETRANSMIT = 2.0, 1.5, 4
_WAITING, _ANSWERED, _GAVE_UP = 1, 2, 3
_MAX_AGE = 14


class Flood(_devices.Devices):
    """The lean devices of `_devices.py` plus an open-loop Register flood."""

    def __init__(self, server: tuple[str, int]) -> None:
        super().__init__(server)
        self.first_flood = 0
        self.fstate = array.array("b")
        self.fsent = array.array("d")  # when its current Register was first sent
        self.fattempt = array.array("b")
        self.fheard = bytearray()
        self.fdata: dict[int, bytes] = {}
        self.timers: list[tuple[float, int, int]] = []  # (when, device, attempt)
        self.frtts = array.array("d")
        self.fcounts: dict[str, int] = {}
        self.flood_lifetime = 86400
        self.rng = random.Random(5)

    def _count(self, key: str, n: int = 1) -> None:
        self.fcounts[key] = self.fcounts.get(key, 0) + n

    def _send_register(self, i: int, now: float, *, new: bool) -> None:
        j = i - self.first_flood
        data = self.fdata.get(i)
        if data is None or new:
            query = f"ep=flood-{i}&lt={self.flood_lifetime}&lwm2m=1.1&b=U"
            options = (*path_options("/rd"), (_devices._CONTENT_FORMAT, b"\x28"),
                       *query_options(query))  # fmt: skip
            data = self.fdata[i] = encode(Message(
                _devices._CON, 2, self._mid(i), self._token(FLOOD, i),
                tuple(sorted(options, key=lambda o: o[0])), _devices.LINKS))  # fmt: skip
            self.fattempt[j] = 0
            if not self.fsent[j]:
                self.fsent[j] = now  # latency counts from the first Register it sent
        self.send(i, data)
        timeout = ACK_TIMEOUT * (1 + self.rng.random() * (RANDOM_FACTOR - 1))
        heapq.heappush(self.timers, (now + timeout * 2 ** self.fattempt[j], i, self.fattempt[j]))

    def flood(self, count: int, rate: float, grace: float) -> dict[str, Any]:
        """Register `count` new devices at `rate`/s; wait up to `grace` s after the last."""
        first = self.first_flood = self.n
        self.add(count)
        self.fstate = array.array("b", bytes(count))
        self.fsent = array.array("d", bytes(8 * count))
        self.fattempt = array.array("b", bytes(count))
        self.fheard = bytearray(count)  # got an answer other than 2.01
        self.frtts = array.array("d")
        self.fcounts = {}
        self.timers = []
        start = time.monotonic()
        cpu0 = time.process_time()
        end_of_sending = start + count / rate
        deadline = end_of_sending + grace
        sent = 0
        answered_at = last_new = start
        self.phase = "flood"
        while True:
            now = time.monotonic()
            due = min(count, int((now - start) * rate) + 1)
            if due - sent > 2000:  # behind (this core is busy): count it, never burst
                self._count("late_sends", due - sent - 2000)
                due = sent + 2000
            while sent < due:
                self.fstate[sent] = _WAITING
                self._send_register(first + sent, now, new=True)
                sent += 1
                last_new = now
            timers = self.timers
            while timers and timers[0][0] <= now:
                _, i, attempt = heapq.heappop(timers)
                j = i - first
                if self.fstate[j] != _WAITING or self.fattempt[j] != attempt:
                    continue
                if attempt < 0:  # the Max-Age of a 5.03 passed: a new Register
                    self._count("retries_after_5.03")
                    self._send_register(i, now, new=True)
                    continue
                if attempt >= MAX_RETRANSMIT:
                    self.fstate[j] = _GAVE_UP
                    self._count("gave_up")
                    continue
                self.fattempt[j] = attempt + 1
                self._count("retransmits")
                self._send_register(i, now, new=False)
            if sent >= count and (len(self.frtts) + self.fcounts.get("gave_up", 0) >= count
                                  or now >= deadline):  # fmt: skip
                break
            self.poll(0.0005)
            if self.frtts:
                answered_at = max(answered_at, self._last_answer)
        self.phase = ""
        wall = time.monotonic() - start
        rtts = sorted(self.frtts)
        send_seconds = max(last_new - start, count / rate)  # late when this core is busy
        span = max(answered_at - start, 1e-9)
        self.fdata.clear()
        return {
            "phase": "flood",
            "devices": count,
            "offered_per_s": rate,
            "sent_per_s": round(sent / max(send_seconds, 1e-9), 1),
            "registered": len(rtts),
            # every device that got an answer: registered, or refused (5.03) and not yet back
            "answered_devices": len(rtts)
            + sum(1 for j in range(count) if self.fheard[j] and self.fstate[j] != _ANSWERED),
            "registered_per_s": round(len(rtts) / span, 1),
            "seconds": round(wall, 2),
            "p50_ms": _devices._ms(rtts, 0.5),
            "p99_ms": _devices._ms(rtts, 0.99),
            "max_ms": round(rtts[-1] * 1000, 1) if rtts else None,
            "cpu_s": round(time.process_time() - cpu0, 2),
            **self.fcounts,
        }

    _last_answer = 0.0

    def _flood_answer(self, i: int, data: bytes, code: int, now: float) -> None:
        j = i - self.first_flood
        if not 0 <= j < len(self.fstate) or self.fstate[j] != _WAITING:
            return
        if code == 0x41:
            self.fstate[j] = _ANSWERED
            self.frtts.append(now - self.fsent[j])
            self._last_answer = now
            self.fdata.pop(i, None)
            return
        key = f"answered_{code >> 5}.{code & 31:02d}"
        self._count(key)
        if not self.fheard[j]:
            self.fheard[j] = 1
            self._count("devices_refused")  # answered, but not 2.01 (at least once)
        if code == 0xA3:  # 5.03: retry after Max-Age, with a new Message ID
            max_age = decode(data).max_age
            self.fattempt[j] = -1
            heapq.heappush(self.timers, (now + max_age + self.rng.random(), i, -1))
        else:
            self.fstate[j] = _GAVE_UP
            self._count("gave_up")

    def _drain(self, fd: int) -> None:
        k = self.by_fd[fd]
        sock = self.socks[k]
        recvmsg = sock.recvmsg
        now = time.monotonic()
        for _ in range(512):
            try:
                data, anc, _, _ = recvmsg(2048, 64)
            except BlockingIOError:
                return
            if len(data) < 4:
                continue
            b0 = data[0]
            mtype = (b0 >> 4) & 3
            code = data[1]
            if mtype == _devices._ACK and code >= 64 and b0 & 15 == 4:
                i = int.from_bytes(data[5:8], "big")
                if data[4] == FLOOD:
                    self._flood_answer(i, data, code, now)
                elif data[4] == self.kind and i < self.n:
                    self._answered(i, data, code, now)
            elif mtype == _devices._CON and 1 <= code <= 31:
                offset = int.from_bytes(anc[0][2][8:12], "big") - _devices.BASE if anc else -1
                i = k * _devices.PER_SOCKET + offset
                if 0 <= offset < _devices.PER_SOCKET and i < self.n:
                    self._request(i, data, now)

    def command(self, words: list[str]) -> bool:
        if words[0] == "flood":
            count, rate, grace = int(words[1]), float(words[2]), float(words[3])
            print(json.dumps(self.flood(count, rate, grace)), flush=True)
            return True
        return super().command(words)


# -- the application (--app) ----------------------------------------------------------------


async def app_main(port: int, key: str) -> None:
    """Driven over stdin: `channel`, `probe GET_INTERVAL COMMAND_INTERVAL DEVICE_PREFIX K`
    (until `stop`: then one JSON line with the latencies), `quit`."""
    import trio
    from _app import Http
    from trio_websocket import ConnectionClosed, open_websocket_url

    answers: dict[str, float] = {}
    answered = trio.Event()
    events = {"registrations": 0, "messages": 0}

    async def reader(connected: trio.Event) -> None:
        nonlocal answered
        url = f"ws://127.0.0.1:{port}/v2/notification/websocket-connect"
        async with open_websocket_url(url, subprotocols=["wss", f"pelion_{key}"],
                                      message_queue_size=4096) as ws:  # fmt: skip
            connected.set()
            try:
                while True:
                    event = json.loads(await ws.get_message())
                    events["messages"] += 1
                    events["registrations"] += len(event.get("registrations", ()))
                    for r in event.get("async-responses", ()):
                        answers[r["id"]] = time.monotonic()
                    answered.set()
                    answered = trio.Event()
            except ConnectionClosed:
                return

    gets: list[float] = []
    commands: list[float] = []
    accepts: list[float] = []  # POST to its 202
    statuses: dict[str, int] = {}
    stop = trio.Event()

    async def get_loop(interval: float) -> None:
        http = await Http.open(port, key)
        next_at = time.monotonic()
        while not stop.is_set():
            t = time.monotonic()
            status, _ = await http.request("GET", "/v3/devices?limit=2")
            gets.append(time.monotonic() - t)
            statuses[f"get_{status}"] = statuses.get(f"get_{status}", 0) + 1
            next_at += interval
            await trio.sleep(max(0.0, next_at - time.monotonic()))

    async def command_loop(interval: float, prefix: str, k: int) -> None:
        http = await Http.open(port, key)
        n = 0
        body = b'{"method":"GET","uri":"/3/0/0"}'
        while not stop.is_set():
            n += 1
            async_id = f"flood-cmd-{n}"
            t = time.monotonic()
            target = f"/v2/device-requests/{prefix}{n % k}?async-id={async_id}"
            status, _ = await http.request("POST", target, body)
            accepts.append(time.monotonic() - t)
            statuses[f"post_{status}"] = statuses.get(f"post_{status}", 0) + 1
            if status == 202:
                with trio.move_on_after(10):
                    while async_id not in answers:
                        await answered.wait()
                if async_id not in answers:
                    statuses["unanswered_in_10s"] = statuses.get("unanswered_in_10s", 0) + 1
                commands.append(answers.pop(async_id, t + 10) - t)
            await trio.sleep(max(0.0, t + interval - time.monotonic()))

    async with trio.open_nursery() as nursery:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        print(json.dumps({"ready": True}), flush=True)
        buf = b""
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "channel":
                    http = await Http.open(port, key)
                    status, _ = await http.request("PUT", "/v2/notification/websocket")
                    await http.stream.aclose()
                    connected = trio.Event()
                    nursery.start_soon(reader, connected)
                    await connected.wait()
                    print(json.dumps({"phase": "channel", "status": status}), flush=True)
                elif words[0] == "probe":
                    gets.clear()
                    commands.clear()
                    accepts.clear()
                    stop = trio.Event()
                    nursery.start_soon(get_loop, float(words[1]))
                    nursery.start_soon(command_loop, float(words[2]), words[3], int(words[4]))
                elif words[0] == "stop":
                    stop.set()
                    await trio.sleep(0.5)
                    g, c, a = sorted(gets), sorted(commands), sorted(accepts)
                    print(json.dumps({
                        "phase": "probe", "gets": len(g), "get_p50_ms": _devices._ms(g, 0.5),
                        "get_p99_ms": _devices._ms(g, 0.99), "get_max_ms": _devices._ms(g, 1.0),
                        "commands": len(c), "command_p50_ms": _devices._ms(c, 0.5),
                        "command_max_ms": _devices._ms(c, 1.0),
                        "commands_over_2s": sum(1 for x in c if x > 2.0),
                        "accept_p50_ms": _devices._ms(a, 0.5),
                        "accept_max_ms": _devices._ms(a, 1.0),
                        "command_ms": [round(x * 1000) for x in commands],
                        "statuses": statuses, **events,
                    }), flush=True)  # fmt: skip
                elif words[0] == "quit":
                    nursery.cancel_scope.cancel()
                    return


def load_main(server: str) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, _, port = server.rpartition(":")
    os.set_blocking(0, False)
    Flood((host, int(port))).run()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--load":
    load_main(sys.argv[2])
    sys.exit(0)
if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--app":
    import trio

    trio.run(app_main, int(sys.argv[2]), sys.argv[3])
    sys.exit(0)


# -- the orchestration ------------------------------------------------------------------------


def udp_socket(port: int) -> tuple[int, int] | None:
    """(bytes waiting in the receive queue, the kernel's drop counter) of the UDP socket
    bound to `port`, from /proc/net/udp."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16), int(fields[-1])
    return None


def udp_drops(port: int) -> int:
    found = udp_socket(port)
    return 0 if found is None else found[1]


class QueueSampler:
    """The server socket's receive queue, sampled every 50 ms in a thread."""

    def __init__(self, port: int) -> None:
        import threading

        self.port = port
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            found = udp_socket(self.port)
            if found is not None:
                self.samples.append(found[0])

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        ordered = sorted(self.samples) or [0]
        return {"rx_queue_max_kib": round(ordered[-1] / 1024),
                "rx_queue_p50_kib": round(ordered[len(ordered) // 2] / 1024)}  # fmt: skip


def main() -> None:
    import _harness as h

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5000.0, help="Registers offered per s")
    parser.add_argument("--healthy", type=int, default=10, help="devices registered first")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds to wait for answers after the last Register")  # fmt: skip
    parser.add_argument("--get-interval", type=float, default=0.05)
    parser.add_argument("--command-interval", type=float, default=0.5)
    parser.add_argument("--store", choices=("memory", "sqlite"), default="sqlite")
    parser.add_argument("--profile", choices=("py-spy",))
    parser.add_argument("--retry-after", type=int,
                        help="[registration] retry_after: the Max-Age of a shed Register's 5.03 "
                             "(default: the server's, 60 s)")  # fmt: skip
    args = parser.parse_args()

    config = None
    if args.retry_after is not None:
        config = f"[registration]\nretry_after = {args.retry_after}\n"
    target = h.start_server(store=args.store, config=config)
    load = h.Proc([h.PYTHON, __file__, "--load", target.coap], h.LOAD_CPU, stdin=True,
                  name="flood-load")  # fmt: skip
    app = h.Proc([h.PYTHON, __file__, "--app", str(target.http_port), h.API_KEY], h.LOAD_CPU,
                 stdin=True, name="flood-app")  # fmt: skip
    try:
        load.read_json(30)
        app.read_json(30)
        healthy = load.ask(f"register {args.healthy} {args.healthy}", 60)
        assert healthy["done"] == args.healthy, healthy
        app.ask("channel", 30)
        drops0 = udp_drops(target.coap_port)
        rss0 = target.proc.rss()
        time.sleep(1.0)
        app.send(f"probe {args.get_interval} {args.command_interval} bench- {args.healthy}")
        if args.profile:
            h.attach_profiler(target, "flood")
        sampler = QueueSampler(target.coap_port)
        with h.Meter({"server": target.proc, "load": load, "app": app}) as meter:
            flood = load.ask(f"flood {args.devices} {args.rate} {args.grace}",
                             args.devices / args.rate + args.grace + 120)  # fmt: skip
        queue = sampler.stop()
        probe = app.ask("stop", 30)
        profile = None
        if target.profiler is not None:
            target.profiler.stop()
            profile = h.profile_report(target.profiler.out)
            target.profiler = None
        drops = udp_drops(target.coap_port) - drops0
        result: dict[str, Any] = {
            "benchmark": "flood", "store": args.store, "machine": h.machine(),
            "retry_after": args.retry_after,
            "flood": flood, "probe": probe, "kernel_drops": drops, **queue,
            "server_cpu_share": round(meter.share("server"), 3),
            "load_cpu_share": round(meter.share("load"), 3),
            "app_cpu_share": round(meter.share("app"), 3),
            "server_rss_mib": round(target.proc.rss() / 2**20, 1),
            "server_rss_growth_mib": round((target.proc.rss() - rss0) / 2**20, 1),
            "alive": target.proc.popen.poll() is None,
            "goal_get_p99": (probe.get("get_p99_ms") or 1e9) < 500,
            "goal_commands_2s": probe.get("commands_over_2s") == 0 and probe.get("commands", 0) > 0,
        }  # fmt: skip
        row = {**flood, **probe, "kernel_drops": drops, **queue,
               "refused": flood.get("devices_refused", 0),
               "server_cpu_share": result["server_cpu_share"]}  # fmt: skip
        h.emit(result, [row], ["devices", "offered_per_s", "sent_per_s", "registered", "refused",
                               "registered_per_s", "p99_ms", "retransmits", "gave_up",
                               "get_p50_ms", "get_p99_ms", "get_max_ms", "commands",
                               "command_p50_ms", "command_max_ms", "commands_over_2s",
                               "kernel_drops", "rx_queue_max_kib",
                               "server_cpu_share"])  # fmt: skip
        if profile:
            print(f"== profile: server during the flood\n{profile}", file=sys.stderr)
    finally:
        for proc in (app, load):
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.send("quit")
            proc.stop()
        target.stop()


if __name__ == "__main__":
    main()
