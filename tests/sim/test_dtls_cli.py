"""`dm-actor simulate` over DTLS: its arguments, `--write-credentials`, and
`dm-actor credentials import` of that file into a real data directory, then a bounded run
of the fleet against a server given the credentials that import stored.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import stat
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor import app, credentials_cli
from dm_actor.app import STORE_FILE
from dm_actor.cli import build_parser, main
from dm_actor.config import parse_settings
from dm_actor.credentials_cli import _import
from dm_actor.sim.cli import config_from_args, simulate, write_credentials
from dm_actor.sim.secure import derived_key, read_csv
from dm_actor.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.sim.fleet import FleetConfig


SETTINGS = '[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n'


def parse(*argv: str) -> FleetConfig:
    return config_from_args(build_parser().parse_args(["simulate", *argv]))


def test_dtls_arguments_make_the_fleet_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse("--server", "coaps://127.0.0.1", "--psk-secret", "s")
    assert config.dtls and config.server == ("127.0.0.1", 5684) and config.bindings == ("U",)
    assert config.psk_secret == b"s" and config.psk_table is None and config.connection_id
    # --dtls with a coap:// server: its port + 1, as the daemon's default coaps port
    config = parse("--server", "coap://127.0.0.1:5999", "--dtls", "--psk-secret", "s",
                   "--binding", "UQ", "--no-connection-id")  # fmt: skip
    assert config.dtls and config.server == ("127.0.0.1", 6000) and not config.connection_id
    assert not parse("--server", "coap://127.0.0.1:5999").dtls
    monkeypatch.setenv("DM_ACTOR_SIM_PSK_SECRET", "from-env")
    assert parse("--server", "coaps://127.0.0.1:1").psk_secret == b"from-env"
    csv = tmp_path / "c.csv"
    csv.write_text("# comment\nsim-0,id-0,00112233445566778899aabbccddeeff\n\n")
    monkeypatch.delenv("DM_ACTOR_SIM_PSK_SECRET")
    config = parse("--server", "coaps://127.0.0.1:1", "--credentials", str(csv))
    assert config.psk_table == {
        "sim-0": ("id-0", bytes.fromhex("00112233445566778899aabbccddeeff"))
    }


def test_the_derived_key_is_the_documented_hmac() -> None:
    expected = hmac.new(b"secret", b"sim-7", hashlib.sha256).digest()[:16]
    assert derived_key(b"secret", "sim-7") == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "coaps://127.0.0.1:5684"],  # no secret, no credentials
        ["--server", "coaps://127.0.0.1:5684", "--psk-secret", "s", "--binding", "T"],
        ["--server", "coap+tcp://127.0.0.1:5683", "--dtls", "--psk-secret", "s"],
        ["--write-credentials", "x.csv"],  # no secret to derive them from
    ],
)
def test_bad_dtls_arguments_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DM_ACTOR_SIM_PSK_SECRET", raising=False)
    assert main(["simulate", *argv]) == 2
    assert capsys.readouterr().err.startswith("dm-actor simulate: error:")


def credentials(*argv: str) -> tuple[int, str]:
    """`dm-actor credentials ...` in-process: the exit code and what it printed."""
    out = io.StringIO()
    code = credentials_cli.run(build_parser().parse_args(["credentials", *argv]), out=out)
    return code, out.getvalue()


def test_write_credentials_then_import_them_all_or_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "fleet.csv"
    argv = ["simulate", "--psk-secret", "k", "--devices", "5", "--prefix", "dev"]
    assert main([*argv, "--write-credentials", str(csv)]) == 0
    assert stat.S_IMODE(csv.stat().st_mode) == 0o600  # keys inside
    rows = list(read_csv(csv.read_text().splitlines()))
    assert [(r.endpoint, r.identity) for r in rows] == [(f"dev-{i}", f"dev-{i}") for i in range(5)]
    assert all(bytes.fromhex(r.key_hex) == derived_key(b"k", r.endpoint) for r in rows)
    data = tmp_path / "data"
    d = ["--data-dir", str(data)]
    assert credentials("import", str(csv), *d) == (0, "imported the credentials of 5 "
                                                   "endpoint(s) (0 replaced)\n")  # fmt: skip
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    code, out = credentials("list", *d)
    listed = [line.split("\t")[:2] for line in out.splitlines()]
    assert code == 0 and listed == [[f"dev-{i}", f"dev-{i}"] for i in range(5)]
    capsys.readouterr()

    # refused files change nothing: an identity another endpoint holds, a bad key, a
    # repeated endpoint, a short line
    key = "00" * 16
    for text, code, words in [
        (f"endpoint,psk_identity,psk_key\nnew-1,n1,{key}\nnew-2,dev-3,{key}\n", 1, "line 3"),
        (f"new-1,n1,{key}\nnew-2,n2,abc\n", 2, "line 2: psk_key"),
        (f"new-1,n1,{key}\nnew-1,n2,{key}\n", 2, "appears twice"),
        (f"new-1,n1,{key}\nnew-2,n2\n", 2, "line 2: 2 fields"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        assert credentials("import", str(bad), *d)[0] == code, text
        assert words in capsys.readouterr().err
    assert len(credentials("list", *d)[1].splitlines()) == 5
    # replacing keys, from standard input
    printed = io.StringIO()
    stdin = io.StringIO(f"dev-0,dev-0,{key}\nnew-1,n1,{key}\n")
    assert _import("-", data, stdin, printed) == 0
    assert "2 endpoint(s) (1 replaced)" in printed.getvalue()


async def test_a_simulated_dtls_fleet_against_imported_credentials(
    tmp_path: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = parse("--psk-secret", "k", "--devices", "6", "--ramp", "10", "--binding", "UQ",
                   "--awake", "5", "--sleep", "20")  # fmt: skip
    csv = tmp_path / "fleet.csv"
    with csv.open("w") as f:
        assert write_credentials(config, f) == 6
    data = tmp_path / "data"
    code = await trio.to_thread.run_sync(_import, str(csv), data, io.StringIO(), io.StringIO())
    assert code == 0
    # the server takes what the import stored (a memory store: its SQLite writer thread
    # and the virtual clock do not mix)
    store = SqliteStore(data / STORE_FILE)
    try:
        stored = store.load().credentials
    finally:
        store.close()
    assert len(stored) == 6
    settings = parse_settings(SETTINGS)
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    for record in stored:
        listening.supervisor.provisioning.set(record.endpoint, record.psk_identity, record.psk_key)
    assert listening.coaps is not None
    host, port = listening.coaps[:2]
    config = parse("--server", f"coaps://{host}:{port}", "--credentials", str(csv),
                   "--devices", "6", "--ramp", "10", "--binding", "UQ", "--awake", "5",
                   "--sleep", "20")  # fmt: skip
    summary = await simulate(config, 60.0, 0.0, io.StringIO())
    assert summary["registrations"] == 6 and summary["errors"] == 0
    assert int(summary["wakes"]) >= 12  # type: ignore[call-overload]  # asleep and awake again on their sessions
    assert summary["dtls_handshakes"] == 6 and summary["dtls_handshake_failures"] == 0
    assert summary["dtls_unsent"] == 0
    assert sorted(listening.supervisor.by_endpoint) == [f"sim-{i}" for i in range(6)]
