"""A device's resources as applications see them: the entries of `GET /v2/endpoints/{id}`.

Owns the rule that turns what a device registered (`RegisteredObjects`) into Pelion's list of
`Resource` entries (`uri`, `obs`, `rt`, `type`), one entry per resource:

- every resource or resource-instance link the device registered (`</3/0/0>;obs`), with its
  own attributes: `obs` true only when the link carries `obs`, `rt` and `ct` (as `type`) as
  given;
- every instance the device registered without any link below it (`</3303/0>`, as Wakaama,
  Anjay and the simulator register) whose object is in the bundled models
  (`lwm2m.models`): one entry per resource the model lists (mandatory and optional alike,
  the resources the device really has are not known), `obs` true when the model makes the
  resource readable (LwM2M lets a server observe any readable resource, and such a device
  says nothing per resource), no `rt`, `type` empty;
- an instance whose object has no model, or an object, that the device registered without
  any link below it (`</33605/0>`, `</2>`): the entry of that instance or object itself,
  with its own attributes.

An instance or object with links below it is described by those links and has no entry of
its own. Entries are sorted by path.

Nothing is kept per device: devices of one kind (one link list) share one list, built at the
first request. A list is bounded by the 512 links a Register may carry, each expanded into at
most one model's resources. Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from dm_actor.lwm2m.models import object_model

if TYPE_CHECKING:
    from dm_actor.lwm2m.link_format import RegisteredObjects


class ListedResource(NamedTuple):
    """One entry: `uri` (`"/3/0/0"`), `obs`, `rt` (None when absent) and `type` (the link's
    `ct`, `""` when absent)."""

    uri: str
    obs: bool
    rt: str | None
    type: str


#: link list -> its resource list, for lists of at most `SHARED_RESOURCES` entries (a fleet
#: has a few kinds; a bigger list, or the 129th kind, is built again on each request): at
#: most about 128 * 1024 * 130 B, and only ever filled by authenticated API requests
_LISTS: dict[RegisteredObjects, tuple[ListedResource, ...]] = {}
_LISTS_LIMIT = 128
SHARED_RESOURCES = 1024


def listed_resources(objects: RegisteredObjects) -> tuple[ListedResource, ...]:
    """The entries of a device's resource list (see the module docstring); may be shared."""
    found = _LISTS.get(objects)
    if found is None:
        found = _build(objects)
        if len(found) <= SHARED_RESOURCES:
            if len(_LISTS) >= _LISTS_LIMIT:
                _LISTS.pop(next(iter(_LISTS)))
            _LISTS[objects] = found
    return found


def _build(objects: RegisteredObjects) -> tuple[ListedResource, ...]:
    paths = objects.paths()  # sorted: the links below a path follow it
    attributes = objects.link_attributes()
    out: list[ListedResource] = []
    for n, path in enumerate(paths):
        text = str(path)
        if path.resource_id is None:
            if n + 1 < len(paths) and paths[n + 1].startswith(path):
                continue  # described by the links below it
            model = object_model(path.object_id) if path.is_instance else None
            if model is not None:
                out.extend(
                    ListedResource(f"{text}/{r.id}", r.readable, None, "") for r in model.resources
                )
                continue
        params = attributes.get(text, {})
        ct = params.get("ct")
        out.append(ListedResource(text, "obs" in params, params.get("rt"), ct or ""))
    return tuple(out)
