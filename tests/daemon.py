"""Test helper: a real `dm-actor serve` in a subprocess that a test can kill -9 and restart.

It owns the process (started with this interpreter, `-m dm_actor`), its log file, and the
readiness check (the HTTP port accepts connections, which happens after the store was loaded
and the CoAP sockets opened). `free_ports` picks ports that are free on 127.0.0.1 for UDP and
TCP at once, because a restarted daemon must come back where its devices expect it.
It talks HTTP only with `request` (and `post`): one request on its own connection.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import h11
import trio

ROOT = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """`count` distinct ports, each free on 127.0.0.1 for both UDP and TCP right now."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


@dataclass
class Daemon:
    """`dm-actor serve` with fixed arguments, started, killed and restarted as a test says."""

    args: list[str]
    http: tuple[str, int]
    log: Path
    starts: int = 0
    kills: int = 0
    proc: trio.Process | None = field(default=None, repr=False)

    async def start(self) -> None:
        """Start the process (it may not be ready yet: see `ready`)."""
        assert self.proc is None, "already running"
        argv = [sys.executable, "-m", "dm_actor", "serve", *self.args]
        with self.log.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT
            )
        self.starts += 1

    async def ready(self) -> None:
        """Wait until the HTTP port accepts connections (bound it with `trio.fail_after`).

        Raises:
            RuntimeError: the process ended (the message quotes the end of its log).
        """
        proc = self.proc
        assert proc is not None
        while True:
            if proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dm-actor exited with {proc.returncode}:\n{tail}")
            try:
                stream = await trio.open_tcp_stream(*self.http)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return

    async def kill(self) -> None:
        """SIGKILL the process and reap it (a no-op when it is not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.poll() is None:
                proc.kill()
                self.kills += 1
            with trio.fail_after(10):
                await proc.wait()


class NotSent(Exception):
    """The request never reached the server (the connection was refused)."""


async def post(addr: tuple[str, int], target: str, key: str, body: object) -> int:
    """POST a JSON body on a new connection; the response status (see `request`)."""
    return (await request(addr, "POST", target, key, body))[0]


async def request(
    addr: tuple[str, int], method: str, target: str, key: str, body: object = None
) -> tuple[int, bytes]:
    """One request (a JSON body unless None) on a new connection; the status and the body.

    Raises:
        NotSent: the connection could not be opened: the server cannot have seen it.
        OSError, trio.BrokenResourceError, h11.ProtocolError: the connection broke after the
            request was (perhaps partly) sent: whether the server acted on it is unknown.
    """
    try:
        stream = await trio.open_tcp_stream(*addr)
    except OSError as exc:
        raise NotSent(str(exc)) from None
    data = b"" if body is None else json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "dm-actor"), ("content-length", str(len(data))),
               ("authorization", f"Bearer {key}"), ("connection", "close")]  # fmt: skip
    if body is not None:
        headers.append(("content-type", "application/json"))
    async with stream:
        return await _exchange(conn, stream, method, target, headers, data)


async def _exchange(
    conn: h11.Connection,
    stream: trio.SocketStream,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    data: bytes,
) -> tuple[int, bytes]:
    """Send one request on `conn` and read its response: the status and the body."""
    status: int | None = None
    chunks: list[bytes] = []
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    out += conn.send(h11.Data(data=data)) if data else b""
    await stream.send_all(out + conn.send(h11.EndOfMessage()))
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = int(event.status_code)
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage) and status is not None:
            return status, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("closed before the response")


class Session:
    """A kept-alive HTTP/1.1 connection for one request after another (a Pelion SDK client
    keeps its connection). A request whose connection broke is never sent again: the error
    says whether it left (`NotSent`) or not, as `request`'s.
    """

    def __init__(self, addr: tuple[str, int], key: str) -> None:
        self.addr, self.key = addr, key
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)
        self.connections = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            await stream.aclose()

    async def request(self, method: str, target: str, body: object = None) -> tuple[int, bytes]:
        """One request on the kept connection (a new one if it closed); status and body."""
        if self.stream is None:
            try:
                self.stream = await trio.open_tcp_stream(*self.addr)
            except OSError as exc:
                raise NotSent(str(exc)) from None
            self.conn = h11.Connection(h11.CLIENT)
            self.connections += 1
        data = b"" if body is None else json.dumps(body).encode()
        headers = [("host", "dm-actor"), ("content-length", str(len(data))),
                   ("authorization", f"Bearer {self.key}")]  # fmt: skip
        if body is not None:
            headers.append(("content-type", "application/json"))
        conn, stream = self.conn, self.stream
        try:
            answer = await _exchange(conn, stream, method, target, headers, data)
        except BaseException:
            await self.aclose()
            raise
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return answer
