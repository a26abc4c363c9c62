"""The `backend` fixture: each protocol test runs on the memory store, on a SQLite file and on
a PostgreSQL database (a real server, `tests/store/postgres.py`); `engine`: a test of the
group commit and its durability runs on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .postgres import pg_dsn, pg_server
from .support import Backend, Engine

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["backend", "engine", "pg_dsn", "pg_server"]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    return Backend(request.param, tmp_path / "store.sqlite3", dsn=dsn)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    engine = Engine(tmp_path / "s.sqlite3", dsn)
    yield engine
    engine.close()
