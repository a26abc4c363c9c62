"""The `backend` fixture: each protocol test runs on the memory store and on a SQLite file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .support import Backend

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path / "store.sqlite3")
