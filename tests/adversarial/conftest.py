"""What the adversarial tests share: a real `dm-actor serve` started for the test (killed
after it), and helper processes driven over a line protocol (the benchmarks' load generators:
`bench/flood.py --load`, `--app`), each killed after the test.

    async def test_x(start_daemon, spawn):
        daemon = await start_daemon("--store", "memory")
        load = await spawn([sys.executable, "bench/flood.py", "--load", daemon.coap])
        result = await load.ask("register 4 4", seconds=30)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import trio

from tests.daemon import ROOT, Daemon, free_ports

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

KEY = "ak_adversarial_test"


@dataclass
class Served:
    """A running daemon and where it listens."""

    daemon: Daemon
    coap_port: int
    http_port: int
    data_dir: Path

    @property
    def coap(self) -> str:
        return f"127.0.0.1:{self.coap_port}"

    @property
    def alive(self) -> bool:
        proc = self.daemon.proc
        return proc is not None and proc.poll() is None

    def log_text(self) -> str:
        return self.daemon.log.read_text(errors="replace")


@dataclass
class Driven:
    """A child process that answers each command line with one JSON line on stdout."""

    proc: trio.Process
    name: str
    _buffer: bytearray = field(default_factory=bytearray)

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(line.encode() + b"\n")

    async def read_json(self, seconds: float) -> dict[str, Any]:
        """The next line starting with `{` (other lines are ignored).

        Raises:
            trio.TooSlowError: nothing within `timeout` seconds.
            RuntimeError: the process ended.
        """
        assert self.proc.stdout is not None
        with trio.fail_after(seconds):
            while True:
                end = self._buffer.find(b"\n")
                if end >= 0:
                    line = bytes(self._buffer[:end])
                    del self._buffer[: end + 1]
                    if line.startswith(b"{"):
                        result: dict[str, Any] = json.loads(line)
                        return result
                    continue
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited ({self.proc.poll()})")
                self._buffer += chunk

    async def ask(self, line: str, seconds: float) -> dict[str, Any]:
        await self.send(line)
        return await self.read_json(seconds)


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """An async function that starts `dm-actor serve` on fresh ports with the API key `KEY`
    (extra arguments appended) and waits until it serves HTTP; every daemon it started is
    killed after the test."""
    started: list[Daemon] = []

    async def start(*extra: str) -> Served:
        for attempt in range(3):  # a port found free may be taken before the daemon binds it
            coap, http = free_ports(2)
            data = tmp_path / f"data-{len(started)}"
            args = ["--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(http),
                    "--data-dir", str(data), "--api-key", KEY, "--log-level", "warning",
                    *extra]  # fmt: skip
            daemon = Daemon(args, ("127.0.0.1", http), tmp_path / f"daemon-{len(started)}.log")
            started.append(daemon)
            await daemon.start()
            try:
                with trio.fail_after(30):
                    await daemon.ready()
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                continue
            return Served(daemon, coap, http, data)
        raise AssertionError("unreachable")

    try:
        yield start
    finally:
        for daemon in started:
            await daemon.kill()


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[[list[str]], Awaitable[Driven]]]:
    """An async function that starts a driven helper process (from the repository root, this
    interpreter's environment) and waits for its first JSON line (`{"ready": true}`); each
    is killed after the test."""
    procs: list[trio.Process] = []

    async def start(argv: list[str]) -> Driven:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        )
        procs.append(proc)
        driven = Driven(proc, argv[1] if len(argv) > 1 else argv[0])
        await driven.read_json(30)
        return driven

    try:
        yield start
    finally:
        with trio.CancelScope(shield=True):
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()


PYTHON = sys.executable
