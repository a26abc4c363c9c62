"""`dm-actor credentials add|list|remove` in real subprocesses on a real data directory, and
what the daemon does with credentials added while it was stopped.

Real time: each command is a short process (about a second of interpreter start); the
daemon test waits for a real `dm-actor serve` (bounded by `trio.fail_after`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import trio

from dm_actor.actors.supervisor import Supervisor
from dm_actor.config import Settings
from dm_actor.store.base import CredentialRecord, RegistrationRecord
from dm_actor.store.memory import MemoryStore
from tests.daemon import Daemon, free_ports, request

ROOT = Path(__file__).resolve().parent.parent
KEY = "00112233445566778899aabbccddeeff"
ADMIN = "adm_cli_test_0123456789"


def credentials(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dm_actor", "credentials", *args]
    return subprocess.run(command, env=env, input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def test_add_list_remove_on_a_fresh_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    d = ["--data-dir", str(data)]
    assert credentials("list", *d).returncode == 0  # no store yet: nothing, and none made
    assert not data.exists()
    added = credentials("add", "dev-1", "--psk-identity", "id-1", "--psk-key", KEY, *d)
    assert added.returncode == 0, added.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "dm-actor.sqlite3").stat().st_mode) == 0o600
    # the key from standard input (not on the command line)
    added = credentials("add", "dev-2", "--psk-identity", "id-2", "--psk-key", "-", *d,
                        stdin=KEY.upper() + "\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = credentials("list", *d)
    assert listed.returncode == 0
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("dev-1", "id-1"), ("dev-2", "id-2")]
    assert all(r[2].endswith("Z") for r in rows)
    # refusals: an identity another endpoint holds, a bad key, an unknown endpoint
    taken = credentials("add", "dev-3", "--psk-identity", "id-1", "--psk-key", KEY, *d)
    assert taken.returncode == 1 and "belongs to endpoint 'dev-1'" in taken.stderr
    short = credentials("add", "dev-3", "--psk-identity", "id-3", "--psk-key", KEY[:-2], *d)
    assert short.returncode == 2 and "psk_key" in short.stderr
    assert credentials("remove", "dev-3", *d).returncode == 1
    removed = credentials("remove", "dev-1", *d)
    assert removed.returncode == 0, removed.stderr
    assert credentials("list", *d).stdout.splitlines() == [listed.stdout.splitlines()[1]]
    for result in (added, listed, taken, short, removed):
        assert KEY not in (result.stdout + result.stderr).lower()


async def test_while_the_daemon_runs_the_store_is_locked_and_the_api_takes_over(
    tmp_path: Path,
) -> None:
    coap, http = free_ports(2)
    data = tmp_path / "data"
    daemon = Daemon(
        ["--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(http),
         "--data-dir", str(data), "--api-key", "ak_app", "--admin-key", ADMIN],
        ("127.0.0.1", http), tmp_path / "daemon.log",
    )  # fmt: skip
    await daemon.start()
    try:
        with trio.fail_after(20):
            await daemon.ready()
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        busy = await trio.to_thread.run_sync(
            lambda: credentials(
                "add", "dev-1", "--psk-identity", "id-1", "--psk-key", KEY, "--data-dir", str(data)
            )
        )
        assert busy.returncode == 3
        assert "in use by another process (pid" in busy.stderr, busy.stderr
        body = {"psk_identity": "id-1", "psk_key": KEY}
        status, _ = await request(daemon.http, "PUT", "/v3/device-credentials/dev-1", ADMIN, body)
        assert status == 201
        status, _ = await request(daemon.http, "PUT", "/v3/device-credentials/dev-2", "ak_app",
                                  body)  # fmt: skip
        assert status == 403
    finally:
        await daemon.kill()  # (kill -9: what the API answered was durable)
    listed = await trio.to_thread.run_sync(lambda: credentials("list", "--data-dir", str(data)))
    assert listed.returncode == 0 and listed.stdout.startswith("dev-1\tid-1\t")
    assert KEY not in daemon.log.read_text().lower()


async def test_a_registration_older_than_its_credentials_ends_at_start() -> None:
    """Credentials added with the CLI while the server was stopped: the registration made
    before them (over plain CoAP) ends when the server starts, as a de-registration; one
    updated after them stays."""
    wall = 1_700_000_000.0
    store = MemoryStore(clock=lambda: wall)
    for ep, updated in (("old", wall - 100), ("new", wall - 10)):
        store.put_registration(RegistrationRecord(ep, f"r-{ep}", 86400, "1.1", "U", False,
                                                  "</3/0>", updated, updated))  # fmt: skip
        store.put_credential(CredentialRecord(ep, f"id-{ep}", bytes(16), wall - 50))
    sup = Supervisor(Settings(), store=store, wall_clock=lambda: wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        sup.restore(store.load())
        assert list(sup.by_endpoint) == ["new"]
        assert sup.credentials.psk(b"id-old") == bytes(16)  # the credentials stay
        assert [e.item for e in sup.events.take() if e.kind == "de-registrations"] == ["old"]
        assert [r.endpoint for r in store.load().registrations] == ["new"]
        nursery.cancel_scope.cancel()
