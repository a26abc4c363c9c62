"""The application side of `bench/cluster.py`: commands POSTed over the HTTP ports of every
node (keep-alive connections, `_app.Http`), AsyncIDResponses read from one WebSocket channel
(attached to one node; in a cluster the events are relayed to the node it is attached to).

Each command is `PUT /3/0/14` with the async-id as its payload, so the devices
(`_cluster_devices.py`) count executions per async-id. A POST answered 502/503/504 (no owner
yet, during a failover) is retried after 0.1 s until it gets another status or `TIMEOUT` passes.

Driven over stdin, one command a line, each ending with one JSON line on stdout:

    channel NODE                                PUT the WebSocket channel via node NODE (an
                                                index), connect its WebSocket there
    commands PREFIX N COUNT CONNS TIMEOUT [FILE]
                                                COUNT commands to PREFIX-(j % N) by CONNS
                                                workers (worker k to node k % nodes, or with
                                                FILE, one node index a line per device, to
                                                the device's node; one POST in flight each);
                                                then wait for every answer (until none came
                                                for TIMEOUT s)
    batch TAG PREFIX FILE                       one command to each device of FILE (one index
                                                a line), no waiting for answers
    wait TAG T0 TIMEOUT                         until every accepted command of batch TAG is
                                                answered (or TIMEOUT); first/last answer - T0
    stats
    quit

    python bench/_cluster_app.py API_KEY HOST:PORT[,HOST:PORT...]    (the nodes' HTTP)
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import time
from typing import Any

import msgspec
import trio
from _app import Http, _ms
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

_decode = msgspec.json.Decoder().decode
RETRY = {502, 503, 504}


class Conn:
    """A keep-alive connection to node `k % live nodes`; a node that refuses or drops the
    connection is taken as dead and the request is sent again to the next one (the same
    async-id: a repeat is never executed twice)."""

    def __init__(self, app: App, k: int) -> None:
        self.app, self.k = app, k
        self.http: Http | None = None
        self.node: tuple[str, int] | None = None

    async def request(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        while True:
            try:
                if self.http is None:
                    live = [n for n in self.app.nodes if n not in self.app.dead]
                    self.node = live[self.k % len(live)]
                    self.http = Http(await trio.open_tcp_stream(*self.node), self.app.key)
                return await self.http.request(method, target, body)
            except (OSError, trio.BrokenResourceError, ConnectionError):
                assert self.node is not None
                self.app.dead.add(self.node)
                self.app.reconnects += 1
                self.http = None
                await trio.sleep(0.05)

    async def aclose(self) -> None:
        if self.http is not None:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await self.http.stream.aclose()


class App:
    def __init__(self, key: str, nodes: list[tuple[str, int]]) -> None:
        self.key = key
        self.nodes = nodes
        self.dead: set[tuple[str, int]] = set()
        self.reconnects = 0
        self.ws_reconnects = 0
        self.accept_times: list[float] = []  # POST written -> its answer (of every try)
        self.sent_at: dict[str, float] = {}
        self.answered_at: dict[str, float] = {}
        self.answer_status: dict[str, int] = {}
        self.duplicates = 0
        self.unknown = 0
        self.messages = 0
        self.changed = trio.Event()
        self.batches: dict[str, list[str]] = {}
        self.run_id = 0

    async def open(self, node: tuple[str, int]) -> Http:
        return Http(await trio.open_tcp_stream(*node), self.key)

    async def channel(self, index: int, nursery: trio.Nursery) -> dict[str, Any]:
        http = await self.open(self.nodes[index])
        status, _ = await http.request("PUT", "/v2/notification/websocket")
        await http.stream.aclose()
        connected = trio.Event()
        nursery.start_soon(self._reader, self.nodes[index], connected)
        await connected.wait()
        return {"phase": "channel", "status": status}

    async def _reader(self, node: tuple[str, int], connected: trio.Event) -> None:
        """The channel's WebSocket; when it closes (its node died), connected again to the
        next live node every 0.2 s (the events not yet delivered are delivered there)."""
        k = self.nodes.index(node)
        while True:
            url = f"ws://{node[0]}:{node[1]}/v2/notification/websocket-connect"
            try:
                async with open_websocket_url(url, subprotocols=["wss", f"pelion_{self.key}"],
                                              message_queue_size=4096) as ws:  # fmt: skip
                    connected.set()
                    while True:
                        self._on_message(await ws.get_message())
            except (ConnectionClosed, OSError, HandshakeError, trio.BrokenResourceError):
                self.ws_reconnects += 1
            await trio.sleep(0.2)
            live = [n for n in self.nodes if n not in self.dead]
            k += 1
            node = live[k % len(live)]

    def _on_message(self, message: str | bytes) -> None:
        now = time.monotonic()
        self.messages += 1
        for r in _decode(message).get("async-responses") or ():
            async_id = r["id"]
            if async_id in self.answered_at:
                self.duplicates += 1
            elif async_id not in self.sent_at:
                self.unknown += 1
            else:
                self.answered_at[async_id] = now
                self.answer_status[async_id] = r.get("status", 0)
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    async def _post(self, http: Conn, device: str, async_id: str, retry_for: float,
                    statuses: dict[int, int]) -> bool:  # fmt: skip
        """POST one command (retrying 502/503/504); True when accepted."""
        payload = base64.b64encode(async_id.encode()).decode()
        body = json.dumps({"method": "PUT", "uri": "/3/0/14", "content-type": "text/plain",
                           "payload-b64": payload})  # fmt: skip
        target = f"/v2/device-requests/{device}?async-id={async_id}"
        sent = self.sent_at.setdefault(async_id, time.monotonic())
        deadline = time.monotonic() + retry_for
        while True:
            status, _ = await http.request("POST", target, body.encode())
            self.accept_times.append(time.monotonic() - sent)
            if status in RETRY and time.monotonic() < deadline:
                statuses[-status] = statuses.get(-status, 0) + 1  # (retried: negative)
                await trio.sleep(0.1)
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status != 202:
                self.sent_at.pop(async_id, None)
            return status == 202

    async def _wait(self, ids: list[str], idle: float, limit: float) -> None:
        """Until every id in `ids` is answered, or no event for `idle` s, at most `limit` s."""
        answered = self.answered_at
        with trio.move_on_after(limit):
            while any(i not in answered for i in ids):
                with trio.move_on_after(idle) as scope:
                    await self.changed.wait()
                if scope.cancelled_caught:
                    return

    async def commands(self, prefix: str, devices: int, count: int, conns: int,
                       patience: float, owners: str | None) -> dict[str, Any]:  # fmt: skip
        owner = ([int(x) for x in (await trio.Path(owners).read_text()).split()]
                 if owners else None)  # fmt: skip
        self.run_id += 1
        run = self.run_id
        self.accept_times = []
        statuses: dict[int, int] = {}
        accepted: list[str] = []
        start = time.monotonic()
        counter = 0

        async def worker(k: int) -> None:
            nonlocal counter
            https: dict[int, Conn] = {}
            while counter < count:
                j = counter
                counter += 1
                async_id = f"c{run}-{j}"
                n = k if owner is None else owner[j % devices]
                http = https.get(n) or https.setdefault(n, Conn(self, n))
                if await self._post(http, f"{prefix}-{j % devices}", async_id, patience,
                                    statuses):  # fmt: skip
                    accepted.append(async_id)
            for http in https.values():
                await http.aclose()

        async with trio.open_nursery() as nursery:
            for k in range(max(conns, len(self.nodes))):
                nursery.start_soon(worker, k)
        posted = time.monotonic()
        await self._wait(accepted, patience, patience * 4)
        return self._summary("commands", accepted, statuses, start, posted)

    def _summary(self, phase: str, accepted: list[str], statuses: dict[int, int],
                 start: float, posted: float) -> dict[str, Any]:  # fmt: skip
        answered = [i for i in accepted if i in self.answered_at]
        lat = sorted(self.answered_at[i] - self.sent_at[i] for i in answered)
        last = max((self.answered_at[i] for i in answered), default=posted)
        answer_statuses: dict[str, int] = {}
        for i in answered:
            key = str(self.answer_status[i])
            answer_statuses[key] = answer_statuses.get(key, 0) + 1
        return {
            "phase": phase,
            "posted": sum(v for k, v in statuses.items() if k > 0),
            "accepted": len(accepted),
            "answered": len(answered),
            "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
            "answer_statuses": answer_statuses,
            "duplicate_answers": self.duplicates,
            "unknown_answers": self.unknown,
            "post_seconds": round(posted - start, 3),
            "seconds": round(last - start, 3),
            "rate": round(len(answered) / max(last - start, 1e-9), 1),
            "p50_ms": _ms(lat, 0.5),
            "p99_ms": _ms(lat, 0.99),
            "max_ms": _ms(lat, 1.0),
            "post_p50_ms": _ms(sorted(self.accept_times), 0.5),
            "post_p99_ms": _ms(sorted(self.accept_times), 0.99),
        }

    async def batch(self, tag: str, prefix: str, path: str, limit: float) -> dict[str, Any]:
        """One command to each device listed in `path`, over the nodes in turn."""
        indexes = [int(x) for x in (await trio.Path(path).read_text()).split()]
        statuses: dict[int, int] = {}
        accepted: list[str] = []
        start = time.monotonic()
        todo = list(enumerate(indexes))
        refused: list[str] = []

        async def worker(k: int) -> None:
            http = Conn(self, k)
            while todo:
                j, i = todo.pop()
                async_id = f"{tag}-{j}"
                left = start + limit - time.monotonic()
                if await self._post(http, f"{prefix}-{i}", async_id, left, statuses):
                    accepted.append(async_id)
                else:
                    refused.append(f"{prefix}-{i}")
            await http.aclose()

        async with trio.open_nursery() as nursery:
            for k in range(4 * len(self.nodes)):
                nursery.start_soon(worker, k)
        self.batches[tag] = accepted
        first_202 = min((self.sent_at[i] for i in accepted), default=start)
        return {"phase": "batch", "tag": tag, "accepted": len(accepted), "refused": refused,
                "http_statuses": {str(k): v for k, v in sorted(statuses.items())},
                "seconds": round(time.monotonic() - start, 3),
                "first_sent": first_202}  # fmt: skip

    async def wait(self, tag: str, t0: float, limit: float) -> dict[str, Any]:
        accepted = self.batches[tag]
        start = time.monotonic()
        await self._wait(accepted, limit, limit)
        times = sorted(self.answered_at[i] - t0 for i in accepted if i in self.answered_at)
        return {"phase": "wait", "tag": tag, "accepted": len(accepted), "answered": len(times),
                "first_s": round(times[0], 3) if times else None,
                "last_s": round(times[-1], 3) if times else None,
                "waited_s": round(time.monotonic() - start, 3),
                "duplicate_answers": self.duplicates}  # fmt: skip

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
                    print(json.dumps(await self.command(words, nursery)), flush=True)
            nursery.cancel_scope.cancel()

    async def command(self, words: list[str], nursery: trio.Nursery) -> dict[str, Any]:
        name, a = words[0], words[1:]
        if name == "channel":
            return await self.channel(int(a[0]), nursery)
        if name == "commands":
            owners = a[5] if len(a) > 5 else None
            return await self.commands(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), owners)
        if name == "batch":
            return await self.batch(a[0], a[1], a[2], float(a[3]) if len(a) > 3 else 60.0)
        if name == "wait":
            return await self.wait(a[0], float(a[1]), float(a[2]))
        if name == "stats":
            return {"phase": "stats", "sent": len(self.sent_at),
                    "answered": len(self.answered_at), "duplicate_answers": self.duplicates,
                    "unknown_answers": self.unknown, "messages": self.messages,
                    "reconnects": self.reconnects, "ws_reconnects": self.ws_reconnects}  # fmt: skip
        return {"error": f"unknown command {name}"}


if __name__ == "__main__":
    nodes = [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in sys.argv[2].split(",")]
    trio.run(App(sys.argv[1], nodes).run)
