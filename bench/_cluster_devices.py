"""Raw CoAP devices for `bench/cluster.py`: one process, one epoll loop, no Trio.

Like `_devices.py` (prebuilt Register/Update datagrams, replies told apart by their token,
devices sharing sockets, one source address per device sent with IP_PKTINFO, here from
127.0.1.1 + i % 254), with what a cluster run needs besides:

- each device sends to one of several server addresses (`aim`: the owner of its slot, or on
  purpose a node that is not), and answers a server's request to the address it came from
  (after a failover the new owner sends from its own address);
- a device executes a request once: a request repeating a Message ID it saw (RFC 7252
  deduplication, keyed by Message ID per device) is answered from its cache of the last 8
  answers, never executed again;
- it counts executions per command: a PUT's payload is the async-id the benchmark gave the
  command, so `stats` tells how many ids were executed once and how many more than once;
- a Register or Update answered 5.03 is sent again (a new Message ID) after its Max-Age
  (1-30 s), within the phase's time;
- `mute 1` drops every server request unseen (a device out of reach), `mute 0` ends it.

Driven over stdin, one command a line, each ending with one JSON line on stdout:

    register PREFIX N WINDOW [AIMFILE]   N new devices PREFIX-i register (at most WINDOW in
                                         flight); AIMFILE: one server index a line per device
    aim AIMFILE                          where each device sends from now on
    update WINDOW                        every registered device sends one Update
    mute 0|1
    stats
    quit

    python bench/_cluster_devices.py HOST:PORT [HOST:PORT ...]
"""

from __future__ import annotations

import array
import collections
import heapq
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from pathlib import Path

from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message, decode, encode, path_options, query_options

_IP_PKTINFO = 8
_PKTINFO = struct.Struct("=I4s4s")
PER_SOCKET = 254
BASE = int.from_bytes(socket.inet_aton("127.0.1.1"), "big")
REGISTER, UPDATE = 1, 2
IDLE, PENDING, DONE = 0, 1, 2
TIMEOUT = 3.0
CACHE = 8  # answers remembered per device (deduplication)
LINKS = b'</>;rt="oma.lwm2m";ct=110,</1/0>,</3/0>,</3303/0>'
_CON, _ACK = 0, 2
_CONTENT_FORMAT, _MAX_AGE = 12, 14


