"""LwM2M paths: parsing, formatting, CoAP options, and rejection of every malformed form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.numbers import OptionNumber
from dm_actor.lwm2m.errors import InvalidPath, Lwm2mError
from dm_actor.lwm2m.path import Path, from_segments, parse, split_query

_URI_PATH = OptionNumber.URI_PATH.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/3", Path(3)),
        ("/3/0", Path(3, 0)),
        ("/3/0/1", Path(3, 0, 1)),
        ("/3/0/6/1", Path(3, 0, 6, 1)),
        ("3/0/1", Path(3, 0, 1)),  # an SDK sends the uri without its leading slash
        ("3", Path(3)),
        ("/65535/65535/65535/65535", Path(65535, 65535, 65535, 65535)),
        ("/0/0", Path(0, 0)),
        ("/03/00", Path(3, 0)),
    ],
)
def test_parse(text: str, expected: Path) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/",
        "//3",
        "/3/",
        "/3//0",
        "/3/0/1/2/3",
        "/65536",
        "/3/70000",
        "/999999",
        "/-1",
        "/+3",
        "/3a",
        "/a",
        "/3 ",
        " /3",
        "/3/0?x",
        "/٣",  # Arabic-Indic digit three: str.isdigit() says yes, LwM2M says no
        "/3/0/1/2/",
        "/00000003",
        "3" * 10_000,
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidPath):
        parse(text)


def test_invalid_path_is_a_value_error_and_an_lwm2m_error() -> None:
    with pytest.raises(ValueError, match="65536"):
        parse("/65536")
    assert issubclass(InvalidPath, Lwm2mError)


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (Path(3), "/3"),
        (Path(3, 0), "/3/0"),
        (Path(3, 0, 1), "/3/0/1"),
        (Path(3, 0, 6, 1), "/3/0/6/1"),
    ],
)
def test_str(path: Path, text: str) -> None:
    assert str(path) == text


@pytest.mark.parametrize(
    "ids",
    [(3, None, 1, None), (3, None, None, 1), (3, 0, None, 1), (-1,), (65536,), (3, 65536)],
)
def test_constructor_checks_ids(ids: tuple[int | None, ...]) -> None:
    with pytest.raises(InvalidPath):
        Path(*ids)  # type: ignore[arg-type]


def test_levels() -> None:
    levels = {
        "/3": (True, False, False, False),
        "/3/0": (False, True, False, False),
        "/3/0/1": (False, False, True, False),
        "/3/0/6/1": (False, False, False, True),
    }
    for text, expected in levels.items():
        p = parse(text)
        assert (p.is_object, p.is_instance, p.is_resource, p.is_resource_instance) == expected


def test_startswith() -> None:
    assert parse("/3/0/1").startswith(parse("/3"))
    assert parse("/3/0/1").startswith(parse("/3/0"))
    assert parse("/3/0/1").startswith(parse("/3/0/1"))
    assert not parse("/3/0/1").startswith(parse("/3/1"))
    assert not parse("/3/0").startswith(parse("/3/0/1"))
    assert not parse("/30/0").startswith(parse("/3"))


def test_uri_path_options() -> None:
    assert parse("/3/0/1").uri_path_options() == (
        (_URI_PATH, b"3"),
        (_URI_PATH, b"0"),
        (_URI_PATH, b"1"),
    )
    assert parse("/5").uri_path_options("/lwm2m") == ((_URI_PATH, b"lwm2m"), (_URI_PATH, b"5"))


def test_from_segments() -> None:
    assert from_segments(("31024", "10", "1")) == Path(31024, 10, 1)
    for bad in [(), ("3", "0", "1", "2", "3"), ("3", ""), ("rd",), ("3", "0x1")]:
        with pytest.raises(InvalidPath):
            from_segments(bad)


def test_split_query() -> None:
    assert split_query("/3/0/13?pmin=10&pmax=60") == (Path(3, 0, 13), "pmin=10&pmax=60")
    assert split_query("3/0") == (Path(3, 0), "")
    assert split_query("/3?") == (Path(3), "")
    with pytest.raises(InvalidPath):
        split_query("?pmin=1")


def test_value_semantics() -> None:
    assert {parse("/3/0"), parse("3/0")} == {Path(3, 0)}
    with pytest.raises(AttributeError):
        parse("/3").object_id = 4  # type: ignore[misc]


_ids = st.integers(0, 65535)
paths = st.builds(
    lambda ids, depth: Path(*ids[:depth]),
    st.tuples(_ids, _ids, _ids, _ids),
    st.integers(1, 4),
)


@settings(max_examples=300)
@given(paths)
def test_round_trip(path: Path) -> None:
    text = str(path)
    assert parse(text) == path
    assert parse(text[1:]) == path
    assert from_segments([v.decode() for _, v in path.uri_path_options()]) == path
    assert path.startswith(Path(path.object_id))


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("0123456789/ ?a-+٣"), max_size=30) | st.text(max_size=30))
def test_parse_raises_only_invalid_path(text: str) -> None:
    try:
        path = parse(text)
    except InvalidPath:
        return
    assert str(path) == "/" + "/".join(str(int(s)) for s in text.strip("/").split("/"))
