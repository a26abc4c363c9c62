"""The `dm-actor` command and its settings: argument parsing, TOML loading, a real run.

Only `test_serve_in_a_subprocess_stops_cleanly_on_sigterm` waits in real time (bounded, under
10 s): it starts the real command and stops it with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest
import trio

from dm_actor import __version__, app
from dm_actor.cli import build_parser, main, settings_from_args
from dm_actor.coap.message import Message, decode, encode, path_options
from dm_actor.coap.numbers import Code, MessageType, TransmissionParameters
from dm_actor.config import ConfigError, Settings, load_settings
from dm_actor.store.base import StoreError
from dm_actor.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent

SECTION_11 = """\
[server]
host = "127.0.0.2"
coap_port = 15683
http_port = 18080
data_dir = "/var/lib/dm"
log_level = "debug"

[delivery]
queue_length = 21
ack_timeout = 2.5
max_retransmit = 4
ack_random_factor = 1.5
expiry_sweep_interval = 61.0
awake_time = 94.0
resend_grace = 121.0
default_retry = 1
default_retry_queue_mode = 3
default_expiry = 7201
default_expiry_queue_mode = 259201

[registration]
default_lifetime = 86401
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


# -- settings ------------------------------------------------------------------------------


def test_defaults_are_those_of_delivery_section_11() -> None:
    s = Settings()
    assert (s.server.host, s.server.coap_port, s.server.http_port) == ("0.0.0.0", 5683, 8080)
    assert (s.server.data_dir, s.server.log_level) == ("./dm-actor-data", "info")
    d = s.delivery
    assert (d.queue_length, d.ack_timeout, d.max_retransmit, d.ack_random_factor) == (
        20,
        2.0,
        5,
        1.0,
    )
    assert (d.expiry_sweep_interval, d.awake_time, d.resend_grace) == (60.0, 93.0, 120.0)
    assert (d.default_retry, d.default_retry_queue_mode) == (0, 2)
    assert (d.default_expiry, d.default_expiry_queue_mode) == (7200, 259200)
    assert s.registration.default_lifetime == 86400
    assert load_settings(None) == s


def test_every_section_11_name_loads_from_toml(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, SECTION_11))
    assert s.server.host == "127.0.0.2"
    assert (s.server.coap_port, s.server.http_port, s.server.data_dir) == (
        15683,
        18080,
        "/var/lib/dm",
    )
    assert s.server.log_level == "debug"
    d = s.delivery
    assert (d.queue_length, d.ack_timeout, d.max_retransmit, d.ack_random_factor) == (
        21,
        2.5,
        4,
        1.5,
    )
    assert (d.expiry_sweep_interval, d.awake_time, d.resend_grace) == (61.0, 94.0, 121.0)
    assert (d.default_retry, d.default_retry_queue_mode) == (1, 3)
    assert (d.default_expiry, d.default_expiry_queue_mode) == (7201, 259201)
    assert s.registration.default_lifetime == 86401
    assert s.transmission_parameters() == TransmissionParameters(
        ack_timeout=2.5, ack_random_factor=1.5, max_retransmit=4
    )


def test_a_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, "[delivery]\nack_timeout = 1\n"))
    assert s.delivery == msgspec.structs.replace(Settings().delivery, ack_timeout=1.0)
    assert s.server == Settings().server


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[delivery]\nack_timout = 1.0\n", "unknown field `ack_timout` - at `$.delivery`"),
        ("[deliveries]\n", "unknown field `deliveries`"),
        ('[delivery]\nqueue_length = "20"\n', "Expected `int`, got `str` - at `$.delivery"),
        ("[delivery]\nmax_retransmit = true\n", "Expected `int`, got `bool`"),
        ("[delivery]\nack_timeout = 0\n", "ack_timeout"),
        ("[server]\ncoap_port = 70000\n", "coap_port"),
        ('[server]\nlog_level = "loud"\n', "log_level"),
        ("server = 1\n", "server"),
        ("[delivery\n", "not valid TOML"),
    ],
)
def test_bad_settings_are_rejected_with_the_key(tmp_path: Path, text: str, complaint: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert complaint in str(info.value)


def test_overrides_win_over_the_file_and_none_means_not_given(tmp_path: Path) -> None:
    path = _write(tmp_path, '[server]\ncoap_port = 1000\nhost = "127.0.0.3"\n')
    s = load_settings(path, coap_port=2000, host=None)
    assert (s.server.coap_port, s.server.host) == (2000, "127.0.0.3")
    with pytest.raises(ConfigError, match="unknown field `colour`"):
        load_settings(None, colour="blue")
    with pytest.raises(ConfigError, match="server"):
        load_settings(_write(tmp_path, "server = 1\n"), coap_port=1)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


# -- argument parsing ------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dm-actor {__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "serve" in capsys.readouterr().err


def test_serve_without_flags_uses_the_settings_defaults() -> None:
    assert settings_from_args(build_parser().parse_args(["serve"])) == Settings()


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, SECTION_11)
    args = build_parser().parse_args(
        ["serve", "--config", str(path), "--coap-port", "0", "--data-dir", "d", "--host", "::1"]
    )
    s = settings_from_args(args)
    assert (s.server.coap_port, s.server.data_dir, s.server.host) == (0, "d", "::1")
    assert (s.server.http_port, s.server.log_level) == (18080, "debug")  # from the file
    assert s.delivery.queue_length == 21


