"""`dm-actor simulate`: run a fleet of simulated devices against a server for a bounded time.

Owns the command's arguments, the live progress line (stderr) and the summary (one JSON line,
then a table, on stdout). `add_parser` and `run` are what `dm_actor.cli` wires in. The run
stops by itself after `--duration` seconds, or earlier on SIGINT/SIGTERM, and always prints
the summary.
"""

from __future__ import annotations

import ipaddress
import json
import math
import resource
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlsplit

import trio

from dm_actor.sim.client import MIN_BUFFER_SIZE, SEND_FORMATS, Profile, Totals
from dm_actor.sim.fleet import BINDINGS, Fleet, FleetConfig, raise_fd_limit

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

_SCHEMES = {"coap": "U", "coap+tcp": "T"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `simulate` command to `dm-actor`'s subcommands."""
    p = subparsers.add_parser(
        "simulate",
        help="run simulated LwM2M devices against a server for a bounded time",
        description="Simulated LwM2M clients over loopback: many devices per process.",
    )
    p.add_argument(
        "--server",
        default="coap://127.0.0.1:5683",
        help="coap://HOST:PORT or coap+tcp://HOST:PORT (default %(default)s)",
    )
    p.add_argument("--devices", type=int, default=100, metavar="N", help="default %(default)s")
    p.add_argument(
        "--binding",
        choices=(*BINDINGS, "mixed"),
        help="U, UQ, T, TQ or mixed (all four in turn); default from the scheme",
    )
    p.add_argument(
        "--lifetime",
        type=int,
        default=86400,
        metavar="S",
        help="registration lifetime (default %(default)s)",
    )
    p.add_argument(
        "--awake",
        type=float,
        default=93.0,
        metavar="S",
        help="queue mode: awake window after the last exchange (default %(default)s)",
    )
    p.add_argument(
        "--sleep",
        type=float,
        metavar="S",
        help="queue mode: wake on its own after S seconds asleep (default: only for Updates)",
    )
    p.add_argument(
        "--register-on-wake",
        action="store_true",
        help="queue mode: wake with a full Register (Anjay) instead of an Update",
    )
    p.add_argument(
        "--loss",
        type=float,
        default=0.0,
        metavar="P",
        help="datagram loss probability, each direction",
    )
    p.add_argument(
        "--duplicate", type=float, default=0.0, metavar="P", help="datagram duplication probability"
    )
    p.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="datagram delay, uniform 0..S seconds"
    )
    p.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="R",
        help="first Registers per second (0: all at once)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="S",
        help="stop after S seconds (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source-addresses",
        type=int,
        default=254,
        metavar="N",
        help="source addresses 127.0.0.2 onwards (devices per shared socket)",
    )
    p.add_argument("--prefix", default="sim", help="endpoint names are PREFIX-INDEX")
    p.add_argument(
        "--sample-period",
        type=float,
        default=5.0,
        metavar="S",
        help="sensor values change every S seconds",
    )
    p.add_argument(
        "--send",
        type=float,
        metavar="S",
        help="LwM2M Send (POST /dp) of each device's temperatures every S seconds (default: none)",
    )
    p.add_argument(
        "--send-format",
        choices=tuple(SEND_FORMATS),
        default="cbor",
        help="the Sends' format: SenML CBOR (as Anjay) or SenML JSON (as Wakaama); "
        "default %(default)s",
    )
    p.add_argument(
        "--temperatures",
        type=int,
        default=1,
        metavar="N",
        help="/3303 instances per device (more make longer Registers and Sends); "
        "default %(default)s",
    )
    p.add_argument(
        "--lights", type=int, default=1, metavar="N", help="/3311 instances per device (default 1)"
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        metavar="N",
        help="small-buffer devices, as Anjay's --outbuf-size N --inbuf-size N: Register, Update "
        "and Send in Block1 blocks when over N bytes, a bare 4.13 to a request over N bytes, "
        f"request bodies taken in Block1 blocks (at least {MIN_BUFFER_SIZE}; default: no limit)",
    )
    p.add_argument("--progress", type=float, default=1.0, metavar="S",
                   help="progress line interval (0: none)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """The fleet the arguments describe.

    Raises:
        ValueError: a bad server URI or a value out of range.
    """
    url = urlsplit(args.server)
    if url.scheme not in _SCHEMES or not url.hostname:
        raise ValueError(f"--server must be coap://HOST:PORT or coap+tcp://HOST:PORT, "
                         f"not {args.server!r}")  # fmt: skip
    host = _ipv4(url.hostname)
    server = (host, url.port or 5683)
    binding = args.binding or _SCHEMES[url.scheme]
    bindings = tuple(BINDINGS) if binding == "mixed" else (binding,)
    if args.duration <= 0 or not math.isfinite(args.duration):
        raise ValueError("--duration must be a positive number of seconds")
    if args.send is not None and not (args.send > 0 and math.isfinite(args.send)):
        raise ValueError("--send must be a positive number of seconds")
    if not 0 <= args.temperatures <= 1000 or not 0 <= args.lights <= 1000:
        raise ValueError("--temperatures and --lights must be within 0..1000")
    if args.buffer_size is not None and args.buffer_size < MIN_BUFFER_SIZE:
        raise ValueError(f"--buffer-size must be at least {MIN_BUFFER_SIZE} bytes")
    profile = Profile(
        awake=args.awake,
        sleep=args.sleep,
        register_on_wake=args.register_on_wake,
        send_interval=args.send,
        send_format=SEND_FORMATS[args.send_format],
        buffer_size=args.buffer_size,
    )
    return FleetConfig(
        server=server,
        devices=args.devices,
        bindings=bindings,
        lifetime=args.lifetime,
        ramp=args.ramp,
        loss=args.loss,
        duplicate=args.duplicate,
        delay=args.delay,
        seed=args.seed,
        source_addresses=args.source_addresses,
        prefix=args.prefix,
        sample_period=args.sample_period,
        temperatures=args.temperatures,
        lights=args.lights,
        profile=profile,
    )


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
        return str(infos[0][4][0])


def run(args: argparse.Namespace) -> int:
    """Run `dm-actor simulate`; returns the exit code (2: bad arguments)."""
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"dm-actor simulate: error: {exc}", file=sys.stderr)
        return 2
    raise_fd_limit()
    summary = trio.run(simulate, config, args.duration, args.progress)
    print_summary(summary, sys.stdout)
    return 0


async def simulate(
    config: FleetConfig, duration: float, progress: float = 1.0, out: TextIO = sys.stderr
) -> dict[str, object]:
    """Run a fleet for `duration` seconds (less on SIGINT/SIGTERM); return the summary."""
    fleet = Fleet(config)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            await nursery.start(fleet.run)
            end = fleet.started_at + duration
            tick = progress if progress > 0 else 1.0
            while (now := trio.current_time()) < end:
                await trio.sleep_until(min(end, now + tick))
                if progress > 0:
                    print(_progress_line(fleet, trio.current_time() - fleet.started_at),
                          file=out, flush=True)  # fmt: skip
            nursery.cancel_scope.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - wall0
    return summarise(fleet, elapsed, usage0, usage)


async def _stop_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


def _progress_line(fleet: Fleet, elapsed: float) -> str:
    t = fleet.totals
    return (
        f"[{elapsed:7.1f}s] registered {t.registered}/{len(fleet.devices)}  "
        f"requests {t.requests}  notifications {t.notifications}  updates {t.updates}  "
        + (f"sends {t.sends}  " if fleet.profile.send_interval is not None else "")
        + (_block_counts(t) if fleet.profile.buffer_size is not None else "")
        + f"asleep {t.sleeping}  errors {t.errors}"
    )


def _block_counts(t: Totals) -> str:
    return f"blocks sent {t.blocks_sent}  received {t.blocks_received}  4.13 {t.too_large}  "


def summarise(
    fleet: Fleet,
    elapsed: float,
    usage0: resource.struct_rusage,
    usage: resource.struct_rusage,
) -> dict[str, object]:
    """The summary of a run as a flat JSON-able dict."""
    cpu = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
    n = len(fleet.devices)
    registered_after = fleet.all_registered_at
    if registered_after is not None:
        registered_after = round(registered_after, 3)
    summary: dict[str, object] = {
        "devices": n,
        "bindings": ",".join(fleet.config.bindings),
        "seconds": round(elapsed, 3),
        "all_registered_after_s": registered_after,
        "first_registrations_per_s": round(n / registered_after) if registered_after else None,
        **fleet.totals.as_dict(),
        "datagrams_sent": fleet.net.sent,
        "datagrams_received": fleet.net.received,
        "datagrams_lost": fleet.net.lost,
        "send_failures": fleet.net.send_failures,
        "cpu_s": round(cpu, 3),
        "max_rss_kib": usage.ru_maxrss,
    }
    return summary


def print_summary(summary: dict[str, object], out: TextIO) -> None:
    """The summary as one JSON line, then as a two-column table."""
    print(json.dumps(summary, separators=(",", ":")), file=out)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}", file=out)
