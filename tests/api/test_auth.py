"""API keys: configured, from the environment, or generated once into the data directory."""

from __future__ import annotations

import stat
from typing import TYPE_CHECKING

from dm_actor.api.auth import ApiKeys, application_id, load_api_keys

if TYPE_CHECKING:
    from pathlib import Path


def test_configured_and_environment_keys(tmp_path: Path) -> None:
    keys = load_api_keys(tmp_path, ["ak_one", " "], {"DM_ACTOR_API_KEY": "ak_two, ak_three"})
    assert len(keys) == 3 and keys.generated is None
    assert keys.owner("ak_two") == application_id("ak_two")
    assert keys.owner("ak_four") is None
    assert not (tmp_path / "api-key").exists()  # nothing generated when keys are configured


def test_generated_on_first_start_then_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = load_api_keys(data, [], {})
    assert first.generated is not None and first.generated.startswith("ak_")
    stored = data / "api-key"
    assert stored.read_text().strip() == first.generated
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    again = load_api_keys(data, [], {})
    assert again.generated is None
    assert again.owner(first.generated) == first.owner(first.generated)


def test_header_and_subprotocol_forms() -> None:
    keys = ApiKeys(["ak_x"])
    app = application_id("ak_x")
    assert len(app) == 32 and app != application_id("ak_y")
    assert keys.from_authorization(b"Bearer ak_x") == app
    assert keys.from_authorization(b"bearer  ak_x ") == app
    assert keys.from_authorization(b"Basic ak_x") is None
    assert keys.from_authorization(b"Bearer ak_y") is None
    assert keys.from_authorization(None) is None
    assert keys.from_subprotocols(["wss", "pelion_ak_x"]) == app
    assert keys.from_subprotocols(["pelion_ak_x", "wss"]) == app
    assert keys.from_subprotocols(["wss", "pelion_ak_y"]) is None
    assert ApiKeys({"k": "app-1"}).owner(b"k") == "app-1"