def test_a_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, "[delivery]\nbogus = 1\n")
    data_dir = tmp_path / "data"
    assert main(["serve", "--config", str(path), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dm-actor: error: ")
    assert "bogus" in err
    assert not data_dir.exists()


def test_a_port_in_use_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--host", "127.0.0.1", "--coap-port", str(port), "--data-dir", str(tmp_path)]
        )
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot listen on udp://127.0.0.1:{port} (CoAP): Address already in use" in err


def test_an_http_port_in_use_exits_1_and_names_the_http_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The HTTP listener fails inside the server's own nursery: its `OSError` arrives two
    groups deep (as a privileged port does for a non-root user). It exited 0, silently."""
    coap = _free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(port),
             "--data-dir", str(tmp_path), "--api-key", "k"]
        )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"dm-actor: error: cannot listen on http://127.0.0.1:{port} (HTTP API): "
        "Address already in use"
    )
    assert not any(str(coap) in line for line in err if "error" in line)


def test_an_api_key_file_it_cannot_write_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DM_ACTOR_API_KEY", raising=False)
    (tmp_path / "api-key").mkdir()  # where the generated key would be written
    code = main(
        ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
         "--data-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"dm-actor: error: cannot read or write the API key file {tmp_path / 'api-key'}: "
        "Is a directory"
    )


@contextmanager
def read_only_directory(path: Path) -> Iterator[Path]:
    """`path` made read-only: a read-only bind mount as root (root writes through any mode),
    else its mode. Skips the test where neither is possible."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mount = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot bind-mount as root here: {mount.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_empty_read_only_data_directory_exits_2_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with read_only_directory(data):
        code = main(
            ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
             "--data-dir", str(data), "--api-key", "k"]
        )  # fmt: skip
    assert code == 2  # as documented for an unusable data directory
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"dm-actor: error: data directory {data} is read-only (")


def test_a_read_only_directory_with_a_healthy_store_is_not_called_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator told "not a dm-actor store, or damaged" may delete a good store."""
    data = tmp_path / "data"
    data.mkdir()
    SqliteStore(data / app.STORE_FILE).close()
    with read_only_directory(data):
        code = main(
            ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
             "--data-dir", str(data), "--api-key", "k"]
        )  # fmt: skip
        with pytest.raises(StoreError, match="is read-only") as refused:
            SqliteStore(data / app.STORE_FILE)  # the store says so too, when embedded
    assert "damaged" not in str(refused.value)
    assert code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "is read-only" in line and "damaged" not in line


async def test_serve_from_parsed_arguments_answers_on_port_0(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    args = ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0"]
    args += ["--data-dir", str(tmp_path)]
    settings = settings_from_args(build_parser().parse_args(args))
    listening: app.Listening = await nursery.start(app.serve, settings)
    assert listening.coap_udp[1] != 0
    assert listening.coap_tcp[1] != 0
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        await client.bind(("127.0.0.1", 0))
        await client.sendto(encode(Message(MessageType.CON, Code.GET, 9, b"t")), listening.coap_udp)
        with trio.fail_after(5):
            data, _ = await client.recvfrom(100)
    assert decode(data) == Message(MessageType.ACK, Code.NOT_FOUND, 9, b"t")


# -- the real command ------------------------------------------------------------------------


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback right now."""
    while True:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t,
        ):
            u.bind(("127.0.0.1", 0))
            port: int = u.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port))
            except OSError:  # taken for TCP: another one
                continue
            return port


