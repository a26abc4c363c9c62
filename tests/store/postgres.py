"""A real PostgreSQL for the tests: one server per session, one fresh database per test.

The server (Debian's `postgresql-15`, or any `/usr/lib/postgresql/*/bin`) runs as the
`postgres` user, since `initdb` refuses root, in a temporary directory it owns, listening only
on a Unix socket in that directory, with `fsync` on (PostgreSQL's default). Missing, the tests
that need it are skipped on a developer's machine and fail in CI (`tests/tools.py`).

Use the `pg_dsn` fixture (import it into the test module or a conftest): a DSN naming a new,
empty database, dropped after the test. One server serves every module that imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from tests.tools import tool

if TYPE_CHECKING:
    from collections.abc import Iterator

PACKAGE = "postgresql"
PREFIX = "dm-actor-pg-"
USER = "postgres"


def bindir() -> Path:
    """Where initdb and pg_ctl are (skips or, in CI, fails without them)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    return Path(tool("initdb", PACKAGE)).parent


class PostgresServer:
    """One PostgreSQL server in a temporary directory; `stop()` removes it."""

    def __init__(self) -> None:
        self.bin = bindir()
        try:
            self.user = pwd.getpwnam(USER)
        except KeyError:
            pytest.fail(f"no {USER} user (Debian package {PACKAGE} creates it)")
        self._remove_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.dir / "owner").write_text(f"{os.getpid()}\n")
        os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.data = self.dir / "data"
        self._names = itertools.count(1)
        self._as_postgres(
            str(self.bin / "initdb"), "--auth=trust", "--no-sync", "--encoding=UTF8",
            "--locale=C", "-U", USER, "-D", str(self.data),
        )  # fmt: skip
        self.start()

    def _remove_stale(self) -> None:
        """Stop and remove the servers of test processes that died without removing them
        (killed: atexit did not run)."""
        for stale in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
            try:
                os.kill(int((stale / "owner").read_text()), 0)
                continue  # its process runs
            except ProcessLookupError:
                pass
            except (OSError, ValueError):
                continue
            pg_ctl = str(self.bin / "pg_ctl")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._as_postgres(pg_ctl, "-D", str(stale / "data"), "-m", "immediate", "stop")
            shutil.rmtree(stale, ignore_errors=True)

    def _as_postgres(self, *argv: str) -> None:
        command = (
            list(argv) if os.getuid() == self.user.pw_uid else ["runuser", "-u", USER, "--", *argv]
        )
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (
            f"-c listen_addresses='' -k {self.dir} -c fsync=on -c synchronous_commit=on "
            "-c max_connections=40 -c shared_buffers=16MB"
        )
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                          "-l", str(self.dir / "log"), "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = USER) -> str:
        return f"host={self.dir} user={USER} dbname={dbname}"

    def create_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as pg:
            pg.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn(), autocommit=True) as pg:
            pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


_shared: list[PostgresServer] = []


@pytest.fixture(scope="session")
def pg_server() -> PostgresServer:
    """The session's server: one per process, whichever modules import this fixture;
    removed when the process exits."""
    if not _shared:
        _shared.append(PostgresServer())
        atexit.register(_shared[0].remove)
    return _shared[0]


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> Iterator[str]:
    name = pg_server.create_database()
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)
