"""The `backend` fixture: each protocol test runs on the memory store, on a SQLite file and on
a PostgreSQL database (a real server, `tests/store/postgres.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .postgres import pg_dsn, pg_server
from .support import Backend

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["backend", "pg_dsn", "pg_server"]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    return Backend(request.param, tmp_path / "store.sqlite3", dsn=dsn)
