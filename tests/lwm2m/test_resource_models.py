"""The bundled object models, which paths a registration makes known, and the resource list
applications see (`GET /v2/endpoints/{id}`): issue 14 item 1."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.lwm2m import models
from dm_actor.lwm2m.link_format import (
    SHARED_PAYLOAD,
    Link,
    RegisteredObjects,
    parse_links,
    registered_objects,
    serialise_links,
    shared_registered_objects,
)
from dm_actor.lwm2m.models import object_ids, object_model, resource_model
from dm_actor.lwm2m.path import MAX_ID, Path, parse
from dm_actor.lwm2m.registration import RegisterRequest, RegistrationError, parse_register
from dm_actor.lwm2m.resource_list import _LISTS, _LISTS_LIMIT, ListedResource, listed_resources

PELION = b'</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="counter",</3303/0>'

# -- the models -------------------------------------------------------------------------------

REQUIRED = {0, 1, 2, 3, 4, 5, 6, 7, 3200, 3201, 3202, 3203, 3300, 3301, 3303, 3304, 3311, 3315,
            3316, 3317, 3323, 3336, 3341, 3342, 3347, 3348}  # fmt: skip


def test_the_table_has_the_oma_objects_and_the_common_ipso_ones() -> None:
    assert set(object_ids()) >= REQUIRED
    assert list(object_ids()) == sorted(object_ids())
    assert object_model(9999) is None
    assert resource_model(3, 999) is None
    assert resource_model(9999, 0) is None


def test_device_object() -> None:
    device = object_model(3)
    assert device is not None
    assert (device.name, device.multiple, device.mandatory) == ("Device", False, True)
    assert device.resource(0) == models.ResourceModel(0, "Manufacturer", "R", "String")
    reboot = device.resource(4)
    assert reboot is not None and reboot.executable and reboot.mandatory and reboot.type == ""
    errors = device.resource(11)
    assert errors is not None and errors.multiple and errors.mandatory and errors.readable
    voltage = device.resource(7)
    assert voltage is not None and voltage.units == "mV" and voltage.multiple
    current_time = device.resource(13)
    assert current_time is not None and current_time.writable and current_time.type == "Time"
    assert object_model(3) is device  # one shared table


def test_temperature_and_server_objects() -> None:
    temperature = object_model(3303)
    assert temperature is not None and temperature.name == "Temperature" and temperature.multiple
    assert [r.id for r in temperature.resources] == [5601, 5602, 5603, 5604, 5605, 5700, 5701]
    value = temperature.resource(5700)
    assert value == models.ResourceModel(5700, "Sensor Value", "R", "Float", "Cel", False, True)
    lifetime = resource_model(1, 1)
    assert lifetime is not None and (lifetime.operations, lifetime.units) == ("RW", "s")
    counter = resource_model(3200, 5501)
    assert counter is not None and counter.name == "Digital Input Counter"
    assert resource_model(3311, 5850) == models.ResourceModel(
        5850, "On/Off", "RW", "Boolean", mandatory=True
    )


@pytest.mark.parametrize("oid", object_ids())
def test_every_model_is_consistent(oid: int) -> None:
    model = object_model(oid)
    assert model is not None and model.id == oid and model.name
    ids = [r.id for r in model.resources]
    assert ids == sorted(set(ids))
    assert any(r.mandatory for r in model.resources)
    for r in model.resources:
        assert r.operations in ("R", "W", "RW", "E", "")
        assert (r.type == "") == r.executable, r  # an executable has no value, others one
        assert not (r.executable and r.multiple)
        assert model.resource(r.id) is r
        assert (r.operations == "") == (oid == 0)  # only the Security object is closed


# -- which paths are known --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "known"),
    [
        ("/3", True),  # a parent of a registered resource
        ("/3/0", True),
        ("/3/0/0", True),  # registered
        ("/3/0/1", True),
        ("/3/0/0/1", True),  # under a registered resource
        ("/3/0/2", False),  # a sibling the device did not register
        ("/3/1", False),
        ("/3200", True),
        ("/3200/0/5501", True),
        ("/3200/0/5500", False),
        ("/3303/0/5700", True),  # under a registered instance
        ("/3303/0/5700/0", True),
        ("/3303/1", False),
        ("/1", False),
        ("/5/0/1", False),
    ],
)
def test_known_paths_of_a_pelion_style_registration(path: str, known: bool) -> None:
    assert registered_objects(parse_links(PELION)).contains(parse(path)) is known


def test_resource_instance_links() -> None:
    objects = registered_objects(parse_links(b"</3/0/6/1>;obs,</65535/65535/65535/65535>"))
    for path in ("/3", "/3/0", "/3/0/6", "/3/0/6/1", "/65535/65535/65535/65535", "/65535"):
        assert objects.contains(parse(path)), path
    for path in ("/3/0/6/0", "/3/0/7", "/3/1", "/65535/65535/65535/65534", "/65534"):
        assert not objects.contains(parse(path)), path


IDS = st.sampled_from([0, 1, 2, 65535])
TARGETS = st.lists(IDS, min_size=1, max_size=4).map(tuple)


def naive_known(links: list[tuple[int, ...]], path: tuple[int, ...]) -> bool:
    """The rule as written: a registered link, a parent of one, or under a link that is not an
    object link (an object link covers only the object)."""
    for link in links:
        if path[: len(link)] == link and (len(link) >= 2 or path == link):
            return True
        if link[: len(path)] == path:
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(links=st.lists(TARGETS, max_size=10), path=TARGETS)
def test_the_known_rule_against_a_naive_reference(
    links: list[tuple[int, ...]], path: tuple[int, ...]
) -> None:
    payload = serialise_links(Link("/" + "/".join(map(str, t)), {}) for t in links)
    objects = registered_objects(parse_links(payload))
    assert objects.contains(Path(*path)) is naive_known(links, path)


PARAM_VALUES = st.one_of(st.none(), st.text('ab ,;"\\=<>1', max_size=6))


@settings(max_examples=200, deadline=None)
@given(
    links=st.lists(
        st.tuples(
            TARGETS,
            st.dictionaries(st.sampled_from(["obs", "rt", "ct", "if", "ver", "x"]), PARAM_VALUES),
        ),
        max_size=8,
    )
)
def test_links_and_attributes_round_trip(
    links: list[tuple[tuple[int, ...], dict[str, str | None]]],
) -> None:
    given_links = [Link("/" + "/".join(map(str, t)), params) for t, params in links]
    objects = registered_objects(parse_links(serialise_links(given_links)))
    again = registered_objects(parse_links(serialise_links(objects.links())))
    assert again == objects
    attributes = objects.link_attributes()
    first: dict[str, dict[str, str | None]] = {}
    for link in given_links:
        first.setdefault(link.target, {k: v for k, v in link.params.items() if k != "ver"})
    assert attributes == {target: p for target, p in first.items() if p}


# -- the list applications see ----------------------------------------------------------------


def test_the_issue_example_is_listed_resource_by_resource() -> None:
    listed = listed_resources(registered_objects(parse_links(PELION)))
    assert listed[:3] == (
        ListedResource("/3/0/0", True, None, ""),
        ListedResource("/3/0/1", False, None, ""),  # no obs: Pelion's meaning
        ListedResource("/3200/0/5501", True, "counter", ""),
    )
    # the instance registered alone: its model's resources, observable when readable
    assert listed[3:] == tuple(
        ListedResource(f"/3303/0/{rid}", rid != 5605, None, "")
        for rid in (5601, 5602, 5603, 5604, 5605, 5700, 5701)
    )


def test_instances_objects_and_attributes_as_themselves() -> None:
    payload = b'</>;rt="oma.lwm2m";ct=110,</1/0>,</2>,</5>;ver=1.1,</33605/0>;obs;ct=0,</3/0>'
    listed = listed_resources(registered_objects(parse_links(payload)))
    uris = [r.uri for r in listed]
    assert uris[:2] == ["/1/0/0", "/1/0/1"]
    assert "/2" in uris and "/5/0" not in uris and "/3/0/4" in uris
    assert ListedResource("/5", False, None, "") in listed  # an object with no instances
    assert listed[-1] == ListedResource("/33605/0", True, None, "0")  # no model: itself
    assert uris == sorted(uris, key=lambda u: parse(u).ids)
    # an instance with links below it is described by them only
    listed = listed_resources(registered_objects(parse_links(b"</3303/0>,</3303/0/5700>;obs")))
    assert listed == (ListedResource("/3303/0/5700", True, None, ""),)


def test_alternate_path_is_not_in_the_uris() -> None:
    objects = registered_objects(parse_links(b'</lwm2m>;rt="oma.lwm2m",</lwm2m/3/0/0>;obs'))
    assert listed_resources(objects) == (ListedResource("/3/0/0", True, None, ""),)
    assert objects.contains(parse("/3/0/0")) and not objects.contains(parse("/3/0/1"))


# -- sharing and hostile link lists -----------------------------------------------------------


def register(payload: bytes, ep: str = "a") -> RegisterRequest | RegistrationError:
    options = (
        (OptionNumber.URI_PATH.value, b"rd"),
        (OptionNumber.CONTENT_FORMAT.value, bytes([ContentFormat.LINK_FORMAT.value])),
        (OptionNumber.URI_QUERY.value, f"ep={ep}".encode()),
    )
    return parse_register(Message(MessageType.CON, Code.POST, 1, b"t", options, payload))


def test_devices_with_one_link_list_share_one_parsed_copy_and_one_list() -> None:
    """A Pelion device client's list (every resource, 1-3 KB) is shared as instance lists
    are: one parsed value and one resource list for all the devices that send it."""
    payload = b",".join(
        b"</%d/0/%d>;obs" % (obj, rid) for obj in (1, 3, 5, 3200) for rid in range(30)
    )
    assert 1024 < len(payload) < 8192  # (lists over 1 KB were not shared before)
    first, second = register(payload, "a"), register(payload, "b")
    assert isinstance(first, RegisterRequest) and isinstance(second, RegisterRequest)
    assert first.objects is second.objects
    assert listed_resources(first.objects) is listed_resources(second.objects)
    instances = register(b"</1/0>,</3/0>,</3303/0>")
    again = register(b"</1/0>,</3/0>,</3303/0>")
    assert isinstance(instances, RegisterRequest) and isinstance(again, RegisterRequest)
    assert listed_resources(instances.objects) is listed_resources(again.objects)


@pytest.mark.parametrize(
    "payload",
    [
        b",".join(b"</%d/%d/%d/%d/%d>" % (i, i, i, i, i) for i in range(512)),  # too deep
        b",".join(b"</99999/%d>,</1/99999>" % i for i in range(256)),  # ids over 65535
        b",".join(b"</65535/65535/65535/%d>;obs" % i for i in range(512)),
        b",".join(b'</3303/%d>;rt="%s"' % (i, b"x" * 100) for i in range(512)),
        b",".join(b"</%d/0>" % (3300 + i % 50) for i in range(512)),
    ],
)
def test_absurd_link_lists_are_taken_bounded(payload: bytes) -> None:
    result = register(payload)
    assert isinstance(result, RegisterRequest)
    objects = result.objects
    assert len(objects.paths()) <= 512
    listed = listed_resources(objects)
    assert len(listed) <= 512 * 30  # at most a model's resources per link
    assert len(_LISTS) <= _LISTS_LIMIT
    assert len(objects.attributes) <= len(payload)
    assert all(len(parse(r.uri).ids) <= 4 for r in listed)
    assert MAX_ID == 65535


def test_more_than_512_links_are_refused() -> None:
    many = b",".join(b"</3/0/%d>;obs" % i for i in range(513))
    result = register(many)
    assert isinstance(result, RegistrationError) and result.code == Code.REQUEST_ENTITY_TOO_LARGE


def test_nothing_registered() -> None:
    assert listed_resources(RegisteredObjects()) == ()
    assert not RegisteredObjects().contains(Path(3, 0, 0))


def test_stored_link_lists_are_shared_when_read_back() -> None:
    """The store keeps `links()` as text (actors/persist.py); read back after a restart, the
    devices of one kind share one value again, with every link and attribute."""
    objects = registered_objects(parse_links(PELION))
    text = serialise_links(objects.links())
    assert text == PELION.decode()
    restored = shared_registered_objects(text)
    assert restored == objects and shared_registered_objects(text) is restored
    long_text = ",".join(f"</3/0/{i}>;obs" for i in range(800))
    assert len(long_text) > SHARED_PAYLOAD
    assert shared_registered_objects(long_text) is not shared_registered_objects(long_text)


def test_many_kinds_of_link_list_keep_the_caches_bounded() -> None:
    """Every distinct list gets its own value; the shared resource lists stay at most
    `_LISTS_LIMIT`, whatever an application asks for."""
    for n in range(_LISTS_LIMIT + 50):
        objects = registered_objects(parse_links(b"</3303/%d>,</3/0/%d>;obs" % (n, n)))
        listed = listed_resources(objects)
        assert listed[0] == ListedResource(f"/3/0/{n}", True, None, "")
        assert len(listed) == 1 + 7
    assert len(_LISTS) <= _LISTS_LIMIT
