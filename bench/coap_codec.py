"""Throughput of our CoAP datagram codec against aiocoap's, on the captured interop datagrams.

Decodes (and encodes) every UDP datagram in tests/vectors with `dm_actor.coap.message` and with
aiocoap (`aiocoap.Message.decode(data)`, `msg.encode()`), in the same process and run. Each
round times every case once, in an order rotated per round so no case always goes first; a
case's result is its best round. Prints one JSON line, then a table.

    python bench/coap_codec.py [--rounds N] [--batch SECONDS]
    taskset -c 1 python bench/coap_codec.py      # pinned to one core

aiocoap comes with the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dm_actor.coap.message import decode, encode

if TYPE_CHECKING:
    from collections.abc import Callable

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "vectors"


def load_datagrams() -> list[bytes]:
    """Every UDP datagram of tests/vectors/*.jsonl, in file order."""
    datagrams: list[bytes] = []
    for path in sorted(VECTORS.glob("*.jsonl")):
        lines = path.read_text().splitlines()
        if json.loads(lines[0])["transport"] == "udp":
            datagrams.extend(bytes.fromhex(json.loads(line)["hex"]) for line in lines[1:] if line)
    return datagrams


def cases(datagrams: list[bytes]) -> dict[str, Callable[[], object]]:
    """One callable per case; each processes the whole corpus once."""
    from aiocoap import Message as AiocoapMessage
    from aiocoap.message import Direction

    ours = [decode(d) for d in datagrams]
    theirs = [AiocoapMessage.decode(d) for d in datagrams]
    for m in theirs:  # aiocoap only encodes messages marked outgoing
        m.direction = Direction.OUTGOING
    if [encode(m) for m in ours] != datagrams or [m.encode() for m in theirs] != datagrams:
        raise SystemExit("a codec does not round-trip the corpus; numbers would be meaningless")
    aiocoap_decode = AiocoapMessage.decode
    return {
        "ours_decode": lambda: [decode(d) for d in datagrams],
        "aiocoap_decode": lambda: [aiocoap_decode(d) for d in datagrams],
        "ours_encode": lambda: [encode(m) for m in ours],
        "aiocoap_encode": lambda: [m.encode() for m in theirs],
    }


def _time(fn: Callable[[], object], loops: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def _loops_for(fn: Callable[[], object], batch: float) -> int:
    loops = 1
    while (elapsed := _time(fn, loops)) < batch / 4:
        loops *= 2
    return max(1, round(loops * batch / elapsed))


def run(rounds: int, batch: float) -> dict[str, object]:
    """Time every case `rounds` times; the result's rates are messages per second."""
    datagrams = load_datagrams()
    table = cases(datagrams)
    names = list(table)
    loops = {name: _loops_for(fn, batch) for name, fn in table.items()}
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            best[name] = min(best[name], _time(table[name], loops[name]) / loops[name])
    rate = {name: len(datagrams) / best[name] for name in names}
    return {
        "bench": "coap_codec",
        "python": platform.python_version(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "datagrams": len(datagrams),
        "bytes": sum(map(len, datagrams)),
        "rounds": rounds,
        **{f"{name}_msgs_per_s": round(rate[name]) for name in names},
        "decode_ratio": round(rate["ours_decode"] / rate["aiocoap_decode"], 2),
        "encode_ratio": round(rate["ours_encode"] / rate["aiocoap_encode"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per case (best wins)")
    parser.add_argument("--batch", type=float, default=0.05, help="seconds per timed batch")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch <= 0:
        parser.error("--rounds must be >= 1 and --batch > 0")
    try:
        result = run(args.rounds, args.batch)
    except ImportError:
        print("aiocoap is missing: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    print(json.dumps(result))
    print(f"{'':8} {'dm_actor':>12} {'aiocoap':>12} {'ratio':>7}   (messages/s)")
    for op in ("decode", "encode"):
        ours, theirs = result[f"ours_{op}_msgs_per_s"], result[f"aiocoap_{op}_msgs_per_s"]
        print(f"{op:8} {ours:>12,} {theirs:>12,} {result[f'{op}_ratio']:>6}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
