"""The attribute text a registration keeps is bounded (link_format.MAX_ATTRIBUTE_BYTES per
registration, MAX_LINK_ATTRIBUTE_BYTES per link): a link beyond keeps its path, without its
attributes; the paths are all kept, and a normal device's attributes are kept whole."""

from __future__ import annotations

from dm_actor.lwm2m.link_format import (
    MAX_ATTRIBUTE_BYTES,
    MAX_LINK_ATTRIBUTE_BYTES,
    RegisteredObjects,
    parse_links,
    registered_objects,
    shared_registered_objects,
)
from dm_actor.lwm2m.path import parse as parse_path


def _objects(text: str) -> RegisteredObjects:
    return registered_objects(parse_links(text))


def test_a_pelion_clients_attributes_are_kept_whole() -> None:
    text = '</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="counter",</3303/0>'
    attributes = _objects(text).link_attributes()
    assert attributes == {
        "/3/0/0": {"obs": None},
        "/3200/0/5501": {"obs": None, "rt": "counter"},
    }


def test_the_attribute_text_of_a_registration_is_bounded_and_every_path_kept() -> None:
    text = ",".join(f'</3303/{i}/5700>;obs;rt="{"r" * 100}"' for i in range(500))
    objects = _objects(text)
    kept = objects.link_attributes()
    # the links in path order keep rt while it fits; every link keeps `obs` (a flag, outside
    # the budget: bounded by max_links)
    with_rt = [path for path, params in kept.items() if "rt" in params]
    assert 0 < len(with_rt) < 500
    assert with_rt == [f"/3303/{i}/5700" for i in range(len(with_rt))]
    assert all(params.get("rt") is None for params in list(kept.values())[len(with_rt) :])
    assert list(kept) == [f"/3303/{i}/5700" for i in range(500)]
    flags = sum(len(f"</3303/{i}/5700>;obs,") for i in range(len(with_rt), 500))
    assert len(objects.attributes.encode()) <= MAX_ATTRIBUTE_BYTES + flags
    assert all(objects.contains(parse_path(f"/3303/{i}/5700")) for i in range(500))
    assert shared_registered_objects(text) == objects  # (the same value, parsed once or not)


def test_one_links_long_attributes_are_dropped_not_the_others() -> None:
    long_rt = "x" * MAX_LINK_ATTRIBUTE_BYTES
    text = f'</3/0/0>;obs;rt="{long_rt}",</3/0/1>;obs'
    assert _objects(text).link_attributes() == {"/3/0/0": {"obs": None}, "/3/0/1": {"obs": None}}
