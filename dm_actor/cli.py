"""The `dm-actor` command: parse arguments, load `Settings`, run the server under Trio.

`main()` is the only entry point; it returns the process exit code (the `EXIT_*` constants,
docs/operations.md), printing one line that says what is wrong (the traceback of a failure
while running goes to the log), and never calls `sys.exit` itself (argparse does, for bad
flags and `--version`). Trio reports failures as exception groups, nested: `main` looks at
every exception in them, never only the top level.
Log records of `dm_actor` go to stderr while the server runs; nothing is configured at import.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor import __version__, app, logformat
from dm_actor.app import StartupError
from dm_actor.config import ORIGIN_PATTERN, ConfigError, Settings, load_settings
from dm_actor.credentials_cli import add_parser as add_credentials, run as run_credentials
from dm_actor.sim import cli as sim_cli
from dm_actor.store.base import StoreError, StoreFailed
from dm_actor.store.sqlite import read_only
from dm_actor.tools import watch

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

_DEFAULTS = Settings().server

EXIT_STOPPED = 0  # SIGINT, SIGTERM or SIGHUP: a clean stop
EXIT_CANNOT_START = 1  # a port or the API key file could not be opened
EXIT_SETTINGS = 2  # bad settings, or a data directory that cannot be created or written
EXIT_STORE = 3  # the store cannot be opened: damaged, foreign, newer, in use
EXIT_STORE_FAILED = 4  # a write failed with an I/O error while running: restart it
EXIT_INTERNAL = 70  # a bug (EX_SOFTWARE): the traceback is in the log
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
        "--coaps-port",
        type=int,
        metavar="PORT",
        help="CoAP over DTLS port (default: the CoAP port + 1; also [security] coaps_port)",
    )
    serve.add_argument(
        "--no-plain-coap",
        action="store_true",
        help="serve CoAP over DTLS only: no plain UDP or TCP socket ([security] plain_coap)",
    )
    serve.add_argument(
        "--http-port", type=int, metavar="PORT", help=f"HTTP port (default {_DEFAULTS.http_port})"
    )
    serve.add_argument(
        "--data-dir", metavar="DIR", help=f"data directory (default {_DEFAULTS.data_dir})"
    )
    serve.add_argument(
        "--store",
        choices=("sqlite", "memory", "postgres"),
        help="where accepted work is kept (default sqlite in the data directory; memory: "
        "nothing survives a restart; postgres: the database --dsn names)",
    )
    serve.add_argument(
        "--dsn",
        metavar="DSN",
        help="with --store postgres: the database's libpq connection string ([server] dsn)",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="an access key to accept (repeatable; also DM_ACTOR_API_KEY and [api] keys)",
    )
    serve.add_argument(
        "--admin-key",
        action="append",
        metavar="KEY",
        help="an administrator key to accept (repeatable; also DM_ACTOR_ADMIN_KEY and "
        "[api] admin_keys)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        type=_origin,
        metavar="ORIGIN",
        help="a browser origin (scheme://host[:port]) whose pages may call the API "
        "(repeatable; also [api] cors_origins; none by default)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        help=f"log level (default {_DEFAULTS.log_level})",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        help=f"text lines, or one JSON object per line (default {_DEFAULTS.log_format})",
    )
    sim_cli.add_parser(commands)
    watch.add_parser(commands)
    add_credentials(commands)
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
        log_format=args.log_format,
        store=args.store,
        dsn=args.dsn,
    )
    if args.api_key:
        api = msgspec.structs.replace(settings.api, keys=[*settings.api.keys, *args.api_key])
        settings = msgspec.structs.replace(settings, api=api)
    if args.admin_key:
        admins = [*settings.api.admin_keys, *args.admin_key]
        api = msgspec.structs.replace(settings.api, admin_keys=admins)
        settings = msgspec.structs.replace(settings, api=api)
    if args.cors_origin:
        origins = [*settings.api.cors_origins, *args.cors_origin]
        api = msgspec.structs.replace(settings.api, cors_origins=origins)
        settings = msgspec.structs.replace(settings, api=api)
    security = settings.security
    if args.coaps_port is not None:
        if not 0 <= args.coaps_port <= 65535:
            raise ConfigError(f"--coaps-port {args.coaps_port}: not a port (0..65535)")
        security = msgspec.structs.replace(security, coaps_port=args.coaps_port)
    if args.no_plain_coap:
        security = msgspec.structs.replace(security, plain_coap=False)
    return msgspec.structs.replace(settings, security=security)


def _origin(value: str) -> str:
    """`--cors-origin`'s value, checked as `[api] cors_origins` checks its items."""
    if re.search(ORIGIN_PATTERN, value) is None:
        raise argparse.ArgumentTypeError(f"not an origin (scheme://host[:port]): {value!r}")
    return value


