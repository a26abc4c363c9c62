"""Memory per idle DTLS device: N devices registered over DTLS sessions with the real
Supervisor and the real `DtlsTransport`/`DtlsServer`, against N plain devices.

`bench/memory.py`'s method (each case in a fresh child process, `gc.collect()`, resident set
size from /proc/self/statm before and after), with two cases:

- `plain`: N Registers (`ep=dev-I`) through `Supervisor.on_datagram` from distinct addresses,
  as memory.py's `dm_actor` case.
- `dtls`: the same server objects as `app.serve` wires them (a `DtlsTransport` around a
  `DtlsServer` with the supervisor's `credentials.psk`, Connection IDs on, `attach_dtls`),
  fed without sockets: each device is a project `DtlsClient` whose datagrams go to
  `DtlsTransport.on_datagram` from the device's address and whose answers come back from the
  transport's send callback. Credentials (identity `dev-I`, a 16-byte key) are restored first
  as a restart restores them from the store (`Provisioning.restore`), and measured apart.
  After its handshake the device sends its Register over the session; the clients of a batch
  are dropped once it is in, so at most `--batch` clients' memory (freed, reused by the next
  batch) is counted against the server: about 3 KB x batch / N (30 B/device with 100 at 10k).

Reported per N: bytes per device for plain, for dtls (credentials apart), their difference
(DTLS state on top of today's device: the session, the transport's maps, the session
address; goal <= 1.5 KB) and the credentials' own bytes per device.

    python bench/dtls_memory.py                      # N = 10k and 100k
    taskset -c 1 python bench/dtls_memory.py --sizes 10000,100000

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from memory import Replies, address, register_datagram, rss

from dm_actor.actors import router
from dm_actor.actors.supervisor import Supervisor
from dm_actor.address import is_session
from dm_actor.config import Settings
from dm_actor.dtls import DatagramToSend, DtlsClient, DtlsServer, SessionEstablished
from dm_actor.store.base import CredentialRecord
from dm_actor.store.memory import MemoryStore
from dm_actor.transport.dtls import DtlsTransport

ROOT = Path(__file__).resolve().parent.parent
SERVER = ("127.0.0.1", 5684)
Result = dict[str, Any]


def key_of(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Wire:
    """The coaps socket's send callback: the handshake's answers to the device shaking hands
    go back to it; everything else (the 2.01s, sealed) is counted."""

    __slots__ = ("current", "pending", "replies")

    def __init__(self) -> None:
        self.current: object = None
        self.pending: list[bytes] = []
        self.replies = 0

    def __call__(self, data: bytes, addr: object) -> None:
        if addr == self.current:
            self.pending.append(data)
        else:
            self.replies += 1


def handshake(transport: DtlsTransport, wire: Wire, client: DtlsClient, addr: object) -> bool:
    now = trio.current_time()
    out = [e.data for e in client.connect(now) if isinstance(e, DatagramToSend)]
    wire.current = addr
    try:
        while out:
            transport.on_datagram(out.pop(0), addr)  # type: ignore[arg-type]
            answers, wire.pending = wire.pending, []
            for data in answers:
                for event in client.receive(data, now):
                    if isinstance(event, DatagramToSend):
                        out.append(event.data)
                    elif isinstance(event, SessionEstablished):
                        return True
    finally:
        wire.current = None
    return False


async def case(kind: str, n: int, batch: int) -> Result:
    router.ADMISSION_WAIT = math.inf  # this measures memory, not admission
    async with trio.open_nursery() as nursery:
        sup = Supervisor(Settings(), store=MemoryStore())
        await nursery.start(sup.run)
        replies = Replies()
        sup.attach_udp(replies)
        wire = Wire()
        transport = DtlsTransport(DtlsServer(sup.credentials.psk, connection_id=True),
                                  sup.on_datagram, sup.on_unreachable)  # fmt: skip
        transport.attach(wire)
        sup.attach_dtls(transport.send, transport.identity_of, transport.release)
        sup.provisioning.revoked.append(transport.revoked)
        secure = kind == "dtls"
        # warm-up: one device of each kind (first-use costs paid)
        warm = 1 << 30
        sup.provisioning.restore(
            [CredentialRecord(f"dev-{warm}", f"dev-{warm}", key_of(warm), 0.0)]
        )
        sup.on_datagram(register_datagram(warm + 1), ("10.0.0.1", 40000))
        client = DtlsClient(SERVER, f"dev-{warm}".encode(), key_of(warm), connection_id=b"")
        assert handshake(transport, wire, client, ("10.0.0.2", 40000))
        transport.on_datagram(client.send(register_datagram(warm)), ("10.0.0.2", 40000))
        del client
        await trio.testing.wait_all_tasks_blocked()
        sup.events.take(1 << 30)
        gc.collect()
        before = rss()
        credentials_bytes = 0
        if secure:
            sup.provisioning.restore(
                CredentialRecord(f"dev-{i}", f"dev-{i}", key_of(i), 0.0) for i in range(n)
            )
            gc.collect()
            credentials_bytes = rss() - before
        start = time.perf_counter()
        failed = 0
        for first in range(0, n, batch):
            clients = []
            for i in range(first, min(n, first + batch)):
                addr = address(i)
                if secure:
                    client = DtlsClient(SERVER, f"dev-{i}".encode(), key_of(i), connection_id=b"")
                    if not handshake(transport, wire, client, addr):
                        failed += 1
                        continue
                    transport.on_datagram(client.send(register_datagram(i)), addr)
                    clients.append(client)
                else:
                    sup.on_datagram(register_datagram(i), addr)
            sup.events.take(1 << 30)
            await trio.lowlevel.checkpoint()
            while sup._admission:
                await trio.lowlevel.checkpoint()
            del clients
        await trio.testing.wait_all_tasks_blocked()
        sup.events.take(1 << 30)
        elapsed = time.perf_counter() - start
        gc.collect()
        after = rss()
        registered = len(sup.by_endpoint) - 2
        sessions = sum(1 for a in sup.by_endpoint.values() if a.addr and is_session(a.addr))
        if registered != n or failed:
            raise SystemExit(f"{kind}: {registered} of {n} registered, {failed} handshakes failed")
        if secure and (sessions != n + 1 or wire.replies < n):
            raise SystemExit(f"dtls: {sessions} sessions, {wire.replies} replies")
        stats = transport.server.statistics()
        result: Result = {
            "rss_before": before,
            "rss_after": after,
            "bytes_per_device": (after - before - credentials_bytes) / n,
            "credentials_bytes_per_device": credentials_bytes / n,
            "seconds": elapsed,
            "devices_per_s": n / elapsed,
            "sessions": transport.sessions(),
            "dtls_statistics": dataclasses.asdict(stats),
        }
        nursery.cancel_scope.cancel()
    return result


def child(kind: str, n: int, batch: int) -> Result:
    result = trio.run(case, kind, n, batch)
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(case=kind, n=n)
    return result


def spawn(kind: str, n: int, batch: int) -> Result:
    argv = [sys.executable, __file__, "--child", kind, str(n), "--batch", str(batch)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{kind} N={n} failed:\n{done.stderr}")
    result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    parser.add_argument("--batch", type=int, default=100, help="devices between checkpoints")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch)), flush=True)
        os._exit(0)
    rows = []
    results = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        plain = spawn("plain", n, args.batch)
        dtls = spawn("dtls", n, args.batch)
        results += [plain, dtls]
        rows.append({
            "n": n,
            "plain_B": round(plain["bytes_per_device"]),
            "dtls_B": round(dtls["bytes_per_device"]),
            "dtls_extra_B": round(dtls["bytes_per_device"] - plain["bytes_per_device"]),
            "credentials_B": round(dtls["credentials_bytes_per_device"]),
            "dtls_devices_per_s": round(dtls["devices_per_s"]),
            "plain_devices_per_s": round(plain["devices_per_s"]),
        })  # fmt: skip
    summary = {"benchmark": "dtls_memory", "python": platform.python_version(),
               "affinity": sorted(os.sched_getaffinity(0)), "batch": args.batch,
               "rows": rows, "results": results}  # fmt: skip
    print(json.dumps(summary))
    print(
        "| N | plain B/device | DTLS B/device | DTLS state on top | credentials B/device "
        "| DTLS devices/s (handshake + Register, in-process) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['plain_B']:,} | {r['dtls_B']:,} | {r['dtls_extra_B']:,} | "
            f"{r['credentials_B']:,} | {r['dtls_devices_per_s']:,} |"
        )


if __name__ == "__main__":
    main()
