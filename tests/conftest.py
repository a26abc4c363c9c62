"""Test-wide settings.

Hypothesis: no deadlines and no "too slow" health check, because this machine is shared and
its speed varies; under CI (`CI` set) the examples are derandomized so a run is reproducible.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dm_actor",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("dm_actor")
