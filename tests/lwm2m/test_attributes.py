from __future__ import annotations

import pytest

from dm_actor.lwm2m.attributes import InvalidAttributes, parse_attributes


def test_valid_rules() -> None:
    attrs = parse_attributes("pmin=10&pmax=60&gt=30&lt=5&st=1")
    assert attrs.get("pmin") == 10 and attrs.get("gt") == 30.0
    assert attrs.query == "pmin=10&pmax=60&gt=30&lt=5&st=1"
    assert parse_attributes("pmin").get("pmin") is None


@pytest.mark.parametrize(
    "query",
    [
        "pmin=61&pmax=60",
        "gt=10&lt=5&st=3",  # 5 + 6 is not < 10
        "gt=5&lt=5",
        "st=-1",
        "pmin=-1",
        "pmin=x",
        "gt=nan",
        "foo=1",
        "pmin=1&pmin=2",
        "",
    ],
)
def test_impossible_rules_are_rejected(query: str) -> None:
    with pytest.raises(InvalidAttributes):
        parse_attributes(query)
