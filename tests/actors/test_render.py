"""The `resources` of a registration event: the links as the device registered them."""

from __future__ import annotations

from dm_actor.actors.render import _build_resources
from dm_actor.lwm2m.link_format import parse_links, registered_objects


def test_event_resources_keep_the_devices_own_attributes() -> None:
    links = '</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="counter";ct=0,</3303/0>,</2>'
    resources = _build_resources(registered_objects(parse_links(links)))
    assert {r["path"]: r for r in resources} == {
        "/2": {"path": "/2", "obs": False},
        "/3/0/0": {"path": "/3/0/0", "obs": True},
        "/3/0/1": {"path": "/3/0/1", "obs": False},
        "/3200/0/5501": {"path": "/3200/0/5501", "obs": True, "rt": "counter", "ct": "0"},
        "/3303/0": {"path": "/3303/0", "obs": False},
    }
