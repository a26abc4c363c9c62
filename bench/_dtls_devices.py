"""Lean simulated devices over DTLS (coaps://): `_devices.py`'s devices, each with its own
DTLS 1.2 PSK session made with the project's `DtlsClient`.

The same commands and answers as `_devices.py` (see there), with two differences:

- `register N WINDOW ...` first shakes hands for the N new devices (at most
  `HANDSHAKE_WINDOW` at once: the server keeps 8 half-open handshakes per source address),
  then registers them over their sessions; its JSON line adds `handshakes_s` and
  `handshake_failures`.
- Endpoint names are `PREFIX-I` (`--prefix`, default `sec`), PSK identity the same name and
  key `HMAC-SHA256(SECRET, name)[:16]` (`dm_actor.sim.secure.derived_key`): the server must
  have them (`dtls_commands.py` PUTs them with an admin key first).

Every datagram a device sends is sealed on its session; every one it receives is opened
(records that do not open are counted: `dtls_dropped`).

    python bench/_dtls_devices.py HOST:COAPS_PORT [PREFIX] [SECRET]
"""

from __future__ import annotations

import collections
import os
import resource
import sys
import time
from typing import TYPE_CHECKING

from _devices import _ACK, _CON, _CONTENT_FORMAT, BASE, LINKS, PER_SOCKET, REGISTER, Devices

from dm_actor.coap.message import Message, encode, path_options, query_options
from dm_actor.dtls import DatagramToSend, DtlsClient, HandshakeFailed, Session, SessionEstablished
from dm_actor.dtls.record import ContentType
from dm_actor.sim.secure import derived_key, open_records

if TYPE_CHECKING:
    from collections.abc import Sequence

    from dm_actor.dtls import Event

HANDSHAKE_WINDOW = 8
_APPLICATION_DATA = ContentType.APPLICATION_DATA.value


class DtlsDevices(Devices):
    def __init__(self, server: tuple[str, int], prefix: str, secret: bytes) -> None:
        super().__init__(server)
        self.prefix = prefix
        self.secret = secret
        self.sessions: list[Session | None] = []
        self._ready: range | None = None

    def add(self, count: int) -> range:
        if self._ready is not None:  # made and shaken hands with by `command`
            new, self._ready = self._ready, None
            return new
        new = super().add(count)
        self.sessions.extend([None] * count)
        return new

    def raw_send(self, i: int, data: bytes) -> None:
        super().send(i, data)

    def send(self, i: int, data: bytes) -> None:
        session = self.sessions[i]
        if session is None:
            self.counts["no_session"] += 1
            return
        super().send(i, session.seal(_APPLICATION_DATA, data))

    def register_message(self, i: int, lifetime: int, queue: bool) -> bytes:
        query = f"ep={self.prefix}-{i}&lt={lifetime}&lwm2m=1.1&b=U" + ("&Q" if queue else "")
        options = (*path_options("/rd"), (_CONTENT_FORMAT, b"\x28"), *query_options(query))
        return encode(Message(_CON, 2, self._mid(i), self._token(REGISTER, i),
                              tuple(sorted(options, key=lambda o: o[0])), LINKS))  # fmt: skip

    # -- handshakes ---------------------------------------------------------------------------

    def handshake(self, todo: list[int], timeout: float = 120.0) -> None:
        """Shake hands for `todo`, at most HANDSHAKE_WINDOW at once."""
        start = time.monotonic()
        waiting = collections.deque(todo)
        active: dict[int, DtlsClient] = {}
        while (waiting or active) and time.monotonic() - start < timeout:
            now = time.monotonic()
            while waiting and len(active) < HANDSHAKE_WINDOW:
                i = waiting.popleft()
                name = f"{self.prefix}-{i}"
                client = DtlsClient(self.server, name.encode(), derived_key(self.secret, name),
                                    connection_id=b"")  # fmt: skip
                active[i] = client
                self._handshake_events(i, client.connect(now), active)
            for fd, _ in self.epoll.poll(0.01, 1024):
                if fd == 0:
                    continue  # commands wait until this one is done
                k = self.by_fd[fd]
                sock = self.socks[k]
                while True:
                    try:
                        data, anc, _, _ = sock.recvmsg(2048, 64)
                    except BlockingIOError:
                        break
                    j = self._index(k, anc)
                    found = active.get(j) if j is not None else None
                    if j is not None and found is not None:
                        self._handshake_events(j, found.receive(data, time.monotonic()), active)
            now = time.monotonic()
            for i, client in list(active.items()):
                timer = client.get_timer()
                if timer is not None and timer <= now:
                    self._handshake_events(i, client.handle_timer(now), active)
        self.counts["handshake_failures"] += len(active) + len(waiting)
        self.counts["handshakes_ms"] += round((time.monotonic() - start) * 1000)

    def _handshake_events(
        self, i: int, events: Sequence[Event], active: dict[int, DtlsClient]
    ) -> None:
        for event in events:
            if isinstance(event, DatagramToSend):
                self.raw_send(i, event.data)
            elif isinstance(event, SessionEstablished):
                self.sessions[i] = active.pop(i).session
                self.counts["handshakes"] += 1
            elif isinstance(event, HandshakeFailed):
                active.pop(i, None)
                self.counts["handshake_failures"] += 1

    def _index(self, k: int, anc: list[tuple[int, int, bytes]]) -> int | None:
        if not anc:
            return None
        offset = int.from_bytes(anc[0][2][8:12], "big") - BASE
        i = k * PER_SOCKET + offset
        return i if 0 <= offset < PER_SOCKET and i < self.n else None

    def command(self, words: list[str]) -> bool:
        if words and words[0] == "register":
            new = self.add(int(words[1]))
            self.handshake(list(new))
            self._ready = new  # `Devices.command` registers these, not new ones
        return super().command(words)

    # -- receiving ------------------------------------------------------------------------------

    def _drain(self, fd: int) -> None:
        k = self.by_fd[fd]
        sock = self.socks[k]
        recvmsg = sock.recvmsg
        now = time.monotonic()
        for _ in range(512):
            try:
                datagram, anc, _, _ = recvmsg(2048, 64)
            except BlockingIOError:
                return
            i = self._index(k, anc)
            session = self.sessions[i] if i is not None else None
            if session is None:
                self.counts["stray"] += 1
                continue
            plaintexts, closed, dropped = open_records(session, datagram)
            if dropped:
                self.counts["dtls_dropped"] += dropped
            if closed:
                self.counts["dtls_closed"] += 1
                self.sessions[i] = None  # type: ignore[index]
            for data in plaintexts:
                if len(data) < 4:
                    continue
                b0 = data[0]
                mtype = (b0 >> 4) & 3
                code = data[1]
                if mtype == _ACK and code >= 64 and b0 & 15 == 4:
                    j = int.from_bytes(data[5:8], "big")
                    if data[4] == self.kind and j == i:
                        self._answered(j, data, code, now)
                elif mtype == _CON and 1 <= code <= 31:
                    self._request(i, data, now)  # type: ignore[arg-type]
                elif mtype == 3:
                    self.counts["resets"] += 1


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, _, port = sys.argv[1].rpartition(":")
    prefix = sys.argv[2] if len(sys.argv) > 2 else "sec"
    secret = (sys.argv[3] if len(sys.argv) > 3 else "bench").encode()
    os.set_blocking(0, False)
    DtlsDevices((host, int(port)), prefix, secret).run()


if __name__ == "__main__":
    main()
