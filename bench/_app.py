"""The application side of the end-to-end benchmarks: REST over keep-alive connections with a
lean raw-socket HTTP/1.1 client, events from one WebSocket (trio-websocket, msgspec JSON).

Driven over stdin by the benchmark scripts, one command a line; each ends with one JSON line
on stdout:

    channel                                 PUT the WebSocket channel and connect to it
    subscribe PREFIX N PATH CONNECTIONS     PUT /v2/subscriptions/PREFIX-i/PATH, i < N
    commands PREFIX M RATE SECONDS CONNECTIONS
        GET /3/0/9 commands to PREFIX-(k % M): RATE per second in all for SECONDS (open
        loop, paced per connection; RATE 0: as fast as CONNECTIONS allow, closed loop);
        waits for every answer on the WebSocket (at most 15 s after the last 202)
    post PREFIX N CONNECTIONS               one command to each of N devices, no waiting
    expect N TIMEOUT                        until N async-responses arrived since `post`
    count                                   zero the notification counter
    notifications N TIMEOUT                 until N notifications arrived since `count`, or
                                            none for 2 s
    quit

Latency of a command: from just before its POST is written to the moment its
AsyncIDResponse is decoded from the WebSocket (the 202's own round trip is reported apart).

    python bench/_app.py HTTP_PORT API_KEY
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import msgspec
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

_decode = msgspec.json.Decoder().decode


class Http:
    """One keep-alive HTTP/1.1 connection: a request at a time, Content-Length bodies."""

    def __init__(self, stream: trio.SocketStream, key: str) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.auth = f"Authorization: Bearer {key}\r\nHost: bench\r\n".encode()

    @classmethod
    async def open(cls, port: int, key: str) -> Http:
        return cls(await trio.open_tcp_stream("127.0.0.1", port), key)

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {target} HTTP/1.1\r\n".encode() + self.auth
        if body:
            head += b"Content-Type: application/json\r\n"
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        await self.stream.send_all(head + body)
        return await self.response()

    async def response(self) -> tuple[int, bytes]:
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        header = bytes(buf[:end]).lower()
        del buf[: end + 4]
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        while len(buf) < length:
            await self._more()
        body = bytes(buf[:length])
        del buf[:length]
        return status, body

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data


class App:
    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.key = key
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.answered = 0
        self.statuses: dict[str, int] = {}
        self.notifications = 0
        self.first_notification = 0.0
        self.last_notification = 0.0
        self.last_event = 0.0
        self.messages = 0
        self.run_id = 0
        self.changed = trio.Event()

    # -- the WebSocket ----------------------------------------------------------------------

    async def channel(self, nursery: trio.Nursery) -> dict[str, Any]:
        http = await Http.open(self.port, self.key)
        status, _ = await http.request("PUT", "/v2/notification/websocket")
        await http.stream.aclose()
        connected = trio.Event()
        nursery.start_soon(self._reader, connected)
        await connected.wait()
        return {"phase": "channel", "status": status}

    async def _reader(self, connected: trio.Event) -> None:
        url = f"ws://127.0.0.1:{self.port}/v2/notification/websocket-connect"
        protocols = ["wss", f"pelion_{self.key}"]  # the key is ak_...
        async with open_websocket_url(url, subprotocols=protocols,
                                      message_queue_size=4096) as ws:  # fmt: skip
            connected.set()
            try:
                while True:
                    message = await ws.get_message()
                    self._on_message(message)
            except ConnectionClosed:
                return

    def _on_message(self, message: str | bytes) -> None:
        now = time.monotonic()
        self.messages += 1
        self.last_event = now
        event = _decode(message)
        responses = event.get("async-responses")
        if responses:
            sent_at = self.sent_at
            latencies = self.latencies
            for r in responses:
                t = sent_at.pop(r["id"], None)
                if t is not None:
                    latencies.append(now - t)
                    self.answered += 1
                    key = str(r.get("status"))
                    self.statuses[key] = self.statuses.get(key, 0) + 1
        notifications = event.get("notifications")
        if notifications:
            if not self.notifications:
                self.first_notification = now
            self.notifications += len(notifications)
            self.last_notification = now
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    async def _wait(self, done: Any, idle: float, limit: float) -> None:
        """Until `done()` or no event for `idle` seconds, at most `limit` seconds."""
        with trio.move_on_after(limit):
            while not done():
                with trio.move_on_after(idle) as scope:
                    await self.changed.wait()
                if scope.cancelled_caught:
                    return

    # -- REST -------------------------------------------------------------------------------

    async def subscribe(self, prefix: str, n: int, path: str, conns: int) -> dict[str, Any]:
        statuses: dict[int, int] = {}
        start = time.monotonic()

        async def worker(k: int) -> None:
            http = await Http.open(self.port, self.key)
            for i in range(k, n, conns):
                status, _ = await http.request("PUT", f"/v2/subscriptions/{prefix}-{i}{path}")
                statuses[status] = statuses.get(status, 0) + 1
            await http.stream.aclose()

        async with trio.open_nursery() as nursery:
            for k in range(conns):
                nursery.start_soon(worker, k)
        return {"phase": "subscribe", "statuses": statuses,
                "seconds": round(time.monotonic() - start, 3)}  # fmt: skip

    async def post(self, prefix: str, devices: int, count: int, rate: float, seconds: float,
                   conns: int) -> dict[str, Any]:  # fmt: skip
        """POST `count` commands over `conns` connections, paced at `rate` (0: unpaced)."""
        self.run_id += 1
        run = self.run_id
        body = b'{"method":"GET","uri":"/3/0/9"}'
        statuses: dict[int, int] = {}
        accept_times: list[float] = []
        sent_at = self.sent_at
        start = time.monotonic() + 0.05
        behind = 0

        async def worker(k: int) -> None:
            nonlocal behind
            http = await Http.open(self.port, self.key)
            for j in range(k, count, conns):
                if rate:
                    due = start + j / rate
                    now = time.monotonic()
                    if due > now:
                        await trio.sleep(due - now)
                    elif now - due > 0.01:
                        behind += 1
                async_id = f"r{run}-{j}"
                target = f"/v2/device-requests/{prefix}-{j % devices}?async-id={async_id}"
                t = sent_at[async_id] = time.monotonic()
                status, _ = await http.request("POST", target, body)
                accept_times.append(time.monotonic() - t)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 202:
                    sent_at.pop(async_id, None)
            await http.stream.aclose()

        cpu0 = time.process_time()
        async with trio.open_nursery() as nursery:
            for k in range(conns):
                nursery.start_soon(worker, k)
        posted = time.monotonic()
        return {"statuses": statuses, "post_seconds": posted - start, "accept": accept_times,
                "behind": behind, "cpu0": cpu0, "start": start}  # fmt: skip

    async def commands(self, prefix: str, devices: int, rate: float, seconds: float,
                       conns: int) -> dict[str, Any]:  # fmt: skip
        count = int(rate * seconds) if rate else int(seconds * 20000)
        self.latencies = []
        self.answered = 0
        self.statuses = {}
        if rate:
            posted = await self.post(prefix, devices, count, rate, seconds, conns)
        else:  # closed loop for `seconds`
            posted = await self._closed_loop(prefix, devices, seconds, conns)
        accepted = posted["statuses"].get(202, 0)
        await self._wait(lambda: self.answered >= accepted, 15.0, 15.0)
        end = time.monotonic()
        lat = sorted(self.latencies)
        acc = sorted(posted["accept"])
        wall = end - posted["start"]
        return {
            "phase": "commands",
            "offered_per_s": rate or None,
            "posted": sum(posted["statuses"].values()),
            "http_statuses": posted["statuses"],
            "answered": self.answered,
            "answer_statuses": self.statuses,
            "post_seconds": round(posted["post_seconds"], 3),
            "posted_per_s": round(sum(posted["statuses"].values()) / posted["post_seconds"], 1),
            "answered_per_s": round(self.answered / wall, 1),
            "e2e_p50_ms": _ms(lat, 0.5),
            "e2e_p99_ms": _ms(lat, 0.99),
            "e2e_max_ms": _ms(lat, 1.0),
            "accept_p50_ms": _ms(acc, 0.5),
            "accept_p99_ms": _ms(acc, 0.99),
            "late_sends": posted["behind"],
            "cpu_s": round(time.process_time() - posted["cpu0"], 3),
        }

    async def _closed_loop(self, prefix: str, devices: int, seconds: float,
                           conns: int) -> dict[str, Any]:  # fmt: skip
        """Each connection posts its next command as soon as the previous one is answered
        on the WebSocket (one command in flight per connection), for `seconds`."""
        self.run_id += 1
        run = self.run_id
        body = b'{"method":"GET","uri":"/3/0/9"}'
        statuses: dict[int, int] = {}
        accept_times: list[float] = []
        sent_at = self.sent_at
        start = time.monotonic()
        end = start + seconds
        cpu0 = time.process_time()
        counter = 0
        window = conns * 8

        async def worker(k: int) -> None:
            nonlocal counter
            http = await Http.open(self.port, self.key)
            while time.monotonic() < end:
                while len(sent_at) >= window:
                    await self.changed.wait()
                j = counter
                counter += 1
                async_id = f"r{run}-{j}"
                target = f"/v2/device-requests/{prefix}-{j % devices}?async-id={async_id}"
                t = sent_at[async_id] = time.monotonic()
                status, _ = await http.request("POST", target, body)
                accept_times.append(time.monotonic() - t)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 202:
                    sent_at.pop(async_id, None)
            await http.stream.aclose()

        async with trio.open_nursery() as nursery:
            for k in range(conns):
                nursery.start_soon(worker, k)
        return {"statuses": statuses, "post_seconds": time.monotonic() - start,
                "accept": accept_times, "behind": 0, "cpu0": cpu0, "start": start}  # fmt: skip

    # -- the command loop ---------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            stdin = trio.lowlevel.FdStream(0)
            print(json.dumps({"ready": True}), flush=True)
            buf = b""
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    words = line.decode().split()
                    if not words:
                        continue
                    if words[0] == "quit":
                        nursery.cancel_scope.cancel()
                        return
                    result = await self.command(words, nursery)
                    print(json.dumps(result), flush=True)
            nursery.cancel_scope.cancel()

    async def command(self, words: list[str], nursery: trio.Nursery) -> dict[str, Any]:
        name, a = words[0], words[1:]
        if name == "channel":
            return await self.channel(nursery)
        if name == "subscribe":
            return await self.subscribe(a[0], int(a[1]), a[2], int(a[3]))
        if name == "commands":
            return await self.commands(a[0], int(a[1]), float(a[2]), float(a[3]), int(a[4]))
        if name == "post":
            self.latencies = []
            self.answered = 0
            self.statuses = {}
            n = int(a[1])
            posted = await self.post(a[0], n, n, 0.0, 0.0, int(a[2]))
            return {"phase": "post", "http_statuses": posted["statuses"],
                    "seconds": round(posted["post_seconds"], 3)}  # fmt: skip
        if name == "expect":
            n, timeout = int(a[0]), float(a[1])
            start = time.monotonic()
            await self._wait(lambda: self.answered >= n, timeout, timeout)
            lat = sorted(self.latencies)
            return {"phase": "expect", "answered": self.answered, "statuses": self.statuses,
                    "seconds": round(time.monotonic() - start, 3), "p50_ms": _ms(lat, 0.5),
                    "p99_ms": _ms(lat, 0.99)}  # fmt: skip
        if name == "count":
            self.notifications = 0
            self.messages = 0
            return {"phase": "count"}
        if name == "notifications":
            n, timeout = int(a[0]), float(a[1])
            cpu0 = time.process_time()
            await self._wait(lambda: self.notifications >= n, 2.0, timeout)
            span = self.last_notification - self.first_notification
            return {"phase": "notifications", "received": self.notifications,
                    "messages": self.messages, "seconds": round(span, 4),
                    "rate": round(self.notifications / span, 1) if span > 0 else None,
                    "cpu_s": round(time.process_time() - cpu0, 3)}  # fmt: skip
        return {"error": f"unknown command {name}"}


def _ms(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 2)


if __name__ == "__main__":
    trio.run(App(int(sys.argv[1]), sys.argv[2]).run)
