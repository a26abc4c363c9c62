"""Bundled LwM2M object models: the OMA objects 0-7 and the common IPSO objects.

Owns the table of object definitions the server knows without asking the device: per object
its name and whether it may have several instances, per resource its name, operations,
whether it is a multiple resource, whether the object's definition makes it mandatory, its
data type and its units. Written by hand from the OMA LwM2M registry's definitions (the
objects' versions 1.0 and 1.1, resources of both); a resource whose definition we were not
sure of is left out, so the table may list fewer resources than the registry, never other
ones. Used to list an instance's resources when a device registers only the instance
(`lwm2m.resource_list`), and by whatever shows resources by name.

The table is immutable and shared: `object_model(3)` returns the same `ObjectModel` each time.
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: LwM2M operations on a resource: Read, Write, both, Execute, or none ("" for the Security
#: object's resources, which no LwM2M server may access).
Operations = Literal["R", "W", "RW", "E", ""]
#: LwM2M data types; "" for an executable resource, which has no value.
DataType = Literal[
    "String", "Integer", "Unsigned Integer", "Float", "Boolean", "Opaque", "Time", "Objlnk", ""
]


@dataclass(frozen=True, slots=True)
class ResourceModel:
    """One resource of an object's definition.

    Attributes:
        id: the resource id (`5700`).
        name: the registry's name (`"Sensor Value"`).
        operations: `"R"`, `"W"`, `"RW"`, `"E"` or `""` (no access).
        multiple: a multiple resource (resource instances `/o/i/r/ri`).
        mandatory: the object's definition makes the resource mandatory.
        type: the data type, `""` for an executable.
        units: the registry's units (`"Cel"`, `"s"`), `""` when it names none.
    """

    id: int
    name: str
    operations: Operations
    type: DataType
    units: str = ""
    multiple: bool = False
    mandatory: bool = False

    @property
    def readable(self) -> bool:
        """Read (and so Observe) is allowed."""
        return "R" in self.operations

    @property
    def writable(self) -> bool:
        return "W" in self.operations

    @property
    def executable(self) -> bool:
        return self.operations == "E"


@dataclass(frozen=True, slots=True)
class ObjectModel:
    """One object's definition.

    Attributes:
        id: the object id (`3303`).
        name: the registry's name (`"Temperature"`).
        multiple: the object may have several instances.
        mandatory: every LwM2M client must have it (objects 0, 1 and 3).
        resources: the resources, sorted by id.
    """

    id: int
    name: str
    multiple: bool
    mandatory: bool
    resources: tuple[ResourceModel, ...]
    _by_id: dict[int, ResourceModel] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {r.id: r for r in self.resources})

    def resource(self, resource_id: int) -> ResourceModel | None:
        """The resource `resource_id`, or None when the table does not list it."""
        return self._by_id.get(resource_id)


def object_model(object_id: int) -> ObjectModel | None:
    """The definition of object `object_id`, or None when the table does not have it."""
    return _MODELS.get(object_id)


def resource_model(object_id: int, resource_id: int) -> ResourceModel | None:
    """The definition of resource `resource_id` of object `object_id`, or None."""
    model = _MODELS.get(object_id)
    return None if model is None else model.resource(resource_id)


def object_ids() -> tuple[int, ...]:
    """Every object id the table has, ascending."""
    return _IDS


# -- the table -------------------------------------------------------------------------------


def _r(
    rid: int,
    name: str,
    operations: Operations,
    type_: DataType,
    units: str = "",
    *,
    multiple: bool = False,
    mandatory: bool = False,
) -> ResourceModel:
    return ResourceModel(rid, name, operations, type_, units, multiple, mandatory)


def _m(
    rid: int, name: str, operations: Operations, type_: DataType, units: str = ""
) -> ResourceModel:
    return ResourceModel(rid, name, operations, type_, units, False, True)


def _object(
    oid: int, name: str, resources: tuple[ResourceModel, ...], *, multiple: bool = True,
    mandatory: bool = False,
) -> ObjectModel:  # fmt: skip
    return ObjectModel(oid, name, multiple, mandatory, tuple(sorted(resources, key=lambda r: r.id)))


# IPSO's shared resources (the registry's reusable resources 5500-5999)
_MIN_MEASURED = _r(5601, "Min Measured Value", "R", "Float")
_MAX_MEASURED = _r(5602, "Max Measured Value", "R", "Float")
_MIN_RANGE = _r(5603, "Min Range Value", "R", "Float")
_MAX_RANGE = _r(5604, "Max Range Value", "R", "Float")
_RESET_MIN_MAX = _r(5605, "Reset Min and Max Measured Values", "E", "")
_SENSOR_UNITS = _r(5701, "Sensor Units", "R", "String")
_APPLICATION_TYPE = _r(5750, "Application Type", "RW", "String")
_SENSOR_TYPE = _r(5751, "Sensor Type", "R", "String")
_CURRENT_CALIBRATION = _r(5821, "Current Calibration", "RW", "Float")
_DIGITAL_INPUT_STATE = _m(5500, "Digital Input State", "R", "Boolean")
_DIGITAL_INPUT_COUNTER = _r(5501, "Digital Input Counter", "R", "Integer")
_ON_OFF = _m(5850, "On/Off", "RW", "Boolean")
_DIMMER = _r(5851, "Dimmer", "RW", "Integer", "%")
_ON_TIME = _r(5852, "On time", "RW", "Integer", "s")
_CUMULATIVE_ACTIVE_POWER = _r(5805, "Cumulative active power", "R", "Float", "Wh")
_POWER_FACTOR = _r(5820, "Power factor", "R", "Float")
_COLOUR = _r(5706, "Colour", "RW", "String")
_X_VALUE = _m(5702, "X Value", "R", "Float")
_Y_VALUE = _r(5703, "Y Value", "R", "Float")
_Z_VALUE = _r(5704, "Z Value", "R", "Float")
_COMPASS_DIRECTION = _r(5705, "Compass Direction", "R", "Float", "deg")


def _sensor(units: str) -> tuple[ResourceModel, ...]:
    """An IPSO 1.0 measuring sensor (Illuminance, Temperature, ...): its value and range."""
    return (
        _m(5700, "Sensor Value", "R", "Float", units),
        _SENSOR_UNITS, _MIN_MEASURED, _MAX_MEASURED, _MIN_RANGE, _MAX_RANGE, _RESET_MIN_MAX,
    )  # fmt: skip


_TABLE: tuple[ObjectModel, ...] = (
    _object(0, "LwM2M Security", (
        _m(0, "LWM2M Server URI", "", "String"),
        _m(1, "Bootstrap-Server", "", "Boolean"),
        _m(2, "Security Mode", "", "Integer"),
        _m(3, "Public Key or Identity", "", "Opaque"),
        _m(4, "Server Public Key", "", "Opaque"),
        _m(5, "Secret Key", "", "Opaque"),
        _r(6, "SMS Security Mode", "", "Integer"),
        _r(7, "SMS Binding Key Parameters", "", "Opaque"),
        _r(8, "SMS Binding Secret Key(s)", "", "Opaque"),
        _r(9, "LwM2M Server SMS Number", "", "String"),
        _r(10, "Short Server ID", "", "Integer"),
        _r(11, "Client Hold Off Time", "", "Integer", "s"),
        _r(12, "Bootstrap-Server Account Timeout", "", "Integer", "s"),
        _r(13, "Matching Type", "", "Integer"),
        _r(14, "SNI", "", "String"),
        _r(15, "Certificate Usage", "", "Integer"),
        _r(16, "DTLS/TLS Ciphersuite", "", "Integer", multiple=True),
    ), mandatory=True),
    _object(1, "LwM2M Server", (
        _m(0, "Short Server ID", "R", "Integer"),
        _m(1, "Lifetime", "RW", "Integer", "s"),
        _r(2, "Default Minimum Period", "RW", "Integer", "s"),
        _r(3, "Default Maximum Period", "RW", "Integer", "s"),
        _r(4, "Disable", "E", ""),
        _r(5, "Disable Timeout", "RW", "Integer", "s"),
        _m(6, "Notification Storing When Disabled or Offline", "RW", "Boolean"),
        _m(7, "Binding", "RW", "String"),
        _m(8, "Registration Update Trigger", "E", ""),
        _r(9, "Bootstrap-Request Trigger", "E", ""),
        _r(10, "APN Link", "RW", "Objlnk"),
        _r(11, "TLS-DTLS Alert Code", "R", "Integer"),
        _r(12, "Last Bootstrapped", "R", "Time"),
        _r(22, "Preferred Transport", "RW", "String"),
        _r(23, "Mute Send", "RW", "Boolean"),
    ), mandatory=True),
    _object(2, "LwM2M Access Control", (
        _m(0, "Object ID", "R", "Integer"),
        _m(1, "Object Instance ID", "R", "Integer"),
        _r(2, "ACL", "RW", "Integer", multiple=True),
        _m(3, "Access Control Owner", "RW", "Integer"),
    )),
    _object(3, "Device", (
        _r(0, "Manufacturer", "R", "String"),
        _r(1, "Model Number", "R", "String"),
        _r(2, "Serial Number", "R", "String"),
        _r(3, "Firmware Version", "R", "String"),
        _m(4, "Reboot", "E", ""),
        _r(5, "Factory Reset", "E", ""),
        _r(6, "Available Power Sources", "R", "Integer", multiple=True),
        _r(7, "Power Source Voltage", "R", "Integer", "mV", multiple=True),
        _r(8, "Power Source Current", "R", "Integer", "mA", multiple=True),
        _r(9, "Battery Level", "R", "Integer", "%"),
        _r(10, "Memory Free", "R", "Integer", "KB"),
        _r(11, "Error Code", "R", "Integer", multiple=True, mandatory=True),
        _r(12, "Reset Error Code", "E", ""),
        _r(13, "Current Time", "RW", "Time"),
        _r(14, "UTC Offset", "RW", "String"),
        _r(15, "Timezone", "RW", "String"),
        _m(16, "Supported Binding and Modes", "R", "String"),
        _r(17, "Device Type", "R", "String"),
        _r(18, "Hardware Version", "R", "String"),
        _r(19, "Software Version", "R", "String"),
        _r(20, "Battery Status", "R", "Integer"),
        _r(21, "Memory Total", "R", "Integer", "KB"),
        _r(22, "ExtDevInfo", "R", "Objlnk", multiple=True),
    ), multiple=False, mandatory=True),
    _object(4, "Connectivity Monitoring", (
        _m(0, "Network Bearer", "R", "Integer"),
        _r(1, "Available Network Bearer", "R", "Integer", multiple=True, mandatory=True),
        _m(2, "Radio Signal Strength", "R", "Integer", "dBm"),
        _r(3, "Link Quality", "R", "Integer"),
        _r(4, "IP Addresses", "R", "String", multiple=True, mandatory=True),
        _r(5, "Router IP Addresses", "R", "String", multiple=True),
        _r(6, "Link Utilization", "R", "Integer", "%"),
        _r(7, "APN", "R", "String", multiple=True),
        _r(8, "Cell ID", "R", "Integer"),
        _r(9, "SMNC", "R", "Integer"),
        _r(10, "SMCC", "R", "Integer"),
    ), multiple=False),
    _object(5, "Firmware Update", (
        _m(0, "Package", "W", "Opaque"),
        _m(1, "Package URI", "RW", "String"),
        _m(2, "Update", "E", ""),
        _m(3, "State", "R", "Integer"),
        _m(5, "Update Result", "R", "Integer"),
        _r(6, "PkgName", "R", "String"),
        _r(7, "PkgVersion", "R", "String"),
        _r(8, "Firmware Update Protocol Support", "R", "Integer", multiple=True),
        _m(9, "Firmware Update Delivery Method", "R", "Integer"),
    ), multiple=False),
    _object(6, "Location", (
        _m(0, "Latitude", "R", "Float"),
        _m(1, "Longitude", "R", "Float"),
        _r(2, "Altitude", "R", "Float", "m"),
        _r(3, "Radius", "R", "Float", "m"),
        _r(4, "Velocity", "R", "Opaque"),
        _m(5, "Timestamp", "R", "Time"),
        _r(6, "Speed", "R", "Float", "m/s"),
    ), multiple=False),
    _object(7, "Connectivity Statistics", (
        _r(0, "SMS Tx Counter", "R", "Integer"),
        _r(1, "SMS Rx Counter", "R", "Integer"),
        _r(2, "Tx Data", "R", "Integer", "KB"),
        _r(3, "Rx Data", "R", "Integer", "KB"),
        _r(4, "Max Message Size", "R", "Integer", "B"),
        _r(5, "Average Message Size", "R", "Integer", "B"),
        _m(6, "Start", "E", ""),
        _m(7, "Stop", "E", ""),
        _r(8, "Collection Period", "RW", "Integer", "s"),
    ), multiple=False),
    _object(3200, "Digital Input", (
        _DIGITAL_INPUT_STATE,
        _DIGITAL_INPUT_COUNTER,
        _r(5502, "Digital Input Polarity", "RW", "Boolean"),
        _r(5503, "Digital Input Debounce", "RW", "Integer", "ms"),
        _r(5504, "Digital Input Edge Selection", "RW", "Integer"),
        _r(5505, "Digital Input Counter Reset", "E", ""),
        _APPLICATION_TYPE,
        _SENSOR_TYPE,
    )),
    _object(3201, "Digital Output", (
        _m(5550, "Digital Output State", "RW", "Boolean"),
        _r(5551, "Digital Output Polarity", "RW", "Boolean"),
        _APPLICATION_TYPE,
    )),
    _object(3202, "Analog Input", (
        _m(5600, "Analog Input Current Value", "R", "Float"),
        _MIN_MEASURED, _MAX_MEASURED, _MIN_RANGE, _MAX_RANGE, _RESET_MIN_MAX,
        _APPLICATION_TYPE, _SENSOR_TYPE,
    )),
    _object(3203, "Analog Output", (
        _m(5650, "Analog Output Current Value", "RW", "Float"),
        _MIN_RANGE, _MAX_RANGE, _APPLICATION_TYPE,
    )),
    _object(3300, "Generic Sensor", (
        *_sensor(""), _APPLICATION_TYPE, _SENSOR_TYPE,
    )),
    _object(3301, "Illuminance", _sensor("lx")),
    _object(3302, "Presence", (
        _DIGITAL_INPUT_STATE,
        _DIGITAL_INPUT_COUNTER,
        _r(5505, "Digital Input Counter Reset", "E", ""),
        _SENSOR_TYPE,
        _r(5903, "Busy to Clear delay", "RW", "Integer", "ms"),
        _r(5904, "Clear to Busy delay", "RW", "Integer", "ms"),
    )),
    _object(3303, "Temperature", _sensor("Cel")),
    _object(3304, "Humidity", _sensor("%RH")),
    _object(3306, "Actuation", (_ON_OFF, _DIMMER, _ON_TIME, _APPLICATION_TYPE)),
    _object(3308, "Set Point", (
        _m(5900, "Set Point Value", "RW", "Float"), _SENSOR_UNITS, _COLOUR, _APPLICATION_TYPE,
    )),
    _object(3311, "Light Control", (
        _ON_OFF, _DIMMER, _ON_TIME, _CUMULATIVE_ACTIVE_POWER, _POWER_FACTOR, _COLOUR,
        _SENSOR_UNITS,
    )),
    _object(3312, "Power Control", (
        _ON_OFF, _DIMMER, _ON_TIME, _CUMULATIVE_ACTIVE_POWER, _POWER_FACTOR,
    )),
    _object(3313, "Accelerometer", (
        _X_VALUE, _Y_VALUE, _Z_VALUE, _SENSOR_UNITS, _MIN_RANGE, _MAX_RANGE,
    )),
    _object(3314, "Magnetometer", (
        _X_VALUE, _Y_VALUE, _Z_VALUE, _SENSOR_UNITS, _COMPASS_DIRECTION,
    )),
    _object(3315, "Barometer", _sensor("")),
    _object(3316, "Voltage", (
        *_sensor("V"), _CURRENT_CALIBRATION, _APPLICATION_TYPE,
    )),
    _object(3317, "Current", (
        *_sensor("A"), _CURRENT_CALIBRATION, _APPLICATION_TYPE,
    )),
    _object(3323, "Pressure", (
        *_sensor(""), _CURRENT_CALIBRATION, _APPLICATION_TYPE,
    )),
    _object(3336, "Location", (
        _m(5514, "Latitude", "R", "String"),
        _m(5515, "Longitude", "R", "String"),
        _r(5516, "Uncertainty", "R", "String"),
        _COMPASS_DIRECTION,
        _r(5517, "Velocity", "R", "Opaque"),
        _r(5518, "Timestamp", "R", "Time"),
        _APPLICATION_TYPE,
    )),
    _object(3341, "Addressable Text Display", (
        _m(5527, "Text", "RW", "String"),
        _r(5528, "X Coordinate", "RW", "Integer"),
        _r(5529, "Y Coordinate", "RW", "Integer"),
        _r(5545, "Max X Coordinate", "R", "Integer"),
        _r(5546, "Max Y Coordinate", "R", "Integer"),
        _r(5530, "Clear Display", "E", ""),
        _r(5531, "Contrast", "RW", "Float", "%"),
        _APPLICATION_TYPE,
    )),
    _object(3342, "On/Off switch", (
        _DIGITAL_INPUT_STATE,
        _DIGITAL_INPUT_COUNTER,
        _ON_TIME,
        _r(5854, "Off Time", "RW", "Integer", "s"),
        _APPLICATION_TYPE,
    )),
    _object(3347, "Push button", (_DIGITAL_INPUT_STATE, _DIGITAL_INPUT_COUNTER, _APPLICATION_TYPE)),
    _object(3348, "Multi-state Selector", (
        _m(5547, "Multi-state Input", "R", "Integer"), _APPLICATION_TYPE,
    )),
)  # fmt: skip

_MODELS: dict[int, ObjectModel] = {m.id: m for m in _TABLE}
_IDS: tuple[int, ...] = tuple(sorted(_MODELS))
