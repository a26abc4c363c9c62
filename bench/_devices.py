"""Lean simulated devices for throughput runs: one process, one epoll loop, no Trio.

`dm_actor.sim` simulates real clients (objects, notification rules, queue-mode sockets) and
costs ~30 µs per exchange; to drive a server at 30k+ requests/s from one core the benchmarks
use this instead: Register and Update datagrams prebuilt, replies told apart by their token
(one byte of kind, three of device index), latency from the first send of a request to its
response. Devices share UDP sockets bound to `0.0.0.0`, one source address per device
(`127.0.0.2` + i % 254, sent with IP_PKTINFO), so the server sees each at its own address.

Driven over stdin by the benchmark scripts, one command a line; each command ends with one
JSON line on stdout:

    register N WINDOW [lifetime] [Q]   N new devices register, at most WINDOW in flight
    update WINDOW                      every registered device sends one Update
    notify RATE SECONDS                NON notifications on every observation, RATE/s in all
    sleep                              queue mode: ignore the server from now on
    wake WINDOW TIMEOUT                every device sends an Update, then waits for a request
    stats                              counters
    quit

Requests from the server are answered at once: GET with 2.05 (text, Max-Age 0 so that the
server does not serve the next GET from its cache; Observe=0 starts an observation),
PUT/POST with 2.04, DELETE with 2.02. Retransmits an unanswered request after 5 s.

    python bench/_devices.py HOST:PORT
"""

from __future__ import annotations

import array
import collections
import json
import os
import resource
import select
import socket
import struct
import sys
import time

from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message, decode, encode, path_options, query_options

_IP_PKTINFO = 8
_PKTINFO = struct.Struct("=I4s4s")
PER_SOCKET = 254
BASE = int.from_bytes(socket.inet_aton("127.0.0.2"), "big")
REGISTER, UPDATE, WAKE = 1, 2, 3
IDLE, PENDING, DONE = 0, 1, 2
TIMEOUT = 5.0
LINKS = b'</>;rt="oma.lwm2m";ct=110,</1/0>,</3/0>,</3303/0>,</3311/0>'
_CON, _NON, _ACK = 0, 1, 2
_OBSERVE, _CONTENT_FORMAT, _MAX_AGE = 6, 12, 14


