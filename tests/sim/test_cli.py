"""`dm-actor simulate`: arguments, a bounded run against a real server, the summary."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio

from dm_actor import app
from dm_actor.cli import build_parser, main
from dm_actor.config import parse_settings
from dm_actor.sim.cli import config_from_args, print_summary, simulate

if TYPE_CHECKING:
    import trio.testing


def parse(*argv: str) -> object:
    return config_from_args(build_parser().parse_args(["simulate", *argv]))


def test_arguments_make_the_fleet_config() -> None:
    config = parse("--server", "coap+tcp://127.0.0.1:5999", "--devices", "7", "--sleep", "30",
                   "--loss", "0.1", "--ramp", "50", "--seed", "9")  # fmt: skip
    assert config.server == ("127.0.0.1", 5999)  # type: ignore[attr-defined]
    assert config.bindings == ("T",)  # type: ignore[attr-defined]  # from the scheme
    assert (config.devices, config.loss, config.ramp, config.seed) == (7, 0.1, 50.0, 9)  # type: ignore[attr-defined]
    assert config.profile.sleep == 30.0  # type: ignore[attr-defined]
    assert parse("--binding", "mixed").bindings == ("U", "UQ", "T", "TQ")  # type: ignore[attr-defined]
    assert parse("--server", "coap://localhost").server == ("127.0.0.1", 5683)  # type: ignore[attr-defined]


def test_send_arguments() -> None:
    assert parse().profile.send_interval is None  # type: ignore[attr-defined]
    profile = parse("--send", "30").profile  # type: ignore[attr-defined]
    assert (profile.send_interval, profile.send_format) == (30.0, 112)  # SenML CBOR
    assert parse("--send", "5", "--send-format", "json").profile.send_format == 110  # type: ignore[attr-defined]


def test_buffer_size_argument() -> None:
    assert parse().profile.buffer_size is None  # type: ignore[attr-defined]
    assert parse("--buffer-size", "256").profile.buffer_size == 256  # type: ignore[attr-defined]
    config = parse("--temperatures", "12", "--lights", "4")
    assert (config.temperatures, config.lights) == (12, 4)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv",
    [
        ["--server", "http://127.0.0.1:80"],
        ["--duration", "0"],
        ["--send", "0"],
        ["--send", "inf"],
        ["--buffer-size", "63"],
        ["--temperatures", "-1"],
        ["--loss", "1.5"],
        ["--source-addresses", "0"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *argv]) == 2
    assert capsys.readouterr().err.startswith("dm-actor simulate: error:")


async def test_a_bounded_run_reports_progress_and_a_summary(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    settings = parse_settings('[server]\nhost = "127.0.0.1"\ncoap_port = 0\nstore = "memory"\n')
    listening: app.Listening = await nursery.start(partial(app.serve, settings, http=False))
    host, port = listening.coap_udp[:2]
    config = parse("--server", f"coap://{host}:{port}", "--devices", "40", "--binding", "mixed",
                   "--ramp", "20", "--lifetime", "60", "--awake", "10")  # fmt: skip
    # the test server's TCP port is not its UDP port (both were 0)
    config = replace(config, tcp_server=listening.coap_tcp[:2])  # type: ignore[type-var]
    progress = io.StringIO()
    summary = await simulate(config, 40.0, 10.0, progress)  # type: ignore[arg-type]
    lines = progress.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("[   40.0s] registered 40/40")
    assert summary["registrations"] == 40 and summary["errors"] == 0
    assert summary["updates"] == 40  # every device updated at lifetime/2 = 30 s
    # ramp 20/s: the last of 40 starts at 1.95 s and is registered at once (virtual time)
    assert summary["all_registered_after_s"] == 1.95
    assert summary["first_registrations_per_s"] == 21
    out = io.StringIO()
    print_summary(summary, out)
    first, *table = out.getvalue().splitlines()
    assert json.loads(first) == summary
    assert table[0].split() == ["devices", "40"]
