"""`dm_actor.api.devices` (filters and pages of `/v3/devices`) against a naive reference.

The reference reads every query parameter itself (`field__op`, bare field names, the nested
`filter=` query), compares timestamps as Python's `datetime` does and sorts every record per
page. Hypothesis draws directories of registered and de-registered records and queries with
every operator, then pages through them (both orders, `after=` from each page) and checks
the pages, `has_more` and the total against the reference; refusals must agree too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings, strategies as st
from sortedcontainers import SortedList

from dm_actor.api import devices
from dm_actor.api.devices import FilterError, Source

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
IDS = [f"d{i}" for i in range(12)]
TYPES = ["", "sensor", "light"]
BASE_MS = 1_700_000_000_000


@dataclass(frozen=True)
class Rec:
    endpoint: str
    endpoint_type: str
    created_ms: int
    updated_ms: int
    state: str


def _iso(ms: int, style: int) -> str:
    t = EPOCH + timedelta(milliseconds=ms)
    if style == 0:
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    if style == 1:  # as SDK 2.2.0 sends a naive datetime
        return t.replace(tzinfo=None).isoformat() + "Z"
    if style == 2:
        return (t + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "+02:00"
    return t.strftime("%Y-%m-%d")


# -- the reference ---------------------------------------------------------------------------

FIELD_OPS = {
    "id": {"eq", "neq", "in", "nin"},
    "endpoint_name": {"eq", "neq", "in", "nin"},
    "endpoint_type": {"eq", "neq", "in", "nin"},
    "state": {"eq", "neq", "in", "nin"},
    "lifecycle_status": {"eq", "neq", "in", "nin"},
    "created_at": {"gte", "lte", "in", "nin"},
    "updated_at": {"gte", "lte", "in", "nin"},
}


def _ref_time(text: str) -> int:
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // timedelta(microseconds=1)


def _ref_value(rec: Rec, field: str) -> object:
    return {
        "id": rec.endpoint,
        "endpoint_name": rec.endpoint,
        "endpoint_type": rec.endpoint_type,
        "state": rec.state,
        "lifecycle_status": "enabled",
        "created_at": rec.created_ms * 1000,
        "updated_at": rec.updated_ms * 1000,
    }[field]


def reference(records: list[Rec], pairs: list[tuple[str, str]]) -> list[Rec] | None:
    """The matching records in id order, or None: the query is refused."""
    tests = []
    for name, raw in pairs:
        field, _, op = name.rpartition("__") if "__" in name else (name, "", "eq")
        if field not in FIELD_OPS or op not in FIELD_OPS[field]:
            return None
        timed = field.endswith("_at")
        try:
            values = [_ref_time(v) if timed else v for v in raw.split(",")]
            value = _ref_time(raw) if timed and op in ("gte", "lte") else raw
        except ValueError:
            return None
        tests.append((field, op, value, values))
    out = []
    for rec in sorted(records, key=lambda r: r.endpoint):
        ok = True
        for field, op, value, values in tests:
            v: Any = _ref_value(rec, field)
            if op == "eq":
                ok = ok and v == value
            elif op == "neq":
                ok = ok and v != value
            elif op == "gte":
                ok = ok and v >= value
            elif op == "lte":
                ok = ok and v <= value
            elif op == "in":
                ok = ok and v in values
            else:
                ok = ok and v not in values
        if ok:
            out.append(rec)
    return out


# -- the module under test, over the same records ------------------------------------------------


def sources(records: list[Rec], clauses: list[devices.Clause]) -> list[Source[Rec]]:
    made = []
    for state in ("registered", "deregistered"):
        kind = {r.endpoint: r for r in records if r.state == state}
        made.append(
            Source(
                SortedList(kind),
                kind.get,
                devices.matcher(
                    clauses,
                    {
                        "id": lambda r: r.endpoint,
                        "endpoint_name": lambda r: r.endpoint,
                        "endpoint_type": lambda r: r.endpoint_type,
                        "created_at": lambda r: r.created_ms / 1000,
                        "updated_at": lambda r: r.updated_ms / 1000,
                    },
                    {"state": state, "lifecycle_status": "enabled"},
                ),
            )
        )
    return made


@st.composite
def directories(draw: st.DrawFn) -> list[Rec]:
    ids = draw(st.lists(st.sampled_from(IDS), unique=True, max_size=len(IDS)))
    return [
        Rec(
            i,
            draw(st.sampled_from(TYPES)),
            created := BASE_MS + draw(st.integers(0, 5000)),
            created + draw(st.integers(0, 5000)),
            draw(st.sampled_from(["registered", "deregistered"])),
        )
        for i in ids
    ]


@st.composite
def conditions(draw: st.DrawFn, records: list[Rec]) -> tuple[str, str]:
    field = draw(st.sampled_from([*FIELD_OPS, "color", "created_at"]))
    ops = sorted(FIELD_OPS.get(field, {"eq"}))
    op = draw(st.sampled_from([*ops, *ops, "like", "gte"]))
    if field.endswith("_at"):
        known = [
            getattr(r, "created_ms" if field == "created_at" else "updated_ms") for r in records
        ]
        ms = st.sampled_from(known) if known else st.just(BASE_MS)
        stamps = st.builds(
            _iso, st.one_of(ms, st.integers(BASE_MS - 10, BASE_MS + 11_000)), st.integers(0, 3)
        )
        one = st.one_of(stamps, stamps, st.sampled_from(["yesterday", "2025-13-01", ""]))
    elif field == "state":
        one = st.sampled_from(["registered", "deregistered", "x"])
    elif field == "endpoint_type":
        one = st.sampled_from(TYPES)
    else:
        one = st.sampled_from([*IDS, "other", "enabled"])
    if op in ("in", "nin"):
        return f"{field}__{op}", ",".join(draw(st.lists(one, min_size=1, max_size=4)))
    bare = op == "eq" and draw(st.booleans())
    return (field if bare else f"{field}__{op}"), draw(one)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pages_and_totals_agree_with_the_naive_reference(data: st.DataObject) -> None:
    records = data.draw(directories())
    pairs = data.draw(st.lists(conditions(records), max_size=3, unique_by=lambda p: p[0]))
    nested = data.draw(st.integers(0, len(pairs)))  # the first ones in `filter=`
    query = dict(pairs[nested:])
    if pairs[:nested]:
        query["filter"] = urlencode(pairs[:nested])
    # a top-level parameter that is neither `field__op` nor a field's name is not a filter
    read = pairs[:nested] + [(k, v) for k, v in pairs[nested:] if "__" in k or k in FIELD_OPS]
    expected = reference(records, read)
    if expected is None:
        with pytest.raises(FilterError):
            devices.parse_filters(query)
        return
    clauses = devices.parse_filters(query)
    assert expected is not None, query
    made = sources(records, clauses)
    # scans in chunks of 3 records (snapshots, yields) as well as in one
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(devices, "CHUNK", data.draw(st.sampled_from([1, 3, devices.CHUNK])))
    try:
        _check(data, made, clauses, expected)
    finally:
        monkeypatch.undo()


def _check(
    data: st.DataObject, made: list[Source[Rec]], clauses: list[devices.Clause], expected: list[Rec]
) -> None:
    only = devices.candidates(clauses, ("id", "endpoint_name"))
    assert devices.count(made, only) == len(expected)
    limit = data.draw(st.integers(2, 5))
    for descending in (False, True):
        want = list(reversed(expected)) if descending else expected
        got: list[Rec] = []
        after = data.draw(st.sampled_from([None, "d", "d5", "e"]))
        if after is not None:
            want = [r for r in want if (r.endpoint < after if descending else r.endpoint > after)]
        while True:
            page, more = devices.page(
                made, after=after, descending=descending, limit=limit, only=only
            )
            got += page
            assert more == (len(got) < len(want))
            if not more:
                break
            after = page[-1].endpoint
        assert got == want


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("2025-01-31T12:00:00.000Z", 1738324800000000),
        ("2025-01-31T12:00:00Z", 1738324800000000),
        ("2025-01-31T12:00:00", 1738324800000000),  # SDK 2.2.0, a naive datetime + "Z" less
        ("2025-01-31T13:00:00.5+01:00", 1738324800500000),
        ("2025-01-31T13:00:00.5 01:00", 1738324800500000),  # an unencoded `+` in a query
        ("2025-01-31", 1738281600000000),
        ("2025-01-31T12:00:00.1234567Z", 1738324800123456),
    ],
)
def test_timestamps(text: str, us: int) -> None:
    assert devices.parse_timestamp(text) == us


@pytest.mark.parametrize(
    "text", ["", "now", "2025-13-01", "2025-01-31T24:00:00Z", "2025-01-31T12:00Z",
             "2025-01-31T12:00:00+25:00", "1738324800", "2025-01-31T12:00:00ZZ"],
)  # fmt: skip
def test_malformed_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        devices.parse_timestamp(text)
    with pytest.raises(FilterError) as refused:
        devices.parse_filters({"created_at__gte": text})
    assert refused.value.name == "created_at__gte"


def test_bounds() -> None:
    """What one query may ask is bounded before anything is built from it."""
    ids = ",".join(f"d{i}" for i in range(devices.MAX_VALUES))
    [clause] = devices.parse_filters({"id__in": ids})
    assert isinstance(clause.value, frozenset) and len(clause.value) == devices.MAX_VALUES
    with pytest.raises(FilterError, match="at most 10000 values"):
        devices.parse_filters({"id__in": ids + ",one-more"})
    nested = urlencode([("id__neq", str(i)) for i in range(64)])
    devices.parse_filters({"filter": nested})
    with pytest.raises(FilterError, match="at most 64 conditions"):
        devices.parse_filters({"filter": nested, "state__neq": "x"})
    with pytest.raises(FilterError, match="at most 64 conditions"):
        devices.parse_filters({"filter": nested + "&id__neq=x"})
    with pytest.raises(FilterError, match="at most 64 conditions"):
        devices.parse_filters({"filter": "&".join(["id=x"] * 10_000)})
    with pytest.raises(FilterError, match="longer than"):
        devices.parse_filters({"filter": "id=" + "x" * devices.MAX_FILTER_LENGTH})
    long = "x" * 100_000  # a long value is only compared
    [clause] = devices.parse_filters({"endpoint_type__eq": long})
    assert clause.value == long
    with pytest.raises(FilterError) as refused:  # the message quotes at most 64 characters
        devices.parse_filters({"updated_at__lte": long})
    assert len(refused.value.message) < 200