class Devices:
    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.epoll = select.epoll()
        self.epoll.register(0, select.EPOLLIN)
        self.socks: list[socket.socket] = []
        self.by_fd: dict[int, int] = {}
        self.anc = [
            [(socket.IPPROTO_IP, _IP_PKTINFO,
              _PKTINFO.pack(0, (BASE + k).to_bytes(4, "big"), b"\0" * 4))]
            for k in range(PER_SOCKET)
        ]  # fmt: skip
        self.n = 0
        self.locations: list[tuple[str, ...]] = []
        self.mids = array.array("H")
        self.state = array.array("b")
        self.first = array.array("d")
        self.last = array.array("d")
        self.asleep = False
        self.woken = array.array("d")  # wake-up time while waiting for the first request
        self.observations: list[tuple[int, bytes]] = []
        self.obs_seq = 2
        self.counts = collections.Counter[str]()
        # the phase in progress
        self.phase = ""
        self.kind = 0
        self.todo: list[int] = []
        self.next = 0
        self.window = 0
        self.inflight = 0
        self.outstanding = 0
        self.retry: collections.deque[tuple[float, int]] = collections.deque()
        self.rtts = array.array("d")
        self.started = 0.0
        self.finished = 0.0
        self.cpu0 = 0.0
        self.deadline = 0.0
        self.rate = 0.0
        self.sent = 0
        self.messages: dict[int, bytes] = {}

    # -- devices and sockets ----------------------------------------------------------------

    def add(self, count: int) -> range:
        first = self.n
        for i in range(first, first + count):
            if i % PER_SOCKET == 0:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
                sock.bind(("0.0.0.0", 0))
                self.epoll.register(sock.fileno(), select.EPOLLIN)
                self.by_fd[sock.fileno()] = len(self.socks)
                self.socks.append(sock)
            self.locations.append(())
            self.mids.append((i * 7919) & 0xFFFF)
            self.state.append(IDLE)
            self.first.append(0.0)
            self.last.append(0.0)
            self.woken.append(0.0)
        self.n = first + count
        return range(first, first + count)

    def send(self, i: int, data: bytes) -> None:
        try:
            self.socks[i // PER_SOCKET].sendmsg([data], self.anc[i % PER_SOCKET], 0, self.server)
        except BlockingIOError:
            self.counts["send_full"] += 1

    def _mid(self, i: int) -> int:
        mid = self.mids[i] = (self.mids[i] + 1) & 0xFFFF
        return mid

    def _token(self, kind: int, i: int) -> bytes:
        return bytes((kind,)) + i.to_bytes(3, "big")

    def register_message(self, i: int, lifetime: int, queue: bool) -> bytes:
        query = f"ep=bench-{i}&lt={lifetime}&lwm2m=1.1&b=U" + ("&Q" if queue else "")
        options = (*path_options("/rd"), (_CONTENT_FORMAT, b"\x28"), *query_options(query))
        return encode(Message(_CON, 2, self._mid(i), self._token(REGISTER, i),
                              tuple(sorted(options, key=lambda o: o[0])), LINKS))  # fmt: skip

    def update_message(self, i: int, kind: int) -> bytes:
        options = tuple((11, s.encode()) for s in self.locations[i])
        return encode(Message(_CON, 2, self._mid(i), self._token(kind, i), options))

    # -- phases -----------------------------------------------------------------------------

    def begin(self, phase: str, kind: int, todo: list[int], window: int, timeout: float) -> None:
        self.phase, self.kind, self.todo = phase, kind, todo
        self.next = 0
        self.window = window
        self.inflight = 0
        self.outstanding = len(todo)
        self.rtts = array.array("d")
        self.retry.clear()
        self.counts["errors_" + phase] = 0
        self.cpu0 = time.process_time()
        self.started = time.monotonic()
        self.finished = self.started
        self.deadline = self.started + timeout
        self._fill()
        if not self.outstanding:
            self.end()

    def _fill(self) -> None:
        todo, messages = self.todo, self.messages
        now = time.monotonic()
        while self.inflight < self.window and self.next < len(todo):
            i = todo[self.next]
            self.next += 1
            self.inflight += 1
            self.state[i] = PENDING
            self.first[i] = self.last[i] = now
            data = messages.get(i)
            if data is None:
                data = messages[i] = self.update_message(i, self.kind)
            self.send(i, data)
            self.retry.append((now, i))
            if self.kind == WAKE:
                self.woken[i] = now

    def _answered(self, i: int, data: bytes, code: int, now: float) -> None:
        if self.state[i] != PENDING:
            return
        self.state[i] = DONE
        kind = self.kind
        if kind != WAKE:
            self.rtts.append(now - self.first[i])
            self.finished = now
        if kind == REGISTER:
            if code == 0x41:
                self.locations[i] = decode(data).location_path
            else:
                self.counts["errors_register"] += 1
        elif code != 0x44:
            self.counts["errors_" + self.phase] += 1
        if kind != WAKE:
            self.outstanding -= 1
        self.messages.pop(i, None)
        self.inflight -= 1
        self._fill()

    def _request(self, i: int, data: bytes, now: float) -> None:
        try:
            req = decode(data)
        except DecodeError:
            self.counts["bad_requests"] += 1
            return
        if self.asleep:
            self.counts["ignored_asleep"] += 1
            return
        self.counts["requests"] += 1
        if self.woken[i]:
            self.rtts.append(now - self.woken[i])
            self.woken[i] = 0.0
            self.outstanding -= 1
            self.finished = now
        code = req.code
        options: tuple[tuple[int, bytes], ...] = ()
        payload = b""
        if code == 1:
            observe = req.observe
            options = ((_CONTENT_FORMAT, b""), (_MAX_AGE, b""))
            payload = b"87"
            if observe == 0:
                self.observations.append((i, req.token))
                options = ((_OBSERVE, b"\x01"), *options)
            result = 0x45
        elif code in (2, 3):
            result = 0x44
        else:
            result = 0x42
        self.send(i, encode(Message(_ACK, result, req.mid, req.token, options, payload)))

    def _timers(self, now: float) -> None:
        retry = self.retry
        while retry and retry[0][0] + TIMEOUT <= now:
            sent, i = retry.popleft()
            if self.state[i] == PENDING and self.last[i] == sent:
                self.counts["retransmits"] += 1
                self.last[i] = now
                data = self.messages.get(i)
                if data is not None:
                    self.send(i, data)
                retry.append((now, i))
        if self.phase and (not self.outstanding or now >= self.deadline):
            self.end()

    def end(self) -> None:
        phase = self.phase
        self.phase = ""
        seconds = max(self.finished - self.started, 1e-9)
        rtts = sorted(self.rtts)
        done = len(rtts)
        result: dict[str, object] = {
            "phase": phase,
            "done": done,
            "expected": len(self.todo),
            "seconds": round(seconds, 4),
            "rate": round(done / seconds, 1),
            "p50_ms": _ms(rtts, 0.50),
            "p99_ms": _ms(rtts, 0.99),
            "max_ms": round(rtts[-1] * 1000, 2) if rtts else None,
            "cpu_s": round(time.process_time() - self.cpu0, 3),
            "errors": self.counts["errors_" + phase],
            "retransmits": self.counts["retransmits"],
        }
        self.messages.clear()
        self.todo = []
        print(json.dumps(result), flush=True)

    def notify(self, rate: float, seconds: float) -> None:
        """Open loop: notifications at `rate` per second over every observation."""
        observations = self.observations
        cpu0 = time.process_time()
        start = time.monotonic()
        end = start + seconds
        sent = 0
        k = 0
        count = len(observations)
        head = bytes((0x50 | 4,)) + b"\x45"
        while count:
            now = time.monotonic()
            if now >= end:
                break
            due = min(int((now - start) * rate), int(seconds * rate)) - sent
            for _ in range(due):
                i, token = observations[k]
                k = k + 1 if k + 1 < count else 0
                if len(token) != 4:
                    continue
                mid = self.mids[i] = (self.mids[i] + 1) & 0xFFFF
                self.obs_seq = seq = (self.obs_seq + 1) & 0xFFFFFF
                options = b"\x63" + seq.to_bytes(3, "big") + b"\x60\xff"
                self.send(i, head + mid.to_bytes(2, "big") + token + options + b"%d" % sent)
                sent += 1
            self.poll(0.0005)
        seconds_taken = time.monotonic() - start
        self.counts["notifications"] += sent
        print(json.dumps({"phase": "notify", "sent": sent, "seconds": round(seconds_taken, 4),
                          "rate": round(sent / seconds_taken, 1),
                          "cpu_s": round(time.process_time() - cpu0, 3)}), flush=True)  # fmt: skip

    # -- the loop ---------------------------------------------------------------------------

    def poll(self, timeout: float) -> bool:
        """Wait up to `timeout` and handle what arrived; False when stdin closed."""
        alive = True
        for fd, _ in self.epoll.poll(timeout, 1024):
            if fd == 0:
                alive = self._commands()
            else:
                self._drain(fd)
        return alive

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
            if mtype == _ACK and code >= 64 and b0 & 15 == 4:
                i = int.from_bytes(data[5:8], "big")
                if data[4] == self.kind and i < self.n:
                    self._answered(i, data, code, now)
            elif mtype == _CON and 1 <= code <= 31:
                offset = int.from_bytes(anc[0][2][8:12], "big") - BASE if anc else -1
                i = k * PER_SOCKET + offset
                if 0 <= offset < PER_SOCKET and i < self.n:
                    self._request(i, data, now)
            elif mtype == 3:
                self.counts["resets"] += 1

    _buffer = b""

    def _commands(self) -> bool:
        chunk = os.read(0, 65536)
        if not chunk:
            return False
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = rest
        alive = True
        for line in lines:
            alive = self.command(line.decode().split()) and alive
        return alive

    def command(self, words: list[str]) -> bool:
        name, args = words[0], words[1:]
        if name == "register":
            count, window = int(args[0]), int(args[1])
            lifetime = int(args[2]) if len(args) > 2 else 86400
            queue = len(args) > 3 and args[3] == "Q"
            new = self.add(count)
            self.messages = {i: self.register_message(i, lifetime, queue) for i in new}
            self.begin("register", REGISTER, list(new), window, 240.0)
        elif name == "update":
            todo = [i for i in range(self.n) if self.locations[i]]
            self.begin("update", UPDATE, todo, int(args[0]), 240.0)
        elif name == "notify":
            self.notify(float(args[0]), float(args[1]))
        elif name == "sleep":
            self.asleep = True
            print(json.dumps({"phase": "sleep", "devices": self.n}), flush=True)
        elif name == "wake":
            self.asleep = False
            todo = [i for i in range(self.n) if self.locations[i]]
            self.begin("wake", WAKE, todo, int(args[0]), float(args[1]))
        elif name == "stats":
            print(json.dumps({"phase": "stats", "devices": self.n,
                              "registered": sum(1 for loc in self.locations if loc),
                              "observations": len(self.observations),
                              **self.counts}), flush=True)  # fmt: skip
        elif name == "quit":
            return False
        return True

    def run(self) -> None:
        print(json.dumps({"ready": True}), flush=True)
        while self.poll(0.05 if self.phase else 1.0):
            self._timers(time.monotonic())


def _ms(ordered: array.array[float] | list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 2)


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, _, port = sys.argv[1].rpartition(":")
    os.set_blocking(0, False)
    Devices((host, int(port))).run()


if __name__ == "__main__":
    main()
