"""docs/operations.md shows every setting with its default: keep it true."""

from __future__ import annotations

import re
from pathlib import Path

from dm_actor.config import Settings, parse_settings

DOC = Path(__file__).parent.parent / "docs" / "operations.md"


def test_the_documented_settings_are_the_defaults() -> None:
    [block] = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert parse_settings(block) == Settings()


def test_every_setting_is_documented() -> None:
    [block] = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.DOTALL)
    # (a setting whose default is "not set" is shown commented out: `# name = example`)
    documented = set(re.findall(r"^(?:# )?(\w+) =", block, re.MULTILINE))
    defaults = Settings()
    fields = {
        name
        for section in Settings.__struct_fields__
        for name in type(getattr(defaults, section)).__struct_fields__
    }
    assert fields == documented
