"""What the end-to-end benchmarks share: processes pinned to cores, the server and the baselines
started as separate processes, their CPU and memory read from /proc, line-protocol helpers, and
the output (one JSON line, then a table).

The machine has two cores: the server (or a baseline) runs on `SERVER_CPU`, every load process
on `LOAD_CPU` (`taskset -c`). A load process (`_devices.py`, `_app.py`) is driven over its
stdin and answers each command with one JSON line on stdout, so the orchestrating script can
read the server's CPU time and resident memory between the phases of a run.

Profiling is the harness's business, never the product's: `--profile py-spy` attaches py-spy
to the server process for the measured phases and prints the top costs; `--profile cprofile`
runs the server under `python -m cProfile` (slower: read it for proportions only).

Linux only (/proc, taskset).
"""

from __future__ import annotations

import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
SERVER_CPU = "1"
LOAD_CPU = "0"
API_KEY = "ak_bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (CoAP uses both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


class Proc:
    """A child process pinned to one core, with its CPU time and RSS readable from /proc."""

    def __init__(
        self,
        argv: Sequence[str],
        cpu: str | None,
        *,
        env: dict[str, str] | None = None,
        stdin: bool = False,
        stdout: bool = True,
        name: str = "",
    ) -> None:
        full = ["taskset", "-c", cpu, *argv] if cpu is not None else list(argv)
        self.name = name or Path(argv[1] if len(argv) > 1 else argv[0]).name
        self.popen = subprocess.Popen(
            full,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=None,
            text=True,
            bufsize=1,
        )
        self.pid = self.popen.pid

    def cpu_seconds(self, *, main_thread: bool = False) -> float:
        """User + system CPU time of the process (or of its main thread only) so far."""
        stat = f"/proc/{self.pid}/task/{self.pid}/stat" if main_thread else f"/proc/{self.pid}/stat"
        fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def rss(self) -> int:
        """Resident set size in bytes."""
        return int(Path(f"/proc/{self.pid}/statm").read_text().split()[1]) * _PAGE

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def read_json(self, timeout: float = 300.0) -> dict[str, Any]:
        """The next JSON line on the child's stdout (other lines are echoed to stderr)."""
        out = self.popen.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([out], [], [], left)
            if not ready:
                continue
            line = out.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited ({self.popen.wait()})")
            if line.startswith("{"):
                result: dict[str, Any] = json.loads(line)
                return result
            print(f"[{self.name}] {line.rstrip()}", file=sys.stderr)

    def ask(self, line: str, timeout: float = 300.0) -> dict[str, Any]:
        self.send(line)
        return self.read_json(timeout)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


