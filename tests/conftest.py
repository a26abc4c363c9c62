"""Test-wide settings.

Hypothesis: no deadlines and no "too slow" health check, because this machine is shared and
its speed varies; under CI (`CI` set) the examples are derandomized so a run is reproducible.

Profiles: "ci" (the default) is short; "long" (`pytest --hypothesis-profile long`, see
docs/operations.md, "Testing under attack") runs many more examples of the tests that take
their count from the profile (the stateful test, tests/actors/test_stateful.py); the other
property tests set their own `max_examples`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

_common = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # the explain phase re-runs a failing example hundreds of times: minutes for the
    # stateful test, whose shrunk list of actions says enough
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
settings.register_profile("ci", _common, max_examples=400, derandomize=bool(os.environ.get("CI")))
settings.register_profile("dm_actor", settings.get_profile("ci"))  # the former name
settings.register_profile("long", _common, max_examples=20_000, derandomize=False)
settings.load_profile("ci")