def test_serve_in_a_subprocess_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    data_dir = tmp_path / "data"
    command = [sys.executable, "-m", "dm_actor", "serve", "--host", "127.0.0.1"]
    command += ["--coap-port", str(port), "--http-port", "0", "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    request = encode(Message(MessageType.CON, Code.GET, 0x0F0F, b"up", path_options("/rd")))
    deadline = time.monotonic() + 8.0
    with (
        subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as proc,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        try:
            client.settimeout(0.1)
            reply = None
            while reply is None and time.monotonic() < deadline and proc.poll() is None:
                client.sendto(request, ("127.0.0.1", port))
                try:
                    reply = decode(client.recv(100))
                except (TimeoutError, ConnectionRefusedError):
                    continue
            assert reply == Message(MessageType.ACK, Code.NOT_FOUND, 0x0F0F, b"up")
            assert data_dir.is_dir()
            # CoAP answers before the HTTP side is up: wait for the startup to finish (the
            # line comes, or the process ends), else SIGTERM may cut the startup short
            assert proc.stderr is not None
            started = ""
            while line := proc.stderr.readline():
                started += line
                if "CoAP listening" in line:
                    break
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            err = started + err
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert f"CoAP listening on udp://127.0.0.1:{port}" in err
    assert "SIGTERM: stopping" in err


def test_a_corrupt_store_is_a_clear_error_and_exit_code_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "dm-actor.sqlite3"
    store.write_bytes(b"this is not a database, and nothing may overwrite it" * 100)
    before = store.read_bytes()
    code = main(
        ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
         "--data-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 3
    err = capsys.readouterr().err
    assert "dm-actor: error:" in err
    assert str(store) in err
    assert store.read_bytes() == before  # nothing recreated, nothing lost


def test_a_data_directory_in_use_is_a_clear_error_and_exit_code_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = SqliteStore(tmp_path / "dm-actor.sqlite3")  # as another daemon holds it
    try:
        code = main(
            ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
             "--data-dir", str(tmp_path)]
        )  # fmt: skip
    finally:
        running.close()
    assert code == 3
    err = capsys.readouterr().err
    assert f"in use by another process (pid {os.getpid()})" in err


def test_sighup_stops_cleanly_and_says_so(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal, a reload request) killed the process silently (129)."""
    coap, http = _free_port(), _free_port()
    command = [sys.executable, "-m", "dm_actor", "serve", "--host", "127.0.0.1", "--api-key",
               "k", "--coap-port", str(coap), "--http-port", str(http), "--data-dir",
               str(tmp_path / "data")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    deadline = time.monotonic() + 8.0
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as proc:
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", http), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)
            _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "SIGHUP: stopping (no reload: restart to apply new settings)" in err


def test_a_storage_failure_while_running_exits_4_with_the_cause_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It printed "Exceptions from Trio nursery (2 sub-exceptions)" and exit 3, no cause."""
    from dm_actor.store.base import ApiKeyRecord
    from tests.store.test_disk_faults import fsync_failed, inject

    class FailingStore(SqliteStore):
        async def run(
            self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            inject(self, fsync_failed())
            self.put_api_key(ApiKeyRecord("k", "app", 0.0))  # a write, as a Register makes
            await super().run(task_status=task_status)

    monkeypatch.setattr(app, "SqliteStore", FailingStore)
    code = main(
        ["serve", "--host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
         "--data-dir", str(tmp_path), "--api-key", "k"]
    )  # fmt: skip
    assert code == 4
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith(
        f"dm-actor: error: {tmp_path / app.STORE_FILE}: a write failed and cannot be "
        "retried: disk I/O error (SQLITE_IOERR_FSYNC)"
    )
    assert "Traceback" in err  # in the log, before the one line
    assert "sub-exception" not in last


def test_a_bug_exits_70_with_one_line_and_the_traceback_in_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        async with trio.open_nursery() as nursery:  # nested, as the real failures come
            nursery.start_soon(trio.sleep_forever)
            raise RuntimeError("a bug")

    monkeypatch.setattr(app, "serve", broken)
    code = main(["serve", "--data-dir", str(tmp_path), "--api-key", "k"])
    assert code == 70
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "dm-actor: error: internal error: RuntimeError: a bug (the traceback is in the log)"
    )
    assert "Traceback" in err