class Devices:
    def __init__(self, servers: list[tuple[str, int]]) -> None:
        self.servers = servers
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
        self.names: list[str] = []
        self.aim = array.array("B")
        self.locations: list[tuple[bytes, ...]] = []
        self.mids = array.array("H")
        self.state = array.array("b")
        self.first = array.array("d")
        self.last = array.array("d")
        self.seen: list[collections.OrderedDict[int, bytes] | None] = []
        self.executions: collections.Counter[bytes] = collections.Counter()
        self.muted = False
        self.counts: collections.Counter[str] = collections.Counter()
        self.phase = ""
        self.kind = 0
        self.todo: list[int] = []
        self.messages: dict[int, bytes] = {}
        self.retry: collections.deque[tuple[float, int]] = collections.deque()
        self.later: list[tuple[float, int]] = []
        self.unavailable = 0

    def add(self, prefix: str, count: int) -> range:
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
            self.names.append(f"{prefix}-{i - first}")
            self.aim.append(0)
            self.locations.append(())
            self.mids.append((i * 7919) & 0xFFFF)
            self.state.append(IDLE)
            self.first.append(0.0)
            self.last.append(0.0)
            self.seen.append(None)
        self.n = first + count
        return range(first, first + count)

    def set_aim(self, path: str, devices: range) -> None:
        lines = Path(path).read_text().split()
        for i, line in zip(devices, lines, strict=False):
            self.aim[i] = int(line)

    def send(self, i: int, data: bytes, to: tuple[str, int] | None = None) -> None:
        try:
            self.socks[i // PER_SOCKET].sendmsg(
                [data], self.anc[i % PER_SOCKET], 0, to or self.servers[self.aim[i]]
            )
        except BlockingIOError:
            self.counts["send_full"] += 1

    def _mid(self, i: int) -> int:
        mid = self.mids[i] = (self.mids[i] + 1) & 0xFFFF
        return mid

    def register_message(self, i: int) -> bytes:
        query = f"ep={self.names[i]}&lt=86400&lwm2m=1.1&b=U"
        options = (*path_options("/rd"), (_CONTENT_FORMAT, b"\x28"), *query_options(query))
        token = bytes((REGISTER,)) + i.to_bytes(3, "big")
        return encode(Message(_CON, 2, self._mid(i), token,
                              tuple(sorted(options, key=lambda o: o[0])), LINKS))  # fmt: skip

    def update_message(self, i: int) -> bytes:
        options = tuple((11, s) for s in self.locations[i])
        token = bytes((UPDATE,)) + i.to_bytes(3, "big")
        return encode(Message(_CON, 2, self._mid(i), token, options))

    # -- phases -----------------------------------------------------------------------------

    def begin(self, phase: str, kind: int, todo: list[int], window: int, timeout: float) -> None:
        self.phase, self.kind, self.todo = phase, kind, todo
        self.next = 0
        self.window = window
        self.inflight = 0
        self.outstanding = len(todo)
        self.rtts = array.array("d")
        self.retry.clear()
        self.errors: collections.Counter[int] = collections.Counter()
        self.retransmits = 0
        self.unavailable = 0
        self.later = []
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
                data = messages[i] = self.update_message(i)
            self.send(i, data)
            self.retry.append((now, i))

    def _answered(self, i: int, data: bytes, code: int, now: float) -> None:
        if self.state[i] != PENDING:
            return
        if code == 0xA3:  # 5.03: sent again (a new Message ID) after Max-Age, as a device would
            self.unavailable += 1
            self.last[i] = -1.0  # (its retransmission timer is off)
            delay = max(1, min(decode(data).max_age, 30))
            heapq.heappush(self.later, (now + delay, i))
            return
        self.state[i] = DONE
        self.rtts.append(now - self.first[i])
        self.finished = now
        if self.kind == REGISTER and code == 0x41:
            self.locations[i] = tuple(s.encode() for s in decode(data).location_path)
        elif (self.kind == REGISTER) or code != 0x44:
            self.errors[code] += 1
        self.outstanding -= 1
        self.messages.pop(i, None)
        self.inflight -= 1
        self._fill()

    def _request(self, i: int, data: bytes, source: tuple[str, int]) -> None:
        if self.muted:
            self.counts["dropped_muted"] += 1
            return
        try:
            req = decode(data)
        except DecodeError:
            self.counts["bad_requests"] += 1
            return
        seen = self.seen[i]
        if seen is None:
            seen = self.seen[i] = collections.OrderedDict()
        cached = seen.get(req.mid)
        if cached is not None:  # a retransmission: answered again, not executed again
            self.counts["duplicates"] += 1
            self.send(i, cached, source)
            return
        self.counts["requests"] += 1
        options: tuple[tuple[int, bytes], ...] = ()
        payload = b""
        if req.code == 1:  # GET
            options = ((_CONTENT_FORMAT, b""), (_MAX_AGE, b""))
            payload = b"87"
            result = 0x45
        elif req.code == 3:  # PUT: the payload names the command
            self.executions[req.payload] += 1
            result = 0x44
        elif req.code == 2:
            result = 0x44
        else:
            result = 0x42
        answer = encode(Message(_ACK, result, req.mid, req.token, options, payload))
        seen[req.mid] = answer
        if len(seen) > CACHE:
            seen.popitem(last=False)
        self.send(i, answer, source)

    def _timers(self, now: float) -> None:
        later = self.later
        while later and later[0][0] <= now:
            _, i = heapq.heappop(later)
            if self.state[i] == PENDING:
                register = self.kind == REGISTER
                again = self.register_message(i) if register else self.update_message(i)
                self.messages[i] = again
                self.last[i] = now
                self.send(i, again)
                self.retry.append((now, i))
        retry = self.retry
        while retry and retry[0][0] + TIMEOUT <= now:
            sent, i = retry.popleft()
            if self.state[i] == PENDING and self.last[i] == sent:
                self.retransmits += 1
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
            "cpu_s": round(time.process_time() - self.cpu0, 3),
            "errors": {f"{c >> 5}.{c & 31:02}": k for c, k in self.errors.items()},
            "retransmits": self.retransmits,
            "answered_503_and_sent_again": self.unavailable,
        }
        self.messages.clear()
        self.todo = []
        print(json.dumps(result), flush=True)

    # -- the loop ---------------------------------------------------------------------------

    def poll(self, timeout: float) -> bool:
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
        now = time.monotonic()
        for _ in range(512):
            try:
                data, anc, _, source = sock.recvmsg(2048, 64)
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
                    self._request(i, data, source)
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
            if line.strip():
                alive = self.command(line.decode().split()) and alive
        return alive

    def command(self, words: list[str]) -> bool:
        name, args = words[0], words[1:]
        if name == "register":
            new = self.add(args[0], int(args[1]))
            if len(args) > 3:
                self.set_aim(args[3], new)
            self.messages = {i: self.register_message(i) for i in new}
            self.begin("register", REGISTER, list(new), int(args[2]), 240.0)
        elif name == "aim":
            self.set_aim(args[0], range(self.n))
            print(json.dumps({"phase": "aim"}), flush=True)
        elif name == "update":
            todo = [i for i in range(self.n) if self.locations[i]]
            self.begin("update", UPDATE, todo, int(args[0]), 240.0)
        elif name == "mute":
            self.muted = args[0] == "1"
            print(json.dumps({"phase": "mute", "muted": self.muted}), flush=True)
        elif name == "stats":
            twice = [k.decode(errors="replace") for k, v in self.executions.items() if v > 1]
            print(json.dumps({"phase": "stats", "devices": self.n,
                              "registered": sum(1 for loc in self.locations if loc),
                              "executed_ids": len(self.executions),
                              "executions": sum(self.executions.values()),
                              "executed_more_than_once": len(twice),
                              "examples_more_than_once": twice[:5],
                              **self.counts}), flush=True)  # fmt: skip
        elif name == "quit":
            return False
        return True

    def run(self) -> None:
        print(json.dumps({"ready": True}), flush=True)
        while self.poll(0.05 if self.phase else 0.5):
            self._timers(time.monotonic())


def _ms(ordered: array.array[float] | list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000, 2)


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    servers = []
    for arg in sys.argv[1:]:
        host, _, port = arg.rpartition(":")
        servers.append((host, int(port)))
    os.set_blocking(0, False)
    Devices(servers).run()


if __name__ == "__main__":
    main()
