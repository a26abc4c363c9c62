"""Memory per idle registered device: N devices registered with a real dm_actor Supervisor.

Each measurement runs in a fresh child process (this script with `--child`), so one case's
garbage and freed-but-kept heap never counts against another's. A child starts the case,
settles, runs `gc.collect()`, reads its resident set size from /proc/self/statm, registers N
devices, settles, collects and reads it again: (after - before) / N is the cost of one device.
No tracemalloc in these children (it costs memory itself); a separate child takes a
tracemalloc snapshot diff over a few thousand devices for the breakdown.

Cases, each with N devices:

- `dm_actor`: a Supervisor (MemoryStore, replies discarded) running under Trio in this
  process is fed real Register datagrams (`POST /rd?ep=dev-I&lt=86400&b=U`, link-format
  objects) through `on_datagram`, from distinct addresses, in batches with a checkpoint in
  between so the actors start; the events are drained as an API reader would. Also reports
  registrations/s of this in-process path and the full `gc.collect()` pause before and after
  `gc.freeze()`.
- `dm_actor_frozen`: the same with `gc.freeze()` after every batch of registrations, a
  policy the server could adopt: registrations/s without the cyclic GC's full passes.
- `floor`: a parked Trio task per device on the smallest mailbox (one coroutine, a bound
  method as abort function, a shared task name): the floor for one-task-per-device.
- `channel`: a Trio task per device reading a Trio memory channel.
- `--ablations`: the floor with one of the current actor task's costs added (trio's default
  task name, a closure as abort function, two more coroutine layers), then all three.

    python bench/memory.py                        # N = 10k and 100k
    python bench/memory.py --million              # and 1M (about 6 GB at peak)
    taskset -c 1 python bench/memory.py --ablations

Prints one JSON line, then tables.
"""

from __future__ import annotations

import argparse
import ast
import functools
import gc
import json
import linecache
import math
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel
import trio.testing

from dm_actor.actors import router
from dm_actor.actors.supervisor import Supervisor
from dm_actor.coap.message import Message, encode, path_options, query_options
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.config import Settings
from dm_actor.store.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

PAGE = os.sysconf("SC_PAGE_SIZE")
ROOT = Path(__file__).resolve().parent.parent
OBJECTS = b"</1/0>,</3/0>,</3303/0>"
CREATED = Code.CREATED.value
_LINK_FORMAT = (OptionNumber.CONTENT_FORMAT.value, bytes([ContentFormat.LINK_FORMAT.value]))
_RD = path_options("rd")
BASELINES = ("floor", "channel")
ABLATIONS = ("shape_name", "shape_closure", "shape_depth3", "shape_actor")

Result = dict[str, Any]


def rss() -> int:
    """The resident set size now, in bytes (no tracemalloc, no allocation worth counting)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def register_datagram(i: int) -> bytes:
    """Device i's Register: CON POST /rd?ep=dev-I&lt=86400&b=U with three object instances."""
    options = (*_RD, *query_options(f"ep=dev-{i}&lt=86400&b=U"), _LINK_FORMAT)
    options = tuple(sorted(options, key=lambda o: o[0]))
    return encode(
        Message(MessageType.CON, Code.POST, i & 0xFFFF, i.to_bytes(4, "big"), options, OBJECTS)
    )


def address(i: int) -> tuple[str, int]:
    """Device i's distinct fake UDP source address."""
    return (f"127.0.{(i >> 8) & 255}.{i & 255}", 1024 + (i >> 16))


def _timed_collect() -> float:
    start = time.perf_counter()
    gc.collect()
    return time.perf_counter() - start


# -- the dm_actor case ------------------------------------------------------------------------


class Replies:
    """The UDP send callback: counts replies by code, keeps none."""

    __slots__ = ("codes",)

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}

    def __call__(self, data: bytes, addr: object) -> None:
        code = data[1]
        self.codes[code] = self.codes.get(code, 0) + 1


async def start_supervisor(nursery: trio.Nursery) -> tuple[Supervisor, Replies]:
    """A running Supervisor with one warm-up device registered (first-use costs paid)."""
    sup = Supervisor(Settings(), store=MemoryStore())
    await nursery.start(sup.run)
    replies = Replies()
    sup.attach_udp(replies)
    sup.on_datagram(register_datagram(1 << 30), ("10.0.0.1", 40000))
    sup.events.take(1 << 30)
    await trio.testing.wait_all_tasks_blocked()
    replies.codes.clear()
    return sup, replies


