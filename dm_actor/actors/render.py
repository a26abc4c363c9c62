"""Pelion's JSON for what the registrar publishes: the `EndpointData` of a registration event.

Owns the rendering only (and the sharing of one rendered resource list among devices of one
kind); it never publishes, stores or decides anything.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from dm_actor.lwm2m.link_format import SHARED_ENTRIES

if TYPE_CHECKING:
    from dm_actor.lwm2m.link_format import RegisteredObjects
    from dm_actor.lwm2m.registration import Registration


def _resources(objects: RegisteredObjects) -> list[dict[str, object]]:
    """`EndpointData.resources` of an object list (shared by devices of one kind; read-only;
    a long list is built each time, not kept: see `link_format.SHARED_ENTRIES`)."""
    if len(objects.paths()) > SHARED_ENTRIES:
        return _build_resources(objects)
    return _shared_resources(objects)


def _build_resources(objects: RegisteredObjects) -> list[dict[str, object]]:
    """Each registered link as Pelion's `ResourcesData`: `obs` only where the device said
    `obs`, and its `rt` and `ct` when it gave them."""
    attributes = objects.link_attributes()
    out: list[dict[str, object]] = []
    for path in objects.paths():
        text = str(path)
        params = attributes.get(text, {})
        item: dict[str, object] = {"path": text, "obs": "obs" in params}
        for name in ("rt", "ct"):
            value = params.get(name)
            if value:
                item[name] = value
        out.append(item)
    return out


_shared_resources = lru_cache(maxsize=256)(_build_resources)


def registration_item(reg: Registration, security_mode: str) -> dict[str, object]:
    """The Pelion `EndpointData` of a registration event, with how the device connects
    (`credentials.security_mode`: dm_actor's, not Pelion's)."""
    item: dict[str, object] = {"ep": reg.endpoint, "original-ep": reg.endpoint}
    if reg.endpoint_type is not None:
        item["ept"] = reg.endpoint_type
    item["q"] = reg.queue_mode
    item["security_mode"] = security_mode
    item["resources"] = _resources(reg.objects)
    return item
