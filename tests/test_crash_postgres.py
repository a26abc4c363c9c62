"""kill -9 a real daemon on PostgreSQL (`--store postgres`): no 202 is lost.

Issue 11's scenario of tests/test_crash.py (20 fast devices, reads posted one after another,
kill -9 after the Nth 202, restart at once, go on to 2N accepted; every promise must get its
AsyncIDResponse, none twice), with the daemon's store in a database of the test's PostgreSQL
server (tests/store/postgres.py) instead of a SQLite file; one channel type (long poll), the
others are the same code above the store.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from tests import test_crash
from tests.daemon import Daemon, free_ports
from tests.store.postgres import pg_dsn, pg_server

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

__all__ = ["pg_dsn", "pg_server"]

pytestmark = test_crash.pytestmark


async def test_kill_9_on_postgres_loses_no_202(
    tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def daemon_for(tmp_path: Path, settings: str) -> tuple[Daemon, int]:
        coap_port, http_port, coaps_port = free_ports(3)  # (coaps: not the CoAP port + 1)
        (tmp_path / "settings.toml").write_text(settings)
        daemon = Daemon(
            ["--config", str(tmp_path / "settings.toml"), "--store", "postgres", "--dsn",
             pg_dsn, "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
             "--coap-port", str(coap_port), "--coaps-port", str(coaps_port),
             "--http-port", str(http_port), "--api-key",
             test_crash.KEY, "--log-level", "info"],
            ("127.0.0.1", http_port), tmp_path / "daemon.log",
        )  # fmt: skip
        return daemon, coap_port

    monkeypatch.setattr(test_crash, "daemon_for", daemon_for)
    try:
        await test_crash._scenario(tmp_path, "long-poll")
    finally:
        gc.collect()
    assert "store postgres" not in (tmp_path / "daemon.log").read_text()  # no store trouble