async def register(sup: Supervisor, n: int, batch: int, *, freeze: bool = False) -> None:
    """Feed n Register datagrams through `on_datagram`, letting the actors start per batch.

    With `freeze`, `gc.freeze()` after every batch keeps the registered devices out of the
    cyclic collector's generations.
    """
    on_datagram = sup.on_datagram
    events = sup.events
    for start in range(0, n, batch):
        for i in range(start, min(n, start + batch)):
            on_datagram(register_datagram(i), address(i))
        events.take(1 << 30)  # what the API's reader does
        if freeze:
            gc.freeze()
        await trio.lowlevel.checkpoint()
        while sup._admission:  # let the admission task take the batch (2 ms a pass)
            await trio.lowlevel.checkpoint()
    await trio.testing.wait_all_tasks_blocked()
    events.take(1 << 30)


async def dm_actor_case(n: int, batch: int, *, freeze: bool = False) -> Result:
    # Registers are fed in-process faster than a socket could; one waiting longer than the
    # admission wait (a GC pass at 100k can take that) would be shed with 5.03: this case
    # measures memory, not admission
    router.ADMISSION_WAIT = math.inf
    async with trio.open_nursery() as nursery:
        sup, replies = await start_supervisor(nursery)
        gc.collect()
        before = rss()
        start = time.perf_counter()
        await register(sup, n, batch, freeze=freeze)
        elapsed = time.perf_counter() - start
        gc.unfreeze()
        gc_pause = _timed_collect()
        after = rss()
        gc.freeze()
        gc_pause_frozen = _timed_collect()
        if len(sup.by_endpoint) != n + 1 or replies.codes != {CREATED: n}:
            raise SystemExit(f"not every device registered: {replies.codes}, {sup.statistics}")
        result: Result = {
            "rss_before": before,
            "rss_after": after,
            "seconds": elapsed,
            "registrations_per_s": n / elapsed,
            "gc_full_ms": gc_pause * 1e3,
            "gc_full_frozen_ms": gc_pause_frozen * 1e3,
            "frozen_objects": gc.get_freeze_count(),
            "events_dropped": sup.events.dropped,
        }
        nursery.cancel_scope.cancel()
    return result


# -- baselines ---------------------------------------------------------------------------------


class MiniMailbox:
    """The smallest thing a parked task can wait on: a waiter slot and a lazy item list."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[object] | None = None
        self.waiter: trio.lowlevel.Task | None = None

    def abort(self, _: object) -> trio.lowlevel.Abort:
        self.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED


async def parked(box: MiniMailbox) -> None:
    box.waiter = trio.lowlevel.current_task()
    await trio.lowlevel.wait_task_rescheduled(box.abort)


async def parked_closure(box: MiniMailbox) -> None:
    box.waiter = trio.lowlevel.current_task()

    def abort(_: object) -> trio.lowlevel.Abort:
        box.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


async def host(box: MiniMailbox) -> None:  # the supervisor's _host -> actor.run -> mailbox.wait
    await run(box)


async def run(box: MiniMailbox) -> None:
    await parked(box)


async def host_closure(box: MiniMailbox) -> None:
    await run_closure(box)


async def run_closure(box: MiniMailbox) -> None:
    await parked_closure(box)


async def channel_reader(receive: trio.MemoryReceiveChannel[object]) -> None:
    async for _ in receive:
        pass


async def baseline_case(case: str, n: int, batch: int) -> Result:
    """n parked tasks of one shape; the mailboxes (or send channels) are kept in a list."""
    shapes: dict[str, tuple[Callable[[MiniMailbox], Awaitable[None]], bool]] = {
        "floor": (parked, True),
        "shape_name": (parked, False),
        "shape_closure": (parked_closure, True),
        "shape_depth3": (host, True),
        "shape_actor": (host_closure, False),
    }
    keep: list[object] = []
    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        before = rss()
        start = time.perf_counter()
        for first in range(0, n, batch):
            for _ in range(first, min(n, first + batch)):
                if case == "channel":
                    send, receive = trio.open_memory_channel[object](64)
                    keep.append(send)
                    nursery.start_soon(channel_reader, receive, name="device")
                else:
                    fn, named = shapes[case]
                    box = MiniMailbox()
                    keep.append(box)
                    if named:
                        nursery.start_soon(fn, box, name="device")
                    else:
                        nursery.start_soon(fn, box)
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()
        elapsed = time.perf_counter() - start
        gc_pause = _timed_collect()
        after = rss()
        result: Result = {
            "rss_before": before,
            "rss_after": after,
            "seconds": elapsed,
            "spawns_per_s": n / elapsed,
            "gc_full_ms": gc_pause * 1e3,
        }
        nursery.cancel_scope.cancel()
    return result


# -- the breakdown -----------------------------------------------------------------------------


def _function_at(filename: str, lineno: int, cache: dict[str, list[tuple[int, int, str]]]) -> str:
    """The qualified name of the innermost function or class around a line, or ''."""
    if filename not in cache:
        spans: list[tuple[int, int, str]] = []
        try:
            tree = ast.parse(Path(filename).read_text())
        except (OSError, SyntaxError, ValueError):
            tree = None

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    spans.append((child.lineno, child.end_lineno or child.lineno, name))
                    walk(child, name + ".")
                else:
                    walk(child, prefix)

        if tree is not None:
            walk(tree, "")
        cache[filename] = spans
    inside = [s for s in cache[filename] if s[0] <= lineno <= s[1]]
    return max(inside, key=lambda s: s[0])[2] if inside else ""


def _short(filename: str) -> str:
    for root in (str(ROOT) + "/", "site-packages/"):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


async def breakdown_case(n: int, batch: int, top: int) -> Result:
    """tracemalloc snapshot diff of n registrations by line, and one device's object sizes."""
    async with trio.open_nursery() as nursery:
        sup, _ = await start_supervisor(nursery)
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        await register(sup, n, batch)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        stats = after.compare_to(before, "lineno")
        total = sum(s.size_diff for s in stats)
        spans: dict[str, list[tuple[int, int, str]]] = {}
        lines = []
        for stat in stats[:top]:
            frame = stat.traceback[0]
            lines.append(
                {
                    "where": f"{_short(frame.filename)}:{frame.lineno}",
                    "function": _function_at(frame.filename, frame.lineno, spans),
                    "code": linecache.getline(frame.filename, frame.lineno).strip(),
                    "bytes_per_device": stat.size_diff / n,
                    "objects_per_device": stat.count_diff / n,
                }
            )
        result: Result = {
            "tracemalloc_bytes_per_device": total / n,
            "top_lines": lines,
            "components": one_device(sup, n),
        }
        nursery.cancel_scope.cancel()
    return result


