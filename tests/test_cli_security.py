"""`dm-actor serve`'s DTLS flags and `[security]` settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from dm_actor.cli import build_parser, settings_from_args
from dm_actor.config import ConfigError, Settings, parse_settings

if TYPE_CHECKING:
    from pathlib import Path


def _settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_the_coaps_port_follows_the_coap_port_unless_set() -> None:
    assert Settings().coaps_port() == 5684
    assert _settings("--coap-port", "15683").coaps_port() == 15684
    assert _settings("--coap-port", "0").coaps_port() == 0  # (a free one, as for CoAP)
    assert _settings("--coap-port", "0", "--coaps-port", "6000").coaps_port() == 6000
    assert _settings("--coap-port", "65535").coaps_port() == 0


def test_plain_coap_is_on_unless_switched_off(tmp_path: Path) -> None:
    assert _settings().security.plain_coap
    assert not _settings("--no-plain-coap").security.plain_coap
    path = tmp_path / "s.toml"
    path.write_text("[security]\nplain_coap = false\ncoaps_port = 7000\nconnection_id = false\n")
    s = _settings("--config", str(path))
    assert (s.security.plain_coap, s.coaps_port(), s.security.connection_id) == (False, 7000, False)


@pytest.mark.parametrize(
    "text",
    [
        "[security]\ncoaps_port = 70000\n",
        "[security]\nmax_handshakes = 0\n",
        "[security]\nhandshake_timeout = 0\n",
        "[security]\nplain = false\n",
    ],
)
def test_bad_security_settings_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_settings(text)


def test_a_bad_coaps_port_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="coaps-port"):
        _settings("--coaps-port", "70000")
