"""Cluster mode (issue 17): server CPU per operation for SQLite, PostgreSQL and N nodes on
PostgreSQL, CPU per forwarded datagram, and failover time, with the invariants checked.

Everything runs as real processes: a PostgreSQL server (tests/store/postgres.py: a temporary
cluster run as the `postgres` user, Unix socket only, fsync on, synchronous_commit on; a fresh
database per case), N `python -m dm_actor serve --config nodeX.toml` processes, the devices
(`_cluster_devices.py`: raw CoAP, deduplicating by Message ID, counting executions per
async-id) and the application (`_cluster_app.py`: POST /v2/device-requests over the nodes'
HTTP ports, AsyncIDResponses from one WebSocket channel).

Cases (`--cases`, default all):

- `sqlite1`: one daemon on SQLite; `pg1`: one daemon on PostgreSQL, no [cluster];
- `c1`, `c2`, `c3`: 1, 2, 3 cluster nodes on one PostgreSQL database (lease_ttl
  `--lease-ttl`, 1024 slots), topology B: node k on 127.0.0.k+1, each its own CoAP socket and
  HTTP port. The devices send to the owner of their slot (read from `slot_leases` once the
  leases are balanced); the commands' POSTs go to the nodes in turn (so (N-1)/N of them are
  proxied to the owner), the WebSocket is attached to the home node of the application's
  channel (events of devices owned elsewhere are relayed to it). `--topology a`: every node
  on 127.0.0.1 with one shared CoAP port (SO_REUSEPORT: the kernel spreads the devices over
  the nodes, (N-1)/N of the datagrams are forwarded), no forwarding phases.

Phases of a case: 3 s idle (CPU per second: lease renewals, timers); `--devices` Registers (at
most `--window` in flight); one Update per device; `--commands` commands (PUT /3/0/14 with the
async-id as payload; `--connections` workers, one POST in flight each). For N >= 2 also:
the same commands each POSTed to the owner of the device (`commands_to_owner`: no proxy),
and twice in turn the Updates sent to a node that does not own the device's slot (forwarded
to the owner, the answer back through the receiving node: 2 forwarded datagrams per Update)
and to the owner again; CPU per forwarded datagram = (least CPU per Update sent to a wrong node
- least CPU per Update sent to the owner) / 2, and the relative overhead per Update.

Server CPU of a phase = utime + stime (/proc/<pid>/stat) of every dm_actor process and of
every PostgreSQL process (the postmaster and all its children: backends, checkpointer, WAL
writer...; this script's one monitoring connection included), from before the phase until
the store has committed what it left (no commit for 0.5 s); the devices' and the
application's CPU is not counted. Reported per 1000 operations (per accepted command), and
as a ratio to `pg1` in the same run. PostgreSQL's commits and WAL syncs per phase come from
pg_stat_database and pg_stat_wal.

`failover` (`--failover-nodes`, default 3; `--failover-devices`, default 10,000): register
the devices, mute them (they drop requests unseen), submit `--failover-commands` commands to
devices of one node (the victim: not the home of the channel) so that they are in flight,
`kill -9` the victim, unmute the devices at once, and submit as many commands to other
devices of the victim (retried while answered 503: nobody owns the slot yet). Reported from
the kill: when every slot the victim held has a new owner (slot_leases, polled every 50 ms),
the first and last AsyncIDResponse of the in-flight commands (resent by the new owner with
their Message ID and token) and of the new ones.

Invariants, over every case: accepted (202) = answered on the channel, no AsyncIDResponse
twice, and at the devices every async-id executed exactly once.

The servers and PostgreSQL are pinned to `--server-cpu` (default 1), the devices, the
application and this script to `--load-cpu` (default 0) with `taskset`. The nodes' logs are
kept in `--logs` (default: a new temporary directory, printed); their errors and first
warnings are in the JSON (`node_errors`). `--profile commands` runs py-spy on every node.

    python bench/cluster.py                                   # 2-4 minutes
    python bench/cluster.py --rounds 3 --cases pg1 c1 c2 c3   # interleaved, least CPU kept
    python bench/cluster.py --cases pg1 c2 --devices 20000 --commands 20000 --connections 64
    python bench/cluster.py --cases pg1 c2 c3 --topology a   # one shared CoAP port
    python bench/cluster.py --cases failover --failover-devices 100000 --window 1000

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import _harness as h
import psycopg

sys.path.insert(0, str(h.ROOT))

from dm_actor.api.auth import application_id
from dm_actor.cluster.slots import home_slot, slot_of
from tests.store.postgres import PostgresServer

SECRET = "bench-secret"
PREFIX = "cl"
_TICK = os.sysconf("SC_CLK_TCK")


class Pg:
    """The PostgreSQL server, pinned to a core, its CPU read from /proc."""

    def __init__(self, cpu: str | None) -> None:
        self.server = PostgresServer()
        self.postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        if cpu is not None:  # (backends fork from the postmaster: they inherit it)
            for pid in self.pids():
                subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)],
                               capture_output=True, check=False)  # fmt: skip

    def pids(self) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            if pid == self.postmaster or int(fields[1]) == self.postmaster:
                found.append(pid)
        return found

    def cpu(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / _TICK

    def version(self) -> str:
        with psycopg.connect(self.server.dsn()) as pg:
            row = pg.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


@dataclass
class Node:
    name: str
    host: str
    coap_port: int
    http_port: int
    data_dir: str
    proc: h.Proc

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def coap(self) -> str:
        return f"{self.host}:{self.coap_port}"

    def alive(self) -> bool:
        return self.proc.popen.poll() is None


def node_config(kind: str, name: str, host: str, coap: int, http: int, data_dir: str,
                dsn: str, cluster: bool, ttl: float, link: int) -> str:  # fmt: skip
    lines = ["[server]", f'store = "{kind}"', f'host = "{host}"', f"coap_port = {coap}",
             f"http_port = {http}", f'data_dir = "{data_dir}"']  # fmt: skip
    if kind == "postgres":
        lines.append(f'dsn = "{dsn}"')
    if cluster:
        lines += ["[cluster]", f'node = "{name}"', f'link = "{host}:{link}"',
                  f"lease_ttl = {ttl}", "slots = 1024", f'secret = "{SECRET}"']  # fmt: skip
    lines += ["[api]", f'keys = ["{h.API_KEY}"]']
    return "\n".join(lines) + "\n"


def start_nodes(kind: str, n: int, dsn: str, cluster: bool, args: argparse.Namespace,
                logs: str) -> list[Node]:  # fmt: skip
    """N daemons; node k's stderr goes to `logs`-k.log."""
    coap = h.free_port()
    nodes = []
    for k in range(n):
        name = "abcdefgh"[k]
        host = "127.0.0.1" if args.topology == "a" else f"127.0.0.{k + 1}"
        http, link = h.free_port(), h.free_port()
        data_dir = tempfile.mkdtemp(prefix=f"dm-bench-cluster-{name}-")
        path = Path(data_dir) / f"node{name}.toml"
        path.write_text(node_config(kind, name, host, coap, http, data_dir, dsn, cluster,
                                    args.lease_ttl, link))  # fmt: skip
        argv = ["sh", "-c", 'exec "$@" 2>>"$0"', f"{logs}-{name}.log",
                h.PYTHON, "-m", "dm_actor", "serve", "--config", str(path),
                "--log-level", "warning"]  # fmt: skip
        proc = h.Proc(argv, args.server_cpu, stdout=False, name=f"node-{name}")
        nodes.append(Node(name, host, coap, http, data_dir, proc))
    for node in nodes:
        wait_ready(node)
    return nodes


