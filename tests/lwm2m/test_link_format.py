"""RFC 6690 link-format parsing and serialising, and the LwM2M object list of a Register."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.lwm2m.errors import LinkFormatError
from dm_actor.lwm2m.link_format import (
    Link,
    RegisteredObjects,
    parse_links,
    registered_objects,
    serialise_links,
)
from dm_actor.lwm2m.path import Path, parse

# Register payloads exactly as real clients sent them (tests/vectors/*.txt).
WAKAAMA = (
    b'</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,</1/0>,</2/0>,</3/0>,</4/0>,</5/0>,</6/0>,'
    b"</7/0>,</31024>;ver=1.0,</31024/10>,</31024/11>,</31024/12>"
)
WAKAAMA_V10 = (
    b'</>;rt="oma.lwm2m",</1/0>,</2/0>,</3/0>,</4/0>,</5/0>,</6/0>,</7/0>,</31024>;ver=1.0,'
    b"</31024/10>,</31024/11>,</31024/12>"
)
ANJAY = (
    b"</1/1>,</2>,</3/0>,</4/0>,</5/0>,</6/0>,</7/0>,</10>;ver=1.1,</10/0>,</11>,</16>,</19>,"
    b"</20/0>,</3303/0>,</3313/0>,</3347/0>,</33605>,</33606/0>,</33607/0>,</33608>,</33609/0>"
)


def test_parse_wakaama_register_payload() -> None:
    links = parse_links(WAKAAMA)
    assert links[0] == Link("/", {"rt": "oma.lwm2m", "ct": "110"})
    assert links[1] == Link("/1", {"ver": "1.1"})
    assert links[2] == Link("/1/0", {})
    assert [link.target for link in links[-3:]] == ["/31024/10", "/31024/11", "/31024/12"]
    assert len(links) == 13


def test_parse_discover_answer() -> None:
    links = parse_links("</3/0>,</3/0/0>,</3/0/6>;dim=1,</3/0/7>;dim=2;pmin=10")
    assert links == [
        Link("/3/0", {}),
        Link("/3/0/0", {}),
        Link("/3/0/6", {"dim": "1"}),
        Link("/3/0/7", {"dim": "2", "pmin": "10"}),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("  ", []),
        ("<a>", [Link("a", {})]),
        ("<a>,", [Link("a", {})]),  # trailing comma
        (",<a>,,<b>,", [Link("a", {}), Link("b", {})]),  # empty entries
        (" <a> ; x = 1 , <b> ;y ", [Link("a", {"x": "1"}), Link("b", {"y": None})]),
        ("<a>;obs;rt=x", [Link("a", {"obs": None, "rt": "x"})]),  # flag without a value
        ('<a>;t="x,y;z",<b>', [Link("a", {"t": "x,y;z"}), Link("b", {})]),  # commas in quotes
        ('<a>;t="say \\"hi\\" \\\\ ok"', [Link("a", {"t": 'say "hi" \\ ok'})]),  # escapes
        ('<a>;t=""', [Link("a", {"t": ""})]),
        ("<a>;t=", [Link("a", {"t": ""})]),
        ("<a>;x=1;x=2", [Link("a", {"x": "1"})]),  # a repeat keeps the first value
        ('<a>;ct="60 110"', [Link("a", {"ct": "60 110"})]),
        ("<a>\r\n,\n<b>", [Link("a", {}), Link("b", {})]),
        ("<a,b>", [Link("a,b", {})]),
        ("<>", [Link("", {})]),
    ],
)
def test_parse_edge_cases(text: str, expected: list[Link]) -> None:
    assert parse_links(text) == expected
    assert parse_links(text.encode()) == expected


@pytest.mark.parametrize(
    "text",
    [
        "a",
        "/3/0",
        "<a",
        "<a>b",
        "<a>;",
        "<a>;=1",
        '<a>;x="unterminated',
        '<a>;x="q"junk',
        "<a>;x=1 <b>",
        "<a><b>",
        "<<a>>",
        "<a>;x=<b>",
        '<a>;"x"',
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(LinkFormatError):
        parse_links(text)


def test_parse_rejects_non_utf8() -> None:
    with pytest.raises(LinkFormatError, match="UTF-8"):
        parse_links(b"</3/0>;t=\xff")


def test_serialise() -> None:
    links = [
        Link("/", {"rt": "oma.lwm2m", "ct": "110"}),
        Link("/1", {"ver": "1.1"}),
        Link("/3/0/6", {"dim": "2", "obs": None}),
        Link("/x", {"title": "a,b", "ct": "60 110", "q": 'say "hi"\\'}),
    ]
    text = serialise_links(links)
    assert text == (
        '</>;rt="oma.lwm2m";ct=110,</1>;ver=1.1,</3/0/6>;dim=2;obs,'
        '</x>;title="a,b";ct="60 110";q="say \\"hi\\"\\\\"'
    )
    assert parse_links(text) == links
    assert serialise_links([]) == ""


@pytest.mark.parametrize(
    "link",
    [Link("a>b", {}), Link("a", {"": None}), Link("a", {"x y": "1"}), Link("a", {"x=": None})],
)
def test_serialise_rejects(link: Link) -> None:
    with pytest.raises(ValueError, match="link"):
        serialise_links([link])


_targets = st.text(st.characters(blacklist_characters="<>", codec="utf-8"), max_size=12)
_names = st.text(st.characters(blacklist_characters=';,="<>', codec="utf-8"), min_size=1).filter(
    lambda s: not any(c.isspace() for c in s)
)
_values = st.none() | st.text(st.characters(codec="utf-8"), max_size=12)
_links = st.builds(Link, _targets, st.dictionaries(_names, _values, max_size=4))


@settings(max_examples=300)
@given(st.lists(_links, max_size=5))
def test_serialise_parse_round_trip(links: list[Link]) -> None:
    assert parse_links(serialise_links(links)) == links


@settings(max_examples=500)
@given(
    st.text(alphabet=st.sampled_from('<>;,="\\ /0123abc\n'), max_size=40)
    | st.binary(max_size=40).map(lambda b: b"</3/0>;" + b)
)
def test_parsers_raise_only_link_format_errors(payload: str | bytes) -> None:
    try:
        links = parse_links(payload)
        objects = registered_objects(links)
    except LinkFormatError:
        return
    assert isinstance(objects, RegisteredObjects)
    assert registered_objects(objects.links()) == objects


# -- registered objects ----------------------------------------------------------------------


def test_registered_objects_with_root_entry() -> None:
    objects = registered_objects(parse_links(WAKAAMA))
    assert objects.alt_path == ""
    assert objects.content_formats == (110,)
    assert objects.versions == ((1, "1.1"), (31024, "1.0"))
    assert objects.version(1) == "1.1"
    assert objects.version(3) is None
    assert [str(p) for p in objects.paths()] == [
        "/1",
        "/1/0",
        "/2/0",
        "/3/0",
        "/4/0",
        "/5/0",
        "/6/0",
        "/7/0",
        "/31024",
        "/31024/10",
        "/31024/11",
        "/31024/12",
    ]


def test_registered_objects_without_root_entry() -> None:
    objects = registered_objects(parse_links(ANJAY))
    assert objects.alt_path == ""
    assert objects.content_formats == ()
    assert objects.versions == ((10, "1.1"),)
    assert len(objects.paths()) == 21


def test_root_without_ct() -> None:
    objects = registered_objects(parse_links(WAKAAMA_V10))
    assert objects.content_formats == ()
    assert objects.alt_path == ""
    assert objects.contains(parse("/31024/12"))


@pytest.mark.parametrize(
    ("path", "registered"),
    [
        ("/3", True),
        ("/3/0", True),
        ("/3/0/1", True),
        ("/3/0/6/1", True),
        ("/3/1", False),  # an instance the client did not register
        ("/2", True),  # an object listed without instances: Create (POST /2) is allowed
        ("/2/0", False),  # ... but it has no instances
        ("/1/1", True),
        ("/1/0", False),
        ("/33605", True),
        ("/33605/0", False),
        ("/33606/0/1", True),
        ("/33609/0", True),
        ("/33610", False),
        ("/0", False),
        ("/65535/65535", False),
        ("/10", True),
        ("/10/0", True),
    ],
)
def test_contains(path: str, registered: bool) -> None:
    assert registered_objects(parse_links(ANJAY)).contains(parse(path)) is registered


def test_contains_when_nothing_is_registered() -> None:
    assert not RegisteredObjects().contains(Path(3))
    assert not RegisteredObjects().contains(Path(3, 0))


def test_alternate_path() -> None:
    payload = (
        '</lwm2m>;rt="oma.lwm2m";ct="60 110",</lwm2m/1/0>,</lwm2m/3/0>,</lwm2m/5>;ver=1.1,</4/0>'
    )
    objects = registered_objects(parse_links(payload))
    assert objects.alt_path == "/lwm2m"
    assert objects.content_formats == (60, 110)
    assert [str(p) for p in objects.paths()] == ["/1/0", "/3/0", "/5"]  # </4/0> is outside
    assert objects.contains(parse("/3/0/1"))
    assert not objects.contains(parse("/4/0"))
    assert parse("/3/0/1").uri_path_options(objects.alt_path)[0][1] == b"lwm2m"
    assert serialise_links(objects.links()) == (
        '</lwm2m>;rt="oma.lwm2m";ct="60 110",</lwm2m/1/0>,</lwm2m/3/0>,</lwm2m/5>;ver=1.1'
    )


def test_alternate_path_with_trailing_slash_and_rt_list() -> None:
    objects = registered_objects(parse_links('</lwm2m/>;rt="core.rd oma.lwm2m",</lwm2m/3/0>'))
    assert objects.alt_path == "/lwm2m"
    assert objects.paths() == [Path(3, 0)]


def test_links_that_are_not_lwm2m_paths_are_ignored() -> None:
    objects = registered_objects(
        parse_links("</3/0/1>,</x>,<3/0>,</>,</3/0/1/2>,<http://a/1>,</1/2/3/4/5>,</70000/0>")
    )
    assert objects.paths() == [Path(3, 0), Path(3, 0, 1), Path(3, 0, 1, 2)]


def test_ver_on_an_instance_link_marks_the_object() -> None:
    objects = registered_objects(parse_links("</7/0>;ver=1.2"))
    assert objects.paths() == [Path(7), Path(7, 0)]
    assert objects.version(7) == "1.2"


def test_duplicates_collapse() -> None:
    objects = registered_objects(parse_links("</3/0>,</3/0>,</3>,</3>"))
    assert objects.paths() == [Path(3), Path(3, 0)]


@pytest.mark.parametrize(
    "payload",
    [
        '</>;rt="oma.lwm2m",</x>;rt="oma.lwm2m"',
        '<lwm2m>;rt="oma.lwm2m"',
        '</>;rt="oma.lwm2m";ct=json',
        '</>;rt="oma.lwm2m";ct=70000',
        '</>;rt="oma.lwm2m";ct="110 -1"',
        '</>;rt="oma.lwm2m";ct=' + "1" * 5000,
    ],
)
def test_registered_objects_rejects(payload: str) -> None:
    with pytest.raises(LinkFormatError):
        registered_objects(parse_links(payload))


@pytest.mark.parametrize("payload", [WAKAAMA, WAKAAMA_V10, ANJAY])
def test_links_round_trip(payload: bytes) -> None:
    objects = registered_objects(parse_links(payload))
    assert registered_objects(parse_links(serialise_links(objects.links()))) == objects


def test_registered_objects_are_compact_values() -> None:
    objects = registered_objects(parse_links(ANJAY))
    assert len(objects.entries) == 8 * 21
    assert objects == registered_objects(parse_links(ANJAY))
    assert hash(objects) == hash(registered_objects(parse_links(ANJAY)))
    assert objects != registered_objects(parse_links(WAKAAMA))


def test_repr_lists_paths() -> None:
    assert repr(registered_objects(parse_links(WAKAAMA_V10))).endswith(
        "versions=((31024, '1.0'),), paths='/1/0,/2/0,/3/0,/4/0,/5/0,/6/0,/7/0,"
        "/31024,/31024/10,/31024/11,/31024/12')"
    )
