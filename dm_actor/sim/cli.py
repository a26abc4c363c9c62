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
import os
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
from dm_actor.sim.secure import csv_lines, derived_key, read_csv

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

_SCHEMES = {"coap": "U", "coap+tcp": "T", "coaps": "U"}


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
        help="coap://HOST:PORT, coap+tcp://HOST:PORT or coaps://HOST:PORT (DTLS); "
        "default %(default)s",
    )
    p.add_argument(
        "--dtls",
        action="store_true",
        help="CoAP over DTLS 1.2 with PSK (implied by coaps://); with a coap:// server, to its "
        "port + 1 (the daemon's default coaps port)",
    )
    p.add_argument(
        "--psk-secret",
        metavar="TEXT",
        help="DTLS: device NAME's PSK identity is NAME and its key HMAC-SHA256(TEXT, NAME)[:16]; "
        "default: the environment's DM_ACTOR_SIM_PSK_SECRET",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE.csv",
        help="DTLS: the devices' credentials, endpoint,psk_identity,psk_key (hex) a line "
        "(they take precedence over --psk-secret)",
    )
    p.add_argument(
        "--write-credentials",
        metavar="FILE.csv",
        help="write the fleet's credentials derived from --psk-secret (for `dm-actor "
        "credentials import`) and exit without simulating",
    )
    p.add_argument(
        "--no-connection-id",
        action="store_true",
        help="DTLS: do not offer RFC 9146 Connection IDs",
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
        raise ValueError(f"--server must be coap://HOST:PORT, coap+tcp://HOST:PORT or "
                         f"coaps://HOST:PORT, not {args.server!r}")  # fmt: skip
    host = _ipv4(url.hostname)
    dtls = bool(getattr(args, "dtls", False)) or url.scheme == "coaps"
    if url.scheme == "coaps":
        server = (host, url.port or 5684)
    elif dtls:
        if url.scheme != "coap":
            raise ValueError("--dtls needs a coap:// or coaps:// server")
        server = (host, (url.port or 5683) + 1)
    else:
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
    secret, table = _psk_source(args) if dtls else (b"", None)
    return FleetConfig(
        dtls=dtls,
        psk_secret=secret,
        psk_table=table,
        connection_id=not getattr(args, "no_connection_id", False),
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


def _psk_secret(args: argparse.Namespace) -> bytes:
    secret = getattr(args, "psk_secret", None)
    if secret is None:
        secret = os.environ.get("DM_ACTOR_SIM_PSK_SECRET")
    return secret.encode() if secret else b""


def _psk_source(args: argparse.Namespace) -> tuple[bytes, dict[str, tuple[str, bytes]] | None]:
    """The PSK secret and the table of credentials read from `--credentials`."""
    secret = _psk_secret(args)
    path = getattr(args, "credentials", None)
    table: dict[str, tuple[str, bytes]] | None = None
    if path is not None:
        table = {}
        with open(path, encoding="utf-8", newline="") as f:
            for row in read_csv(f):
                try:
                    key = bytes.fromhex(row.key_hex)
                except ValueError:
                    raise ValueError(f"{path}: line {row.line}: psk_key is not hex") from None
                if not row.endpoint or not row.identity or not 16 <= len(key) <= 64:
                    raise ValueError(f"{path}: line {row.line}: an empty field or a key that is "
                                     "not 16..64 bytes")  # fmt: skip
                table[row.endpoint] = (row.identity, key)
    if not secret and table is None:
        raise ValueError("DTLS needs --psk-secret (or DM_ACTOR_SIM_PSK_SECRET) or --credentials")
    return secret, table


def write_credentials(config: FleetConfig, out: TextIO) -> int:
    """Write the credentials of `config`'s devices (derived from its secret) as CSV."""
    names = (f"{config.prefix}-{i}" for i in range(config.devices))
    secret = config.psk_secret
    count = 0
    for line in csv_lines((n, n, derived_key(secret, n)) for n in names):
        out.write(line)
        count += 1
    return count - 1


def _ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
        return str(infos[0][4][0])


def run(args: argparse.Namespace) -> int:
    """Run `dm-actor simulate`; returns the exit code (2: bad arguments)."""
    try:
        if getattr(args, "write_credentials", None) is not None:
            args.dtls = True
        config = config_from_args(args)
        if getattr(args, "write_credentials", None) is not None:
            if not config.psk_secret:
                raise ValueError("--write-credentials needs --psk-secret")
            fd = os.open(args.write_credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w", encoding="utf-8", newline="") as out:
                count = write_credentials(config, out)
            print(f"{count} credentials written to {args.write_credentials}", file=sys.stderr)
            return 0
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
        **(
            {f"dtls_{k}": getattr(fleet.dtls, k) for k in fleet.dtls.__slots__}
            if fleet.config.dtls
            else {}
        ),
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