def wait_ready(node: Node, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not node.alive():
            raise RuntimeError(f"{node.proc.name} exited with {node.proc.popen.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{node.http}/readyz", timeout=2) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{node.proc.name} not ready within {timeout:.0f} s")


def stop_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        node.proc.stop()
        shutil.rmtree(node.data_dir, ignore_errors=True)


def leases(pg: psycopg.Connection[Any]) -> dict[int, str]:
    """slot -> node of every live lease."""
    rows = pg.execute("SELECT slot, node FROM slot_leases WHERE node IS NOT NULL "
                      "AND expires > now()").fetchall()  # fmt: skip
    return {int(slot): str(node) for slot, node in rows}


def wait_balanced(pg: psycopg.Connection[Any], names: list[str], timeout: float) -> float:
    """Until every slot is held by a live node and they hold within 1 of each other."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        held = leases(pg)
        counts = [sum(1 for v in held.values() if v == n) for n in names]
        if len(held) == 1024 and max(counts) - min(counts) <= 1:
            return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"leases not balanced within {timeout:.0f} s: {counts}")


def pg_stats(pg: psycopg.Connection[Any] | None) -> tuple[int, int]:
    """Commits of every database and WAL syncs so far."""
    if pg is None:
        return 0, 0
    commits = pg.execute("SELECT sum(xact_commit) FROM pg_stat_database").fetchone()
    syncs = pg.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()
    return int(commits[0] if commits else 0), int(syncs[0] if syncs else 0)


class Case:
    """One configuration's processes, measured phase by phase."""

    def __init__(self, name: str, pg: Pg, args: argparse.Namespace, round_: int) -> None:
        self.name, self.pg, self.args = name, pg, args
        self.logs = f"{args.logs}/{name}-{round_}"
        self.kind = "sqlite" if name.startswith("sqlite") else "postgres"
        self.cluster = name.startswith("c") or name == "failover"
        self.shared = self.cluster and args.topology == "a"
        self.n = args.failover_nodes if name == "failover" else int(name[-1])
        self.db = pg.server.create_database()
        self.dsn = pg.server.dsn(self.db)
        self.mon: psycopg.Connection[Any] | None = None
        self.nodes: list[Node] = []
        self.devices: h.Proc | None = None
        self.app: h.Proc | None = None
        self.files = Path(tempfile.mkdtemp(prefix="dm-bench-cluster-"))
        self.owner_of: dict[int, str] = {}

    def __enter__(self) -> Self:
        self.nodes = start_nodes(self.kind, self.n, self.dsn, self.cluster, self.args, self.logs)
        if self.kind == "postgres":
            self.mon = psycopg.connect(self.dsn, autocommit=True)
        if self.cluster:
            assert self.mon is not None
            took = wait_balanced(self.mon, [n.name for n in self.nodes], 60.0)
            print(f"[{self.name}] leases balanced {took:.1f} s after ready", file=sys.stderr)
            self.owner_of = leases(self.mon)
        coaps = [n.coap for n in self.nodes][: 1 if self.shared else None]
        self.devices = h.Proc([h.PYTHON, str(h.BENCH / "_cluster_devices.py"), *coaps],
                              self.args.load_cpu, stdin=True, name="devices")  # fmt: skip
        self.devices.read_json(30)
        https = ",".join(n.http for n in self.nodes)
        self.app = h.Proc([h.PYTHON, str(h.BENCH / "_cluster_app.py"), h.API_KEY, https],
                          self.args.load_cpu, stdin=True, name="app")  # fmt: skip
        self.app.read_json(30)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (self.app, self.devices):
            if proc is not None:
                proc.stop()
        stop_nodes(self.nodes)
        if self.mon is not None:
            self.mon.close()
        with contextlib.suppress(Exception):
            self.pg.server.drop_database(self.db)
        shutil.rmtree(self.files, ignore_errors=True)

    # -- where devices send ----------------------------------------------------------------

    def owner_index(self, device: int) -> int:
        if not self.cluster:
            return 0
        owner = self.owner_of.get(slot_of(f"{PREFIX}-{device}", 1024))
        names = [n.name for n in self.nodes]
        return names.index(owner) if owner in names else 0

    def aim_file(self, count: int, wrong: bool, *, http: bool = False) -> str:
        """Per device, the index of the node it sends to: its owner, or (`wrong`) the next
        node; in topology A (one shared CoAP socket) always the one address, unless `http`."""
        path = self.files / f"aim-{'wrong' if wrong else 'owner'}{'-http' if http else ''}"
        lines = []
        for i in range(count):
            k = self.owner_index(i)
            if self.shared and not http:
                k = 0
            lines.append(str((k + 1) % self.n if wrong else k))
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    # -- measuring -------------------------------------------------------------------------

    def server_cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the dm_actor processes and of PostgreSQL's."""
        return sum(n.proc.cpu_seconds() for n in self.nodes if n.alive()), self.pg.cpu()

    def settle(self) -> None:
        """Until the store wrote what the phase left (PostgreSQL: no commit for 0.5 s; SQLite:
        0.5 s), at most 10 s, so that the phase's commits are counted in it."""
        if self.mon is None:
            time.sleep(0.5)
            return
        last, quiet, deadline = pg_stats(self.mon), time.monotonic(), time.monotonic() + 10
        while time.monotonic() < deadline and time.monotonic() - quiet < 0.5:
            time.sleep(0.1)
            now = pg_stats(self.mon)
            if now[0] - last[0] > 1:  # (this script's own query is one commit)
                quiet = time.monotonic()
            last = now

    def idle(self, seconds: float) -> dict[str, float]:
        """Server CPU while nothing happens (lease renewals, timers), in ms per second."""
        self.settle()
        (dm0, pg0), t0 = self.server_cpu(), time.monotonic()
        time.sleep(seconds)
        (dm1, pg1), wall = self.server_cpu(), time.monotonic() - t0
        print(f"[{self.name}] idle: dm_actor {(dm1 - dm0) / wall * 1e3:.1f} ms/s, PostgreSQL "
              f"{(pg1 - pg0) / wall * 1e3:.1f} ms/s", file=sys.stderr)  # fmt: skip
        return {"dm_actor_ms_per_s": round((dm1 - dm0) / wall * 1e3, 1),
                "postgres_ms_per_s": round((pg1 - pg0) / wall * 1e3, 1)}  # fmt: skip

    def measure(self, phase: str, proc: h.Proc, command: str, count_key: str,
                timeout: float = 600.0) -> dict[str, Any]:  # fmt: skip
        self.settle()
        profilers = []
        if phase in self.args.profile:
            for node in self.nodes:
                out = self.files.parent / f"dm-bench-cluster-{self.name}-{node.name}.folded"
                profilers.append((node.name, h.Profiler(node.proc.pid, out)))
        commits0, syncs0 = pg_stats(self.mon)
        (dm0, pg0), t0 = self.server_cpu(), time.monotonic()
        r = proc.ask(command, timeout)
        answered = time.monotonic() - t0
        self.settle()
        (dm1, pg1), wall = self.server_cpu(), time.monotonic() - t0
        for name, profiler in profilers:
            profiler.stop()
            print(f"== py-spy, {self.name} node {name}, {phase}:\n"
                  f"{h.profile_report(profiler.out, 20)}", file=sys.stderr)  # fmt: skip
        commits, syncs = pg_stats(self.mon)
        dm, pg = dm1 - dm0, pg1 - pg0
        cpu = dm + pg
        done = max(int(r.get(count_key, 0)), 1)
        r.update(phase=phase, server_cpu_s=round(cpu, 3), dm_actor_cpu_s=round(dm, 3),
                 postgres_cpu_s=round(pg, 3), wall_s=round(wall, 3),
                 answered_s=round(answered, 3),
                 server_cpu_share=round(cpu / wall, 3) if wall else None,
                 cpu_ms_per_1k=round(cpu / done * 1e6, 1),
                 pg_commits=commits - commits0, pg_wal_syncs=syncs - syncs0)  # fmt: skip
        print(f"[{self.name}] {phase}: {r.get(count_key)} in {answered:.2f} s, server "
              f"{r['cpu_ms_per_1k']} ms CPU per 1k (dm_actor {dm:.2f} s + PostgreSQL "
              f"{pg:.2f} s over {wall:.2f} s), pg commits {r['pg_commits']}, WAL syncs "
              f"{r['pg_wal_syncs']}", file=sys.stderr)  # fmt: skip
        return r

    def run(self) -> dict[str, Any]:
        a = self.args
        assert self.devices is not None and self.app is not None
        out: dict[str, Any] = {"case": self.name, "nodes": self.n, "store": self.kind,
                               "cluster": self.cluster}  # fmt: skip
        aim = self.aim_file(a.devices, wrong=False)
        out["idle"] = self.idle(3.0)
        reg = self.measure("register", self.devices,
                           f"register {PREFIX} {a.devices} {a.window} {aim}", "done")  # fmt: skip
        upd = self.measure("update", self.devices, f"update {a.window}", "done")
        self.app.ask(f"channel {self.home_index()}")
        cmd = self.measure("commands", self.app,
                           f"commands {PREFIX} {a.devices} {a.commands} {a.connections} 10",
                           "accepted")  # fmt: skip
        out |= {"register": reg, "update": upd, "commands": cmd}
        phases = [cmd]
        if self.n >= 2:  # the same commands, each POSTed to the device's owner (no proxy)
            owners = self.aim_file(a.devices, wrong=False, http=True)
            direct = self.measure("commands_to_owner", self.app,
                                  f"commands {PREFIX} {a.devices} {a.commands} "
                                  f"{a.connections} 10 {owners}", "accepted")  # fmt: skip
            out["commands_to_owner"] = direct
            phases.append(direct)
        if self.n >= 2 and not self.shared:  # Updates to a wrong node, then to the owner again
            wrong_aim = self.aim_file(a.devices, wrong=True)
            owner, wrong = [upd], []
            for _ in range(2):
                self.devices.ask(f"aim {wrong_aim}")
                wrong.append(self.measure("update_forwarded", self.devices,
                                          f"update {a.window}", "done"))  # fmt: skip
                self.devices.ask(f"aim {aim}")
                owner.append(self.measure("update_owner_again", self.devices,
                                          f"update {a.window}", "done"))  # fmt: skip
            base = min(p["server_cpu_s"] / max(p["done"], 1) for p in owner)
            fwd = min(p["server_cpu_s"] / max(p["done"], 1) for p in wrong)
            out["update_forwarded"] = wrong
            out["update_owner_again"] = owner[1:]
            # an Update to a wrong node: 2 datagrams forwarded (the request, the answer)
            out["forward_us_per_datagram"] = round((fwd - base) / 2 * 1e6, 1)
            out["forward_overhead"] = round(fwd / base - 1, 3) if base else None
        out["devices"] = self.devices.ask("stats")
        out["app"] = self.app.ask("stats")
        out["invariants"] = invariants(out["devices"], phases)
        return out

    def device_status(self, device: str) -> str:
        """GET /v3/devices/{device} on the first live node: status and state."""
        node = next(n for n in self.nodes if n.alive())
        auth = {"Authorization": f"Bearer {h.API_KEY}"}
        request = urllib.request.Request(f"http://{node.http}/v3/devices/{device}", headers=auth)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return f"{r.status} {json.loads(r.read()).get('state')}"
        except urllib.error.HTTPError as e:
            return f"{e.code} {e.read()[:200]!r}"

    def home_index(self) -> int:
        if not self.cluster:
            return 0
        owner = self.owner_of.get(home_slot(application_id(h.API_KEY), 1024))
        names = [n.name for n in self.nodes]
        return names.index(owner) if owner in names else 0

    # -- failover --------------------------------------------------------------------------

    def failover(self) -> dict[str, Any]:
        a = self.args
        assert self.devices is not None and self.app is not None and self.mon is not None
        count = a.failover_devices
        aim = self.aim_file(count, wrong=False)
        reg = self.measure("register", self.devices,
                           f"register {PREFIX} {count} {a.window} {aim}", "done")  # fmt: skip
        home = self.home_index()
        self.app.ask(f"channel {home}")
        victim = next(k for k in reversed(range(self.n)) if k != home)
        name = self.nodes[victim].name
        mine = [i for i in range(count) if self.owner_index(i) == victim]
        k = min(a.failover_commands, len(mine) // 2)
        first, second = self.files / "inflight", self.files / "after"
        first.write_text("\n".join(map(str, mine[:k])) + "\n")
        second.write_text("\n".join(map(str, mine[k : 2 * k])) + "\n")
        self.devices.ask("mute 1")
        sent = self.app.ask(f"batch inflight {PREFIX} {first}")
        time.sleep(1.0)  # the victim sends its first attempts (dropped by the muted devices)
        slots = {s for s, n in self.owner_of.items() if n == name}
        t_kill = time.monotonic()
        self.nodes[victim].proc.popen.kill()
        self.devices.ask("mute 0")
        self.app.send(f"batch after {PREFIX} {second} 120")
        reowned = None
        while time.monotonic() - t_kill < 120:
            held = leases(self.mon)
            if all(held.get(s) not in (None, name) for s in slots):
                reowned = time.monotonic() - t_kill
                break
            time.sleep(0.05)
        after = self.app.read_json(180)
        w1 = self.app.ask(f"wait inflight {t_kill} 60", 90)
        w2 = self.app.ask(f"wait after {t_kill} 60", 90)
        stats = self.devices.ask("stats")
        refused = after.get("refused", [])
        known_now = {device: self.device_status(device) for device in refused[:5]}
        if refused:  # (not accepted: is the device known now?)
            print(f"[failover] {len(refused)} commands refused ({after['http_statuses']}); "
                  f"GET /v3/devices/ID now, first 5: {known_now}", file=sys.stderr)  # fmt: skip
        out = {"case": "failover", "nodes": self.n, "devices": count, "register": reg,
               "victim": name, "victim_slots": len(slots), "victim_devices": len(mine),
               "lease_ttl": a.lease_ttl, "inflight": sent, "after": after,
               "reowned_s": round(reowned, 3) if reowned is not None else None,
               "inflight_answers": w1, "after_answers": w2, "devices_stats": stats,
               "refused_known_now": known_now,
               "app": self.app.ask("stats")}  # fmt: skip
        out["invariants"] = {
            "accepted": w1["accepted"] + w2["accepted"],
            "answered": w1["answered"] + w2["answered"],
            "duplicate_answers": w2["duplicate_answers"],
            "executed_ids": stats["executed_ids"],
            "executed_more_than_once": stats["executed_more_than_once"],
        }
        print(f"[failover] {len(slots)} slots of {name} re-owned {out['reowned_s']} s after "
              f"kill -9; in flight: first answer {w1['first_s']} s, last {w1['last_s']} s "
              f"({w1['answered']}/{w1['accepted']}); new: first {w2['first_s']} s, last "
              f"{w2['last_s']} s ({w2['answered']}/{w2['accepted']})", file=sys.stderr)  # fmt: skip
        return out


def invariants(devices: dict[str, Any], phases: list[dict[str, Any]]) -> dict[str, Any]:
    accepted = sum(p["accepted"] for p in phases)
    answered = sum(p["answered"] for p in phases)
    return {"accepted": accepted, "answered": answered,
            "duplicate_answers": max(p["duplicate_answers"] for p in phases),
            "executed_ids": devices["executed_ids"],
            "executed_more_than_once": devices["executed_more_than_once"],
            "ok": accepted == answered == devices["executed_ids"]
            and not devices["executed_more_than_once"]
            and not max(p["duplicate_answers"] for p in phases)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["sqlite1", "pg1", "c1", "c2", "c3",
                                                        "failover"],
                        choices=["sqlite1", "pg1", "c1", "c2", "c3", "failover"])  # fmt: skip
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--window", type=int, default=300, help="Registers/Updates in flight")
    parser.add_argument("--connections", type=int, default=16,
                        help="HTTP connections in all, spread over the nodes")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the cases (order rotated; least CPU kept)")  # fmt: skip
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--topology", choices=("a", "b"), default="b",
                        help="a: every node on 127.0.0.1 sharing the CoAP port (SO_REUSEPORT); "
                        "b: node k on 127.0.0.k+1")  # fmt: skip
    parser.add_argument("--failover-nodes", type=int, default=3, choices=(2, 3))
    parser.add_argument("--failover-devices", type=int, default=10000)
    parser.add_argument("--failover-commands", type=int, default=200,
                        help="commands in flight at the kill (and as many after it)")  # fmt: skip
    parser.add_argument("--profile", nargs="*", default=[],
                        choices=["register", "update", "commands", "update_forwarded"],
                        help="py-spy every node over these phases (on stderr)")  # fmt: skip
    parser.add_argument("--logs", help="where the nodes' logs go (default: a new temp dir)")
    parser.add_argument("--server-cpu", default=h.SERVER_CPU)
    parser.add_argument("--load-cpu", default=h.LOAD_CPU)
    args = parser.parse_args()
    args.logs = args.logs or tempfile.mkdtemp(prefix="dm-bench-cluster-logs-")
    print(f"nodes' logs in {args.logs}", file=sys.stderr)
    if args.load_cpu:
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    pg = Pg(args.server_cpu)
    results: list[dict[str, Any]] = []
    try:
        cases = [c for c in args.cases if c != "failover"]
        for k in range(args.rounds):
            order = cases[k % len(cases) :] + cases[: k % len(cases)] if cases else []
            results.extend(one(name, pg, args, k) for name in order)
        if "failover" in args.cases:
            results.append(one("failover", pg, args, 0))
        version = pg.version()
    finally:
        pg.server.remove()
    rows = table(results)
    result = {"benchmark": "cluster", "devices": args.devices, "commands": args.commands,
              "window": args.window, "lease_ttl": args.lease_ttl, "postgres": version,
              "server_cpu": args.server_cpu, "load_cpu": args.load_cpu,
              "machine": h.machine(), "results": results}  # fmt: skip
    if not rows:  # (failover only)
        print(json.dumps(result, separators=(",", ":")))
    else:
        columns = ["case", "rounds", "idle_ms_s", "register_ms_1k", "update_ms_1k", "command_ms_1k",
                   "register_vs_pg1", "update_vs_pg1", "command_vs_pg1",
                   "cmd_to_owner_ms_1k", "fwd_us_dgram",
                   "fwd_overhead", "accepted", "answered", "executed_ids",
                   "executed_more_than_once", "error"]  # fmt: skip
        h.emit(result, rows, columns)
    for r in results:
        if r.get("case") == "failover" and "error" not in r:
            print(f"failover: {r['victim_slots']} slots / {r['victim_devices']} devices of "
                  f"node {r['victim']} (of {r['nodes']}, {r['devices']} devices, lease_ttl "
                  f"{r['lease_ttl']} s): re-owned {r['reowned_s']} s after kill -9; in-flight "
                  f"commands answered {r['inflight_answers']['first_s']}-"
                  f"{r['inflight_answers']['last_s']} s; new ones "
                  f"{r['after_answers']['first_s']}-{r['after_answers']['last_s']} s; "
                  f"invariants {r['invariants']}")  # fmt: skip


def one(name: str, pg: Pg, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    try:
        with Case(name, pg, args, round_) as case:
            result = case.failover() if name == "failover" else case.run()
    except (RuntimeError, TimeoutError) as e:
        print(f"[{name}] FAILED: {e}", file=sys.stderr)
        result = {"case": name, "error": str(e)}
    result["round"] = round_
    result["node_errors"] = node_errors(f"{args.logs}/{name}-{round_}")
    return result


def node_errors(logs: str) -> dict[str, list[str]]:
    """Per node log, its lines that say a node stopped on an error (and the first warnings)."""
    found: dict[str, list[str]] = {}
    for path in sorted(Path(logs).parent.glob(Path(logs).name + "-*.log")):
        lines = path.read_text(errors="replace").splitlines()
        said = [line[:300] for line in lines if line.startswith("dm-actor: error")]
        said += [line[:300] for line in lines if " ERROR " in line][:5]
        said += [line[:300] for line in lines if " WARNING " in line][:5]
        if said:
            found[path.name] = said
    return found


PHASES = (("register", "register"), ("update", "update"), ("commands", "command"))


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per case: per phase the least CPU per 1k operations over the rounds (and its
    ratio to pg1's), forwarding from the round with the cheapest Updates, the invariants
    summed over every round."""
    names = list(dict.fromkeys(r["case"] for r in results if r["case"] != "failover"))
    best: dict[str, dict[str, float]] = {}
    rows = []
    for name in names:
        runs = [r for r in results if r["case"] == name and "error" not in r]
        row: dict[str, Any] = {"case": name, "rounds": len(runs)}
        if not runs:
            row["error"] = next(r["error"] for r in results if r["case"] == name)
            rows.append(row)
            continue
        best[name] = {k: min(r[p]["cpu_ms_per_1k"] for r in runs) for p, k in PHASES}
        for _p, k in PHASES:
            row[f"{k}_ms_1k"] = best[name][k]
        row["idle_ms_s"] = min(r["idle"]["dm_actor_ms_per_s"] + r["idle"]["postgres_ms_per_s"]
                               for r in runs)  # fmt: skip
        direct = [r["commands_to_owner"]["cpu_ms_per_1k"] for r in runs
                  if "commands_to_owner" in r]  # fmt: skip
        if direct:
            row["cmd_to_owner_ms_1k"] = min(direct)
        forwarded = [r for r in runs if r.get("forward_us_per_datagram") is not None]
        if forwarded:
            cheapest = min(forwarded, key=lambda r: r["update"]["cpu_ms_per_1k"])
            row["fwd_us_dgram"] = cheapest["forward_us_per_datagram"]
            row["fwd_overhead"] = cheapest["forward_overhead"]
        for key in ("accepted", "answered", "executed_ids", "executed_more_than_once"):
            row[key] = sum(r["invariants"][key] for r in runs)
        rows.append(row)
    for row in rows:
        if "pg1" in best and row["case"] in best:
            for _p, k in PHASES:
                row[f"{k}_vs_pg1"] = round(best[row["case"]][k] / best["pg1"][k], 2)
    return rows


if __name__ == "__main__":
    main()