def one_device(sup: Supervisor, n: int) -> dict[str, float]:
    """sys.getsizeof of one device's objects by component; shared objects are not counted.

    An object counts when device 0 and device 1 do not share it; registry containers are
    counted as their size divided by their length (what one more device costs on average).
    """
    a, b = sup.by_endpoint["dev-0"], sup.by_endpoint["dev-1"]

    def objects(actor: Any) -> dict[str, list[object]]:
        reg, coap, queue, box = actor.reg, actor.coap, actor.queue, actor.mailbox
        task = box._waiter
        chain: list[object] = [task, task.context, task.name, task._child_nurseries]
        chain += [task._counter, task._abort_func, *(task._abort_func.__closure__ or ())]
        coro = task.coro
        chain.append(coro.cr_frame)  # trio asks for it at spawn, so it exists
        while coro is not None:
            chain.append(coro)
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        record = sup.store.registrations[reg.endpoint]  # type: ignore[attr-defined]
        return {
            "DeviceActor": [actor],
            "Registration (+ endpoint, reg_id, lifetime, times)": [
                reg,
                reg.endpoint,
                reg.reg_id,
                reg.lifetime,
                reg.registered_at,
                reg.updated_at,
            ],
            "RegisteredObjects (+ entries)": [reg.objects, reg.objects.entries],
            "CoapEndpoint (+ counters)": [coap, coap._mid, coap._token_n],
            "DeviceQueue (+ list, awake_until)": [queue, queue.queue, queue.awake_until],
            "Mailbox (+ item list)": [box, box._items],
            "address (tuple, host, port)": [actor.addr, *actor.addr],
            "trio Task (+ context, name, coroutines, frame, abort closure)": chain,
            "MemoryStore record (+ links text)": [record, record.links],
        }

    mine, theirs = objects(a), objects(b)
    out: dict[str, float] = {}
    for component, objs in mine.items():
        shared = {id(o) for o in theirs[component]}
        seen: set[int] = set()
        size = 0
        for obj in objs:
            if obj is None or id(obj) in shared or id(obj) in seen:
                continue
            seen.add(id(obj))
            size += sys.getsizeof(obj)
        out[component] = size
    containers = (
        sys.getsizeof(sup.by_endpoint) + sys.getsizeof(sup.by_reg_id) + sys.getsizeof(sup.by_addr)
    )
    out["registry dicts (by_endpoint, by_reg_id, by_addr), per entry"] = containers / len(
        sup.by_endpoint
    )
    task: Any = a.mailbox._waiter
    children = task.parent_nursery._children
    tasks = trio._core._run.GLOBAL_RUN_CONTEXT.runner.tasks
    out["trio sets (nursery children, runner tasks), per entry"] = sys.getsizeof(children) / len(
        children
    ) + sys.getsizeof(tasks) / len(tasks)
    heap = sup._lifetimes
    out["lifetime heap entry (tuple + slot)"] = sys.getsizeof(heap[-1]) + sys.getsizeof(heap) / len(
        heap
    )
    store = sup.store.registrations  # type: ignore[attr-defined]
    out["MemoryStore dict, per entry"] = sys.getsizeof(store) / len(store)
    replies = sup._replies
    per_reply = sum(sys.getsizeof(o) for o in (*next(iter(replies.items())),))
    out["reply cache (bounded), amortized"] = (
        sys.getsizeof(replies) + per_reply * len(replies)
    ) / n
    return out


