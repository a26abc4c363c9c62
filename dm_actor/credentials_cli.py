"""`dm-actor credentials add|list|remove|import`: devices' DTLS PSK credentials in a data
directory.

It works on the store file itself, while the daemon is stopped: the store's lock (one
process per data directory) makes it fail with exit code 3 and the daemon's pid while
`dm-actor serve` runs (use `/v3/device-credentials` then). A registration older than the
credentials added here ends at the daemon's next start (`Provisioning.end_older_registrations`).
The key is never printed; `--psk-key -` reads it from standard input (not visible in `ps`).
`import FILE.csv` adds (or replaces) many at once, all or nothing, in one transaction
(`endpoint,psk_identity,psk_key` a line: `dm_actor.sim.secure`; docs/operations.md).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from dm_actor.app import STORE_FILE
from dm_actor.config import ConfigError, Settings, load_settings
from dm_actor.credentials import Credential, CredentialError, Credentials, IdentityTaken, validate
from dm_actor.sim.secure import CsvError, read_csv
from dm_actor.store.base import CredentialRecord, StoreError
from dm_actor.store.sqlite import SqliteStore

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterable
    from typing import TextIO

EXIT_OK = 0
EXIT_REFUSED = 1  # the identity belongs to another endpoint; nothing to remove
EXIT_ARGUMENTS = 2  # a bad identity, key, settings file or data directory
EXIT_STORE = 3  # the store cannot be opened: in use by the daemon, damaged, newer


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `credentials` command to `dm-actor`'s subcommands."""
    parser = subparsers.add_parser(
        "credentials",
        help="add, list, remove or import devices' DTLS PSK credentials (daemon stopped)",
        description="Devices' DTLS PSK credentials in the data directory's store. Run it "
        "while `dm-actor serve` is stopped (the store is locked while it runs: use the "
        "/v3/device-credentials API then).",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="give ENDPOINT a PSK identity and key")
    add.add_argument("endpoint", metavar="ENDPOINT")
    add.add_argument("--psk-identity", required=True, metavar="ID", help="1..128 bytes")
    add.add_argument(
        "--psk-key",
        required=True,
        metavar="HEX",
        help="16..64 bytes in hex; '-' reads it from standard input",
    )
    listing = actions.add_parser("list", help="endpoint, identity, creation time (no key)")
    remove = actions.add_parser("remove", help="forget ENDPOINT's credentials")
    remove.add_argument("endpoint", metavar="ENDPOINT")
    bulk = actions.add_parser(
        "import",
        help="add or replace many from a CSV file (endpoint,psk_identity,psk_key in hex), "
        "all or nothing, in one transaction",
    )
    bulk.add_argument("file", metavar="FILE.csv", help="'-' reads standard input")
    for sub in (add, listing, remove, bulk):
        sub.add_argument("--data-dir", metavar="DIR", help="the data directory")
        sub.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Run `dm-actor credentials ...`; the exit code."""
    try:
        settings: Settings = load_settings(args.config, data_dir=args.data_dir)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_ARGUMENTS)
    data_dir = Path(settings.server.data_dir)
    if args.action == "import":
        return _import(args.file, data_dir, stdin, out)
    if args.action == "add":
        key_text = stdin.readline().strip() if args.psk_key == "-" else args.psk_key
        try:
            identity, key = validate(args.endpoint, args.psk_identity, key_text)
        except CredentialError as exc:
            return _fail(exc.message, EXIT_ARGUMENTS)
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"data directory {data_dir}: {exc.strerror}", EXIT_ARGUMENTS)
    elif not (data_dir / STORE_FILE).exists():
        if args.action == "list":
            return EXIT_OK  # no store: no credentials
        return _fail(f"{args.endpoint} has no credentials (no store in {data_dir})", EXIT_REFUSED)
    try:
        store = SqliteStore(data_dir / STORE_FILE)
    except StoreError as exc:
        return _fail(str(exc), EXIT_STORE)
    try:
        snapshot = store.load()
        creds = Credentials(
            [Credential(r.endpoint, r.psk_identity, r.psk_key, r.created_at)
             for r in snapshot.credentials]
        )  # fmt: skip
        if args.action == "list":
            for c in creds.records():
                created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c.created_at))
                print(f"{c.endpoint}\t{c.identity}\t{created}", file=out)
            return EXIT_OK
        if args.action == "remove":
            if creds.remove(args.endpoint) is None:
                return _fail(f"{args.endpoint} has no credentials", EXIT_REFUSED)
            trio.run(_commit, store, lambda: store.delete_credential(args.endpoint))
            print(f"removed the credentials of {args.endpoint}", file=out)
            return EXIT_OK
        try:
            creds.check(args.endpoint, identity)
        except IdentityTaken as exc:
            return _fail(str(exc), EXIT_REFUSED)
        record = CredentialRecord(args.endpoint, identity, key, time.time())
        trio.run(_commit, store, lambda: store.put_credential(record))
        print(f"credentials of {args.endpoint} stored (PSK identity {identity!r})", file=out)
        return EXIT_OK
    except StoreError as exc:
        return _fail(str(exc), EXIT_STORE)
    finally:
        store.close()


def _import(path: str, data_dir: Path, stdin: TextIO, out: TextIO) -> int:
    """`credentials import FILE.csv`: every line validated first (identities unique, in the
    file and against the store), then all written in one transaction; nothing on a refusal."""
    try:
        if path == "-":
            rows = _read_rows(stdin)
        else:
            with open(path, encoding="utf-8", newline="") as f:
                rows = _read_rows(f)
    except OSError as exc:
        return _fail(f"{path}: {exc.strerror}", EXIT_ARGUMENTS)
    except (CsvError, CredentialError, UnicodeDecodeError) as exc:
        return _fail(f"{path}: {exc}", EXIT_ARGUMENTS)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"data directory {data_dir}: {exc.strerror}", EXIT_ARGUMENTS)
    try:
        store = SqliteStore(data_dir / STORE_FILE)
    except StoreError as exc:
        return _fail(str(exc), EXIT_STORE)
    try:
        creds = Credentials(
            [Credential(r.endpoint, r.psk_identity, r.psk_key, r.created_at)
             for r in store.load().credentials]
        )  # fmt: skip
        now = time.time()
        replaced = 0
        seen: set[str] = set()
        for line, endpoint, identity, key in rows:
            if endpoint in seen:
                return _fail(f"{path}: line {line}: {endpoint} appears twice", EXIT_ARGUMENTS)
            seen.add(endpoint)
            try:
                old = creds.put(Credential(endpoint, identity, key, now))
            except IdentityTaken as exc:
                return _fail(f"{path}: line {line}: {exc}", EXIT_REFUSED)
            replaced += old is not None

        def write() -> None:
            store.max_batch = len(rows) + 1  # all in one transaction: all or nothing
            for _, endpoint, identity, key in rows:
                store.put_credential(CredentialRecord(endpoint, identity, key, now))

        trio.run(_commit, store, write)
        print(f"imported the credentials of {len(rows)} endpoint(s) ({replaced} replaced)",
              file=out)  # fmt: skip
        return EXIT_OK
    except StoreError as exc:
        return _fail(str(exc), EXIT_STORE)
    finally:
        store.close()


def _read_rows(lines: Iterable[str]) -> list[tuple[int, str, str, bytes]]:
    """The validated rows of a credentials CSV file: (line, endpoint, identity, key)."""
    rows: list[tuple[int, str, str, bytes]] = []
    for row in read_csv(lines):
        try:
            identity, key = validate(row.endpoint, row.identity, row.key_hex)
        except CredentialError as exc:
            raise CredentialError(exc.field, f"line {row.line}: {exc.message}") from None
        rows.append((row.line, row.endpoint, identity, key))
    return rows


async def _commit(store: SqliteStore, write: Callable[[], None]) -> None:
    """Make one write durable with the store's own writer."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        write()
        await store.durable()
        nursery.cancel_scope.cancel()


def _fail(message: str, code: int) -> int:
    print(f"dm-actor credentials: error: {message}", file=sys.stderr)
    return code
