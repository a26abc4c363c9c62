"""The LwM2M objects of one simulated device, and the notification rules a client evaluates.

Owns the object tree of a simulated client: Server `/1/0`, Device `/3/0`, Temperature
`/3303/x` (a seeded random walk) and Light Control `/3311/x`, with the LwM2M operations on it
(Read, Write, Execute, Create, Delete, Discover, Write-Attributes) answered with the CoAP codes
a real client uses: 4.04 for what does not exist, 4.05 for an operation the item does not
allow, 4.00 for a bad value, 4.06/4.15 for content formats. Also owns the notification rules
(pmin, pmax, gt, lt, st) and when they say to notify.

Pure: time comes in as `now`, randomness from the shared `World.rng`. Never touches a socket,
never builds CoAP messages: `client` does that.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from dm_actor.coap.numbers import Code, ContentFormat
from dm_actor.lwm2m import content
from dm_actor.lwm2m.attributes import InvalidAttributes, parse_attributes
from dm_actor.lwm2m.content import (
    ContentDecodeError,
    ContentEncodeError,
    ResourceValue,
    UnsupportedContentFormat,
    Value,
)
from dm_actor.lwm2m.content.values import path_ids

if TYPE_CHECKING:
    import random

_T = TypeVar("_T", "Temperature", "Light")

#: The resources of each object: id -> (kind, operations). Kinds: s str, i int, f float,
#: b bool, t time (int seconds), e executable. Operations: R, W, E; M marks a resource with
#: instances.
RESOURCES: dict[int, dict[int, tuple[str, str]]] = {
    1: {0: ("i", "R"), 1: ("i", "RW"), 2: ("i", "RW"), 3: ("i", "RW"), 6: ("b", "RW"),
        7: ("s", "R"), 8: ("e", "E")},
    3: {0: ("s", "R"), 1: ("s", "R"), 2: ("s", "R"), 3: ("s", "R"), 4: ("e", "E"),
        9: ("i", "R"), 11: ("i", "RM"), 13: ("t", "RW"), 16: ("s", "R")},
    3303: {5601: ("f", "R"), 5602: ("f", "R"), 5605: ("e", "E"), 5700: ("f", "R"),
           5701: ("s", "R")},
    3311: {5850: ("b", "RW"), 5851: ("i", "RW"), 5852: ("i", "R")},
}  # fmt: skip
#: Objects whose instances the server may create and delete.
MULTIPLE = frozenset((3303, 3311))

MANUFACTURER = "dm-actor"
MODEL = "sim-1"
FIRMWARE = "1.0"
#: Temperature random walk: standard deviation per sampling step, and the physical range.
STEP = 0.25
LOW, HIGH = -40.0, 85.0

#: `ObjectTree.wants` bits: what the client must do after serving a request.
WANT_UPDATE = 1  # lifetime written or /1/0/8 executed: send an Update
WANT_OBJECTS = 2  # an instance was created or deleted: send an Update with the object list
WANT_REBOOT = 4  # /3/0/4 executed: reboot after answering

_TEXT = ContentFormat.TEXT.value
_SENML_JSON = ContentFormat.SENML_JSON.value
_CONTENT_ERRORS = (ContentEncodeError, UnsupportedContentFormat)


class World:
    """What every device of a fleet shares: the seeded randomness, the sensor sampling period
    and the wall clock (`epoch` is the Unix time at `now == 0`)."""

    __slots__ = ("epoch", "rng", "sample_period")

    def __init__(self, rng: random.Random, sample_period: float = 5.0, epoch: float = 0.0):
        if sample_period <= 0:
            raise ValueError("sample_period must be positive")
        self.rng = rng
        self.sample_period = sample_period
        self.epoch = epoch


class Temperature:
    """One `/3303/x`: a random walk sampled every `World.sample_period` seconds, lazily."""

    __slots__ = ("high", "iid", "low", "tick", "value")

    def __init__(self, iid: int, value: float, tick: int) -> None:
        self.iid = iid
        self.value = self.low = self.high = value
        self.tick = tick

    def sample(self, world: World, tick: int) -> float:
        """The value at sampling step `tick` (steps not read are drawn as one Gaussian step)."""
        steps = tick - self.tick
        if steps > 0:
            value = self.value + world.rng.gauss(0.0, STEP * math.sqrt(steps))
            self.value = value = round(min(HIGH, max(LOW, value)), 2)
            self.tick = tick
            self.low = min(self.low, value)
            self.high = max(self.high, value)
        return self.value


class Light:
    """One `/3311/x`: on/off, dimmer, and the time it was switched on."""

    __slots__ = ("dimmer", "iid", "on_since")

    def __init__(self, iid: int) -> None:
        self.iid = iid
        self.dimmer = 100
        self.on_since: float | None = None


class Rules(NamedTuple):
    """The notification attributes in force for one observed path (LwM2M 1.1 5.1.2)."""

    pmin: float = 0.0
    pmax: float | None = None
    gt: float | None = None
    lt: float | None = None
    st: float | None = None


def notification_due(
    rules: Rules, last: object, last_time: float, value: object, now: float
) -> bool:
    """Whether a client notifies now, having last notified `last` at `last_time`.

    pmax elapsed: always. Before pmin: never. Otherwise a numeric value notifies when it
    crossed gt or lt, or moved by st or more, if any of those is set; any other value (and a
    numeric one with none of them set) notifies when it changed.
    """
    elapsed = now - last_time
    if rules.pmax is not None and rules.pmax > 0 and elapsed >= rules.pmax:
        return True
    if elapsed < rules.pmin or value == last:
        return False
    gt, lt, st = rules.gt, rules.lt, rules.st
    if gt is None and lt is None and st is None:
        return True
    if not (_is_number(value) and _is_number(last)):
        return True
    assert isinstance(value, int | float) and isinstance(last, int | float)
    return (
        (gt is not None and (last > gt) != (value > gt))
        or (lt is not None and (last < lt) != (value < lt))
        or (st is not None and abs(value - last) >= st)
    )


def next_check(rules: Rules, last_time: float, next_change: float) -> float:
    """When to evaluate an observation next: at the next value change but not before pmin,
    and at pmax at the latest."""
    at = max(last_time + rules.pmin, next_change)
    if rules.pmax is not None and rules.pmax > 0:
        at = min(at, last_time + rules.pmax)
    return at


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def path_text(ids: tuple[int, ...]) -> str:
    return "/" + "/".join(map(str, ids))


class ObjectTree:
    """The objects of one device and the LwM2M operations on them.

    Args:
        endpoint: the endpoint name (the serial number is derived from it).
        world: what the fleet shares.
        now: the time the device is created (its battery starts full then).
        lifetime: `/1/0/1`.
        binding: `/1/0/7`.
        temperatures: how many `/3303` instances (ids 0..n-1).
        lights: how many `/3311` instances.
    """

    __slots__ = (
        "attributes",
        "binding",
        "born",
        "clock_offset",
        "endpoint",
        "lifetime",
        "lights",
        "phase",
        "pmax",
        "pmin",
        "storing",
        "temperatures",
        "wants",
        "world",
    )

    def __init__(
        self,
        endpoint: str,
        world: World,
        now: float,
        *,
        lifetime: int = 86400,
        binding: str = "U",
        temperatures: int = 1,
        lights: int = 1,
    ) -> None:
        self.endpoint = endpoint
        self.world = world
        self.born = now
        self.lifetime = lifetime
        self.binding = binding
        self.pmin = 0
        self.pmax = 0
        self.storing = True
        self.clock_offset = 0.0
        rng = world.rng
        self.phase = rng.uniform(0.0, world.sample_period)
        tick = self.tick(now)
        # lists sorted by instance id: a one-entry list costs a third of a one-entry dict
        self.temperatures = [
            Temperature(i, round(rng.uniform(15.0, 30.0), 2), tick) for i in range(temperatures)
        ]
        self.lights = [Light(i) for i in range(lights)]
        self.attributes: dict[str, dict[str, float | int]] | None = None
        self.wants = 0

    # -- the object model ---------------------------------------------------------------

    def tick(self, now: float) -> int:
        """The sampling step `now` falls in (each device has its own phase, so that a fleet's
        sensors do not all change at the same instant)."""
        return int((now + self.phase) // self.world.sample_period)

    def next_change(self, now: float) -> float:
        """When sensor values change next."""
        return (self.tick(now) + 1) * self.world.sample_period - self.phase

    def instance_ids(self, object_id: int) -> list[int] | None:
        """The instances of an object, or None for an object this device does not have."""
        if object_id in (1, 3):
            return [0]
        if object_id == 3303:
            return [t.iid for t in self.temperatures]
        if object_id == 3311:
            return [light.iid for light in self.lights]
        return None

    def temperature(self, iid: int) -> Temperature:
        """`/3303/iid` (KeyError when there is none)."""
        return _find(self.temperatures, iid)

    def light(self, iid: int) -> Light:
        """`/3311/iid` (KeyError when there is none)."""
        return _find(self.lights, iid)

    def object_links(self) -> bytes:
        """The Register payload: every object instance in link format."""
        return _object_links(
            tuple(t.iid for t in self.temperatures), tuple(light.iid for light in self.lights)
        )

    def _value(
        self, object_id: int, instance_id: int, rid: int, now: float
    ) -> Value | dict[int, Value]:
        match object_id, rid:
            case 1, 0:
                return 1
            case 1, 1:
                return self.lifetime
            case 1, 2:
                return self.pmin
            case 1, 3:
                return self.pmax
            case 1, 6:
                return self.storing
            case 1, 7:
                return self.binding
            case 3, 0:
                return MANUFACTURER
            case 3, 1:
                return MODEL
            case 3, 2:
                return f"SN-{self.endpoint}"
            case 3, 3:
                return FIRMWARE
            case 3, 9:
                return max(0, 100 - int((now - self.born) // 3600))  # 1 % an hour
            case 3, 11:
                return {0: 0}
            case 3, 13:
                return int(self.world.epoch + now + self.clock_offset)
            case 3, 16:
                return "UQT"
            case 3303, 5700:
                return self.temperature(instance_id).sample(self.world, self.tick(now))
            case 3303, 5601:
                temp = self.temperature(instance_id)
                temp.sample(self.world, self.tick(now))
                return temp.low
            case 3303, 5602:
                temp = self.temperature(instance_id)
                temp.sample(self.world, self.tick(now))
                return temp.high
            case 3303, 5701:
                return "Cel"
            case 3311, 5850:
                return self.light(instance_id).on_since is not None
            case 3311, 5851:
                return self.light(instance_id).dimmer
            case 3311, 5852:
                since = self.light(instance_id).on_since
                return 0 if since is None else int(now - since)
        raise KeyError((object_id, rid))  # RESOURCES and this table disagree

    # -- Read -----------------------------------------------------------------------------

    def read(self, ids: tuple[int, ...], now: float) -> list[ResourceValue] | int:
        """The values under a path, or the error code (4.04 missing, 4.05 not readable)."""
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        table, instances = found
        if len(ids) >= 3 and "R" not in table[ids[2]][1]:
            return Code.METHOD_NOT_ALLOWED
        rids = [ids[2]] if len(ids) >= 3 else [r for r, (_, ops) in table.items() if "R" in ops]
        object_id = ids[0]
        out: list[ResourceValue] = []
        for instance_id in instances:
            for rid in rids:
                value = self._value(object_id, instance_id, rid, now)
                if isinstance(value, dict):
                    for riid, item in sorted(value.items()):
                        if len(ids) < 4 or ids[3] == riid:
                            out.append(
                                ResourceValue(f"/{object_id}/{instance_id}/{rid}/{riid}", item)
                            )
                elif len(ids) < 4:
                    out.append(ResourceValue(f"/{object_id}/{instance_id}/{rid}", value))
        if len(ids) == 4 and not out:
            return Code.NOT_FOUND
        return out

    def read_encoded(
        self, ids: tuple[int, ...], accept: int | None, now: float
    ) -> tuple[int, int, bytes, list[ResourceValue]]:
        """Read and encode: `(code, content_format, payload, values)`.

        Without Accept a single resource is text/plain and anything larger SenML JSON; an
        Accept the values cannot be encoded in gives 4.06.
        """
        values = self.read(ids, now)
        if isinstance(values, int):
            return values, 0, b"", []
        if accept is None:
            single = len(ids) >= 3 and len(values) == 1 and values[0].path.count("/") == len(ids)
            accept = _TEXT if single else _SENML_JSON
        try:
            payload = content.encode(accept, values, path_text(ids))
        except _CONTENT_ERRORS:
            return Code.NOT_ACCEPTABLE, 0, b"", []
        return Code.CONTENT, accept, payload, values

    def _locate(self, ids: tuple[int, ...]) -> tuple[dict[int, tuple[str, str]], list[int]] | int:
        """The resource table and the instances a path covers, or 4.04."""
        table = RESOURCES.get(ids[0])
        instances = self.instance_ids(ids[0])
        if table is None or instances is None:
            return Code.NOT_FOUND
        if len(ids) >= 2:
            if ids[1] not in instances:
                return Code.NOT_FOUND
            instances = [ids[1]]
        if len(ids) >= 3:
            spec = table.get(ids[2])
            if spec is None or (len(ids) == 4 and "M" not in spec[1]):
                return Code.NOT_FOUND
        return table, instances

    # -- Write, Execute, Create, Delete --------------------------------------------------------

    def write(
        self, ids: tuple[int, ...], content_format: int | None, payload: bytes, now: float
    ) -> int:
        """Write (replace or partial update) an instance or resource; the CoAP response code.

        Every value is checked before any is applied. A missing Content-Format is read as
        text/plain for a single resource.
        """
        if len(ids) < 2:
            return Code.METHOD_NOT_ALLOWED
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        if len(ids) >= 3 and "W" not in found[0][ids[2]][1]:
            return Code.METHOD_NOT_ALLOWED
        if content_format is None:
            if len(ids) < 3:
                return Code.BAD_REQUEST
            content_format = _TEXT
        checked = self._decode_writes(ids, content_format, payload)
        if isinstance(checked, int):
            return checked
        for rid, value in checked:
            self._apply(ids[0], ids[1], rid, value, now)
        return Code.CHANGED

    def _decode_writes(
        self, ids: tuple[int, ...], content_format: int, payload: bytes
    ) -> list[tuple[int, Value]] | int:
        try:
            values = content.decode(content_format, payload, path_text(ids))
        except UnsupportedContentFormat:
            return Code.UNSUPPORTED_CONTENT_FORMAT
        except ContentDecodeError:
            return Code.BAD_REQUEST
        table = RESOURCES[ids[0]]
        out: list[tuple[int, Value]] = []
        for item in values:
            try:
                vids = path_ids(item.path)
            except ContentDecodeError:
                return Code.BAD_REQUEST
            if len(vids) != 3 or vids[: len(ids)] != ids[: len(vids)]:
                return Code.BAD_REQUEST
            spec = table.get(vids[2])
            if spec is None:
                return Code.NOT_FOUND
            if "W" not in spec[1]:
                return Code.METHOD_NOT_ALLOWED
            value = convert(spec[0], item.value)
            if value is None or not _in_range(ids[0], vids[2], value):
                return Code.BAD_REQUEST
            out.append((vids[2], value))
        return out

    def _apply(self, object_id: int, instance_id: int, rid: int, value: Value, now: float) -> None:
        assert isinstance(value, int | float | str)
        match object_id, rid:
            case 1, 1:
                if value != self.lifetime:
                    self.lifetime = int(value)
                    self.wants |= WANT_UPDATE
            case 1, 2:
                self.pmin = int(value)
            case 1, 3:
                self.pmax = int(value)
            case 1, 6:
                self.storing = bool(value)
            case 3, 13:
                self.clock_offset = int(value) - (self.world.epoch + now)
            case 3311, 5850:
                light = self.light(instance_id)
                if bool(value) != (light.on_since is not None):
                    light.on_since = now if value else None
            case 3311, 5851:
                self.light(instance_id).dimmer = int(value)

    def execute(self, ids: tuple[int, ...], now: float) -> int:
        """Execute a resource; sets `wants` for what the client must do next."""
        if len(ids) != 3:
            return Code.METHOD_NOT_ALLOWED
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        if "E" not in found[0][ids[2]][1]:
            return Code.METHOD_NOT_ALLOWED
        match ids[0], ids[2]:
            case 1, 8:
                self.wants |= WANT_UPDATE
            case 3, 4:
                self.wants |= WANT_REBOOT
            case 3303, 5605:
                temp = self.temperature(ids[1])
                temp.low = temp.high = temp.sample(self.world, self.tick(now))
        return Code.CHANGED

    def create(
        self, object_id: int, content_format: int | None, payload: bytes, now: float
    ) -> tuple[int, int | None]:
        """Create an instance of `/3303` or `/3311`: `(code, new instance id)`.

        The instance id comes from the payload or is the lowest free one; writable resources
        in the payload are applied. 4.05 for objects that have one instance only, 4.00 for
        an instance id in use.
        """
        instances = self.instance_ids(object_id)
        if instances is None:
            return Code.NOT_FOUND, None
        if object_id not in MULTIPLE:
            return Code.METHOD_NOT_ALLOWED, None
        try:
            values = (
                []
                if not payload
                else content.decode(
                    _TEXT if content_format is None else content_format, payload, f"/{object_id}"
                )
            )
        except UnsupportedContentFormat:
            return Code.UNSUPPORTED_CONTENT_FORMAT, None
        except ContentDecodeError:
            return Code.BAD_REQUEST, None
        given = {path_ids(v.path)[1] for v in values}
        if len(given) > 1:
            return Code.BAD_REQUEST, None
        instance_id = given.pop() if given else min(set(range(len(instances) + 1)) - set(instances))
        if instance_id in instances:
            return Code.BAD_REQUEST, None
        writes: list[tuple[int, Value]] = []
        table = RESOURCES[object_id]
        for item in values:
            vids = path_ids(item.path)
            spec = table.get(vids[2]) if len(vids) == 3 else None
            if spec is None:
                return Code.BAD_REQUEST, None
            if "W" in spec[1]:
                value = convert(spec[0], item.value)
                if value is None or not _in_range(object_id, vids[2], value):
                    return Code.BAD_REQUEST, None
                writes.append((vids[2], value))
        if object_id == 3303:
            temp = Temperature(instance_id, round(self.world.rng.uniform(15.0, 30.0), 2),
                               self.tick(now))  # fmt: skip
            self.temperatures = sorted((*self.temperatures, temp), key=_iid)
        else:
            self.lights = sorted((*self.lights, Light(instance_id)), key=_iid)
        for rid, value in writes:
            self._apply(object_id, instance_id, rid, value, now)
        self.wants |= WANT_OBJECTS
        return Code.CREATED, instance_id

    def delete(self, ids: tuple[int, ...]) -> int:
        """Delete an instance of `/3303` or `/3311`; 4.05 for anything else that exists."""
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        if len(ids) != 2 or ids[0] not in MULTIPLE:
            return Code.METHOD_NOT_ALLOWED
        if ids[0] == 3303:
            self.temperatures = [t for t in self.temperatures if t.iid != ids[1]]
        else:
            self.lights = [light for light in self.lights if light.iid != ids[1]]
        self.wants |= WANT_OBJECTS
        return Code.DELETED

    # -- Discover and attributes ------------------------------------------------------------

    def discover(self, ids: tuple[int, ...]) -> bytes | int:
        """The link-format answer to Discover on a path, with the attributes written there."""
        if len(ids) > 3:
            return Code.BAD_REQUEST
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        table, instances = found
        object_id = ids[0]
        links: list[str] = []
        if len(ids) == 1:
            links.append(self._link((object_id,)))
        for instance_id in instances:
            if len(ids) <= 2:
                links.append(self._link((object_id, instance_id)))
            for rid, (_, ops) in table.items():
                if len(ids) < 3 or ids[2] == rid:
                    dim = ";dim=1" if "M" in ops else ""
                    links.append(self._link((object_id, instance_id, rid)) + dim)
        return ",".join(links).encode()

    def _link(self, ids: tuple[int, ...]) -> str:
        path = path_text(ids)
        attrs = (self.attributes or {}).get(path)
        if not attrs:
            return f"<{path}>"
        return f"<{path}>;" + ";".join(f"{k}={_number(v)}" for k, v in attrs.items())

    def write_attributes(self, ids: tuple[int, ...], query: str) -> int:
        """Write-Attributes (`PUT path?pmin=..`): 2.04, or 4.04 / 4.00."""
        found = self._locate(ids)
        if isinstance(found, int):
            return found
        try:
            parsed = parse_attributes(query)
        except InvalidAttributes:
            return Code.BAD_REQUEST
        if self.attributes is None:
            self.attributes = {}
        path = path_text(ids)
        merged = dict(self.attributes.get(path, {}))
        for name, value in parsed.values:
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        try:
            parse_attributes("&".join(f"{k}={_number(v)}" for k, v in merged.items()) or "pmin")
        except InvalidAttributes:
            return Code.BAD_REQUEST  # the merged set is impossible (e.g. pmin above pmax)
        if merged:
            self.attributes[path] = merged
        else:
            self.attributes.pop(path, None)
        return Code.CHANGED

    def rules(self, ids: tuple[int, ...]) -> Rules:
        """The rules for an observed path: attributes written on it, else on its instance,
        else on its object (LwM2M's inheritance), pmin/pmax defaulting to `/1/0/2` and
        `/1/0/3`."""
        found: dict[str, float | int] = {}
        attributes = self.attributes
        if attributes:
            for depth in range(len(ids), 0, -1):
                for name, value in attributes.get(path_text(ids[:depth]), {}).items():
                    found.setdefault(name, value)
        pmax = found.get("pmax", self.pmax)
        return Rules(
            float(found.get("pmin", self.pmin)),
            float(pmax) if pmax else None,
            _float(found.get("gt")),
            _float(found.get("lt")),
            _float(found.get("st")),
        )


@functools.lru_cache(maxsize=256)  # a fleet's devices mostly share one layout
def _object_links(temperatures: tuple[int, ...], lights: tuple[int, ...]) -> bytes:
    links = ['</>;rt="oma.lwm2m";ct=110,</1/0>,</3/0>']
    links.extend(f"</3303/{i}>" for i in temperatures)
    links.extend(f"</3311/{i}>" for i in lights)
    return ",".join(links).encode()


def _find(items: list[_T], iid: int) -> _T:
    for item in items:
        if item.iid == iid:
            return item
    raise KeyError(iid)


def _iid(item: Temperature | Light) -> int:
    return item.iid


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _in_range(object_id: int, rid: int, value: Value) -> bool:
    if object_id == 3311 and rid == 5851:
        return isinstance(value, int) and 0 <= value <= 100
    if object_id == 1 and rid == 1:
        return isinstance(value, int) and value > 0
    if object_id == 1 and rid in (2, 3):
        return isinstance(value, int) and value >= 0
    return True


def convert(kind: str, value: Value) -> Value:
    """A decoded value as the resource's type: text/plain gives str, TLV bytes; None when it
    is not a value of that type."""
    try:
        match kind:
            case "i" | "t":
                return _to_int(value)
            case "f":
                return _to_float(value)
            case "b":
                return _to_bool(value)
            case "s":
                if isinstance(value, bytes):
                    return content.tlv_str(value)
                return value if isinstance(value, str) else None
    except (ValueError, ContentDecodeError):
        return None
    return None


def _to_int(value: Value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        return int(value)
    if isinstance(value, bytes):
        return content.tlv_int(value)
    return None


def _to_float(value: Value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        result = float(value)
        return result if math.isfinite(result) else None
    if isinstance(value, bytes):
        return content.tlv_float(value)
    return None


def _to_bool(value: Value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value in ("0", "1", "true", "false"):
        return value in ("1", "true")
    if isinstance(value, bytes):
        return content.tlv_bool(value)
    return None
