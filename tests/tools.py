"""Outside programs the tests drive (third-party DTLS clients, a browser, PostgreSQL).

`tool(name, package)` is the program's path. Missing, the test is skipped on a developer's
machine, but fails in CI (`DM_ACTOR_CI` is set by `.ci/run`, which installs the packages):
a test that CI skips proves nothing.
"""

from __future__ import annotations

import os
import shutil

import pytest


def tool(name: str, package: str) -> str:
    """The path of the program `name` (from the Debian package `package`)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package {package})"
        if os.environ.get("DM_ACTOR_CI"):
            pytest.fail(message + ": .ci/run installs it")
        pytest.skip(message)
    return path