@dataclass
class Target:
    """A CoAP server under test (dm_actor or a baseline), in its own process."""

    kind: str
    proc: Proc
    coap_port: int
    http_port: int = 0
    data_dir: str = ""
    profiler: Profiler | None = None

    @property
    def coap(self) -> str:
        return f"127.0.0.1:{self.coap_port}"

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
        self.proc.stop()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _wait_tcp(port: int, proc: Proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not listen on {port}")


def _wait_coap(port: int, proc: Proc, timeout: float = 30.0) -> None:
    """Until a CoAP ping (an empty CON) gets an answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
            s.sendto(b"\x40\x00\x12\x34", ("127.0.0.1", port))
            try:
                s.recv(64)
                return
            except TimeoutError:
                continue
    raise TimeoutError(f"{proc.name} did not answer on udp {port}")


def start_server(
    *,
    store: str = "memory",
    config: str | None = None,
    profile: str | None = None,
    cpu: str = SERVER_CPU,
) -> Target:
    """`dm-actor serve` on 127.0.0.1 with fresh ports and data directory, pinned to `cpu`."""
    coap, http = free_port(), free_port()
    data_dir = tempfile.mkdtemp(prefix="dm-bench-")
    argv = [PYTHON, "-m", "dm_actor", "serve", "--host", "127.0.0.1", "--store", store,
            "--coap-port", str(coap), "--http-port", str(http), "--api-key", API_KEY,
            "--data-dir", data_dir, "--log-level", "warning"]  # fmt: skip
    if config is not None:
        path = Path(data_dir) / "bench.toml"
        path.write_text(config)
        argv += ["--config", str(path)]
    if profile == "cprofile":
        argv[1:1] = ["-m", "cProfile", "-o", str(Path(data_dir) / "server.prof")]
    gc_mode = os.environ.get("BENCH_SERVER_GC")  # an experiment: "off" or "T0,T1,T2"
    if gc_mode:
        setup = ("gc.disable()" if gc_mode == "off"
                 else f"gc.set_threshold({gc_mode})")  # fmt: skip
        argv[1:3] = ["-c", f"import gc, sys; {setup}; from dm_actor.cli import main; "
                     "sys.exit(main(sys.argv[1:]))"]  # fmt: skip
    proc = Proc(argv, cpu, stdout=False, name=f"dm_actor[{store}]")
    _wait_tcp(http, proc)
    return Target("dm_actor", proc, coap, http, data_dir)


def start_baseline(kind: str, *, cpu: str = SERVER_CPU) -> Target:
    """A baseline registration responder: `floor` (Trio, batched) or `aiocoap`."""
    port = free_port()
    script = BENCH / "baselines" / ("floor.py" if kind == "floor" else "aiocoap_rd.py")
    proc = Proc([PYTHON, str(script), str(port)], cpu, stdout=False, name=kind)
    _wait_coap(port, proc)
    return Target(kind, proc, port)


def start_devices(target: Target, *, cpu: str = LOAD_CPU) -> Proc:
    """The lean device fleet (`_devices.py`) aimed at `target`, waiting for commands."""
    proc = Proc([PYTHON, str(BENCH / "_devices.py"), target.coap], cpu, stdin=True, name="devices")
    proc.read_json(30)  # {"ready": ...}
    return proc


def start_app(target: Target, *, cpu: str = LOAD_CPU) -> Proc:
    """The HTTP/WebSocket application (`_app.py`) aimed at `target`, waiting for commands."""
    argv = [PYTHON, str(BENCH / "_app.py"), str(target.http_port), API_KEY]
    proc = Proc(argv, cpu, stdin=True, name="app")
    proc.read_json(30)
    return proc


def run_simulator(
    target: Target, devices: int, duration: float, *, cpu: str = LOAD_CPU, prefix: str = "sim"
) -> dict[str, Any]:
    """`dm-actor simulate` against `target` until every device registered (or `duration`)."""
    argv = [PYTHON, "-m", "dm_actor", "simulate", "--server", f"coap://{target.coap}",
            "--devices", str(devices), "--duration", str(duration), "--progress", "0",
            "--prefix", prefix]  # fmt: skip
    proc = Proc(argv, cpu, name="simulate")
    summary = proc.read_json(duration + 120)
    proc.popen.wait(30)
    return summary


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Meter:
    """CPU seconds and wall time of processes over one phase."""

    procs: dict[str, Proc]
    start_cpu: dict[str, float] = field(default_factory=dict)
    start_main: dict[str, float] = field(default_factory=dict)
    start: float = 0.0

    def __enter__(self) -> Self:
        self.start_cpu = {k: p.cpu_seconds() for k, p in self.procs.items()}
        self.start_main = {k: p.cpu_seconds(main_thread=True) for k, p in self.procs.items()}
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.start
        self.cpu = {k: p.cpu_seconds() - self.start_cpu[k] for k, p in self.procs.items()}
        #: CPU seconds of threads other than the main one (the SQLite writer's worker thread)
        self.other_threads = {
            k: self.cpu[k] - (p.cpu_seconds(main_thread=True) - self.start_main[k])
            for k, p in self.procs.items()
        }

    def share(self, name: str) -> float:
        """The CPU time of `name` over the phase as a fraction of one core."""
        return self.cpu[name] / self.wall if self.wall else 0.0


class Profiler:
    """py-spy recording a process (raw folded stacks) until `stop`."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        exe = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        self.out = out
        self.popen = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def attach_profiler(target: Target, name: str) -> None:
    out = Path(tempfile.gettempdir()) / f"dm-bench-{name}-{target.proc.pid}.folded"
    target.profiler = Profiler(target.proc.pid, out)


def profile_report(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's folded stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples; self %, then inclusive %"]
    lines += [f"  self {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += [f"  incl {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"
    name, _, where = frame.partition(" (")
    if not where:
        return frame
    file, _, _line = where.rstrip(")").rpartition(":")
    return f"{name} ({Path(file).parent.name}/{Path(file).name})"


# -- output -----------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "python": platform.python_version(),
        "cpu": model,
        "cores": os.cpu_count(),
        "loadavg": round(os.getloadavg()[0], 2),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def emit(result: dict[str, Any], rows: list[dict[str, Any]], columns: Sequence[str],
         out: IO[str] = sys.stdout) -> None:  # fmt: skip
    """The run's JSON line, then its rows as an aligned table."""
    print(json.dumps(result, separators=(",", ":")), file=out)
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)), file=out)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--rounds", type=int, default=1, help="repeat, keep the best round")
    parser.add_argument("--profile", choices=("py-spy", "cprofile"),
                        help="profile the server over the measured phases")  # fmt: skip


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- CoAP storms (registration_storm, update_storm) -------------------------------------------


def coap_storm(
    kind: str,
    devices: int,
    window: int,
    phases: Sequence[str],
    *,
    store: str = "memory",
    profile: str | None = None,
    settle: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Start `kind` (dm_actor, floor or aiocoap) and the lean devices, run `phases`
    (register, update) with `devices` devices and at most `window` requests in flight.

    Per phase: the devices' rate and latencies, the target's CPU seconds over the phase and
    per request, the load's CPU share; after `register`, the target's RSS per device.
    """
    target = start_server(store=store) if kind == "dm_actor" else start_baseline(kind)
    load = start_devices(target)
    results: dict[str, dict[str, Any]] = {}
    try:
        time.sleep(settle)
        rss0 = target.proc.rss()
        for phase in phases:
            if profile == "py-spy" and kind == "dm_actor":
                attach_profiler(target, phase)
            command = f"register {devices} {window}" if phase == "register" else f"update {window}"
            with Meter({"target": target.proc, "load": load}) as meter:
                r = load.ask(command)
            if target.profiler is not None:
                target.profiler.stop()
                r["profile"] = profile_report(target.profiler.out)
                target.profiler = None
            r["target_cpu_s"] = round(meter.cpu["target"], 3)
            r["target_cpu_share"] = round(meter.share("target"), 3)
            r["load_cpu_share"] = round(meter.share("load"), 3)
            r["target_us_per_op"] = round(meter.cpu["target"] / max(r["done"], 1) * 1e6, 1)
            if phase == "register":
                time.sleep(settle)
                r["rss_bytes_per_device"] = round((target.proc.rss() - rss0) / devices)
                r["rss_mib"] = round(target.proc.rss() / 2**20, 1)
            results[phase] = r
    finally:
        load.stop()
        target.stop()
    return results


def best(rounds: list[dict[str, Any]], key: str = "rate") -> dict[str, Any]:
    """The round with the highest `key` (best-of-N)."""
    return max(rounds, key=lambda r: r.get(key) or 0.0)