async def run_until_signalled(settings: Settings) -> None:
    """Serve until SIGINT, SIGTERM or SIGHUP arrives, stop gracefully (at most
    `[server] graceful_timeout` seconds: see `app.stop`), then cancel everything and return.
    A second signal meanwhile cancels at once.

    SIGHUP (a closed terminal, or a reload request) stops cleanly too: there is no reload,
    settings are read at start.

    Raises:
        StartupError: a port or the API key file could not be opened (in a group).
    """
    stopping = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serving(*, task_status: trio.TaskStatus[app.Listening]) -> None:
            await app.serve(settings, shutdown_trigger=stopping.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # stopped gracefully: no more signals to wait for

        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            await nursery.start(serving)
            async for signum in signals:
                name = signal.Signals(signum).name
                if stopping.is_set():
                    log.warning("%s again: stopping at once", name)
                    nursery.cancel_scope.cancel()
                    break
                if signum == signal.SIGHUP:
                    log.warning("%s: stopping (no reload: restart to apply new settings)", name)
                else:
                    log.info("%s: stopping", name)
                stopping.set()


def leaves(exc: BaseException) -> list[BaseException]:
    """Every exception in `exc`, however deep in exception groups, in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def explain(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line to print for what ended `trio.run`."""
    found = leaves(exc)
    for kind, code in (
        (StoreFailed, EXIT_STORE_FAILED),
        (StoreError, EXIT_STORE),
        (StartupError, EXIT_CANNOT_START),
    ):
        matching = [e for e in found if isinstance(e, kind)]
        if matching:
            return code, str(matching[0])
    first = found[0]
    return EXIT_INTERNAL, (
        f"internal error: {type(first).__name__}: {first} (the traceback is in the log)"
    )


@contextmanager
def _logging_to_stderr(level: str, log_format: str = "text") -> Iterator[None]:
    """Send dm_actor's log records to stderr for the duration; leave no handler behind."""
    logger = logging.getLogger("dm_actor")
    handler = logging.StreamHandler()
    handler.setFormatter(logformat.formatter(log_format))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def main(argv: list[str] | None = None) -> int:
    """Run `dm-actor` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return sim_cli.run(args)
    if args.command == "watch":
        return watch.run(args)
    if args.command == "credentials":
        return run_credentials(args)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"dm-actor: error: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    data_dir = Path(settings.server.data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # (it holds device keys)
    except OSError as exc:
        print(f"dm-actor: error: data directory {data_dir}: {exc.strerror}", file=sys.stderr)
        return EXIT_SETTINGS
    if settings.server.store == "sqlite" and (why := read_only(data_dir)) is not None:
        print(f"dm-actor: error: data directory {data_dir} is read-only ({why}): the store "
              f"must write there", file=sys.stderr)  # fmt: skip
        return EXIT_SETTINGS
    with _logging_to_stderr(settings.server.log_level, settings.server.log_format):
        try:
            trio.run(run_until_signalled, settings)
        except Exception as exc:  # every failure ends in one line and a code
            code, line = explain(exc)
            if code in (EXIT_STORE_FAILED, EXIT_INTERNAL):
                log.error("stopped: %s", line, exc_info=exc)
            else:
                log.debug("could not start: %s", line, exc_info=exc)
        else:
            return EXIT_STOPPED
    print(f"dm-actor: error: {line}", file=sys.stderr)
    return code