# -- orchestration -----------------------------------------------------------------------------


def child(case: str, n: int, batch: int, top: int) -> Result:
    if case.startswith("dm_actor"):
        case_fn = functools.partial(dm_actor_case, freeze=case == "dm_actor_frozen")
        result = trio.run(case_fn, n, batch)
    elif case == "breakdown":
        result = trio.run(breakdown_case, n, batch, top)
    else:
        result = trio.run(baseline_case, case, n, batch)
    if "rss_after" in result:
        result["bytes_per_device"] = (result["rss_after"] - result["rss_before"]) / n
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(case=case, n=n)
    return result


def spawn(case: str, n: int, batch: int, top: int) -> Result:
    """Run one case in a fresh interpreter (same CPU affinity) and read its JSON line."""
    argv = [sys.executable, __file__, "--child", case, str(n), "--batch", str(batch)]
    argv += ["--top", str(top)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{case} N={n} failed:\n{done.stderr}")
    result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(results: list[Result], breakdown: Result | None) -> str:
    rows = ["| N | case | bytes/device (RSS) | vs floor | rate/s | full gc.collect | frozen |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    floors = {r["n"]: r["bytes_per_device"] for r in results if r["case"] == "floor"}
    for r in results:
        floor = floors.get(r["n"])
        ratio = f"{r['bytes_per_device'] / floor:.2f}x" if floor else ""
        rate = r.get("registrations_per_s", r.get("spawns_per_s", 0.0))
        frozen = f"{r['gc_full_frozen_ms']:,.1f} ms" if "gc_full_frozen_ms" in r else ""
        rows.append(
            f"| {r['n']:,} | {r['case']} | {r['bytes_per_device']:,.0f} | {ratio} | "
            f"{rate:,.0f} | {r['gc_full_ms']:,.0f} ms | {frozen} |"
        )
    if breakdown is not None:
        head = f"tracemalloc, {breakdown['n']:,} devices: "
        head += f"{breakdown['tracemalloc_bytes_per_device']:,.0f} B per device; top lines:"
        rows += ["", head, "", "| B/device | objects | where | code |"]
        rows.append("| ---: | ---: | --- | --- |")
        for line in breakdown["top_lines"]:
            rows.append(
                f"| {line['bytes_per_device']:,.0f} | {line['objects_per_device']:.2f} | "
                f"{line['where']} ({line['function']}) | `{line['code']}` |"
            )
        rows += ["", "one device, sys.getsizeof:", "", "| component | bytes |", "| --- | ---: |"]
        components = breakdown["components"]
        for name, size in components.items():
            rows.append(f"| {name} | {size:,.0f} |")
        rows.append(f"| total | {sum(components.values()):,.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N")
    parser.add_argument("--million", action="store_true", help="also N = 1,000,000")
    parser.add_argument("--ablations", action="store_true", help="the task-shape variants")
    parser.add_argument("--batch", type=int, default=1000, help="datagrams between checkpoints")
    parser.add_argument("--breakdown", type=int, default=5000, help="devices traced; 0: none")
    parser.add_argument("--top", type=int, default=10, help="lines in the breakdown")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, n = args.child[0], int(args.child[1])
        print(json.dumps(child(case, n, args.batch, args.top)), flush=True)
        os._exit(0)  # tearing down a million tasks takes minutes and measures nothing
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.million:
        sizes.append(1_000_000)
    cases = [*BASELINES, *(ABLATIONS if args.ablations else ()), "dm_actor", "dm_actor_frozen"]
    results = [spawn(case, n, args.batch, args.top) for n in sizes for case in cases]
    breakdown = spawn("breakdown", args.breakdown, args.batch, args.top) if args.breakdown else None
    summary = {
        "benchmark": "memory",
        "python": platform.python_version(),
        "trio": trio.__version__,
        "affinity": sorted(os.sched_getaffinity(0)),
        "results": results,
        "breakdown": breakdown,
    }
    print(json.dumps(summary))
    print(table(results, breakdown))


if __name__ == "__main__":
    main()
