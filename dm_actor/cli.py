"""The `dm-actor` command: parse arguments, load `Settings`, run the server under Trio.

`main()` is the only entry point; it returns the process exit code (0: stopped by SIGINT or
SIGTERM, 1: a socket could not be opened, 2: bad settings, 3: the store in the data
directory is corrupt, unreadable, from a newer version or in use by another process),
printing a one-line error, and never calls `sys.exit` itself (argparse does, for bad flags
and `--version`).
Log records of `dm_actor` go to stderr while the server runs; nothing is configured at import.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor import __version__, app
from dm_actor.api import watch
from dm_actor.config import ConfigError, Settings, load_settings
from dm_actor.sim import cli as sim_cli
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

_DEFAULTS = Settings().server


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `dm-actor` (flags left out are None: the settings decide)."""
    parser = argparse.ArgumentParser(
        prog="dm-actor", description="LwM2M/CoAP device-management server"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server until SIGINT or SIGTERM")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    serve.add_argument("--host", help=f"address to listen on (default {_DEFAULTS.host})")
    serve.add_argument(
        "--coap-port", type=int, metavar="PORT", help=f"CoAP port (default {_DEFAULTS.coap_port})"
    )
    serve.add_argument(
        "--http-port", type=int, metavar="PORT", help=f"HTTP port (default {_DEFAULTS.http_port})"
    )
    serve.add_argument(
        "--data-dir", metavar="DIR", help=f"data directory (default {_DEFAULTS.data_dir})"
    )
    serve.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        help="where accepted work is kept (default sqlite in the data directory; memory: "
        "nothing survives a restart)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="an access key to accept (repeatable; also DM_ACTOR_API_KEY and [api] keys)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        help=f"log level (default {_DEFAULTS.log_level})",
    )
    sim_cli.add_parser(commands)
    watch.add_parser(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings file (if any) overridden by the flags given.

    Raises:
        ConfigError: the settings are invalid.
    """
    settings = load_settings(
        args.config,
        host=args.host,
        coap_port=args.coap_port,
        http_port=args.http_port,
        data_dir=args.data_dir,
        log_level=args.log_level,
        store=args.store,
    )
    if args.api_key:
        api = msgspec.structs.replace(settings.api, keys=[*settings.api.keys, *args.api_key])
        settings = msgspec.structs.replace(settings, api=api)
    return settings


class StartupError(Exception):
    """The server could not start (for example, its port is in use)."""


async def run_until_signalled(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM arrives, then cancel everything and return.

    Raises:
        StartupError: a socket could not be opened.
    """
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                await nursery.start(app.serve, settings)
            except* OSError as group:
                reasons = "; ".join(str(e) for e in group.exceptions)
                raise StartupError(f"cannot listen on {_where(settings)}: {reasons}") from None
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


@contextmanager
def _logging_to_stderr(level: str) -> Iterator[None]:
    """Send dm_actor's log records to stderr for the duration; leave no handler behind."""
    logger = logging.getLogger("dm_actor")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _where(settings: Settings) -> str:
    return f"{settings.server.host} port {settings.server.coap_port}"


def main(argv: list[str] | None = None) -> int:
    """Run `dm-actor` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return sim_cli.run(args)
    if args.command == "watch":
        return watch.run(args)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"dm-actor: error: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(settings.server.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"dm-actor: error: data directory {data_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    failures: list[StartupError] = []
    store_failures: list[BaseException] = []
    with _logging_to_stderr(settings.server.log_level):
        try:
            trio.run(run_until_signalled, settings)
        except* StartupError as group:
            failures.extend(e for e in group.exceptions if isinstance(e, StartupError))
        except* StoreError as group:
            store_failures.extend(group.exceptions)
    for failure in [*failures, *store_failures]:
        print(f"dm-actor: error: {failure}", file=sys.stderr)
    if store_failures:
        return 3
    return 1 if failures else 0
