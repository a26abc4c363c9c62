"""Conversions between the actors' live values and the store's records.

The actors keep times on the Trio clock (monotonic, virtual in tests); records keep wall-clock
seconds, so that they mean the same after a restart. `offset` is wall minus Trio time.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from operator import attrgetter
from typing import Any

import msgspec

from dm_actor.address import SESSION_HOST
from dm_actor.delivery.queue import Command
from dm_actor.lwm2m.link_format import (
    RegisteredObjects,
    serialise_links,
    shared_registered_objects,
)
from dm_actor.lwm2m.registration import Registration
from dm_actor.store.base import CommandRecord, RegistrationRecord


def _opt(t: float | None, offset: float) -> float | None:
    return None if t is None else t + offset


#: What the store keeps of a `Command`: every field of its `CommandRecord` after the
#: endpoint, in the record's order and under the same names (each declared once, in
#: `Command`); the positions of those that are times.
_COMMAND_FIELDS = CommandRecord.__struct_fields__[1:]
assert CommandRecord.__struct_fields__[0] == "endpoint"
_command_values = attrgetter(*_COMMAND_FIELDS)
_COMMAND_TIMES = ("accepted_at", "expires_at", "last_attempt_at")
_TIME_POSITIONS = tuple(_COMMAND_FIELDS.index(f) for f in _COMMAND_TIMES)


def command_record(endpoint: str, cmd: Command, offset: float) -> CommandRecord:
    # (by position: a record built from keywords costs twice as much, once per attempt)
    values = list(_command_values(cmd))
    for i in _TIME_POSITIONS:
        values[i] = _opt(values[i], offset)
    return CommandRecord(endpoint, *values)


def command_from_record(rec: CommandRecord, offset: float) -> Command:
    values = msgspec.structs.asdict(rec)
    del values["endpoint"]
    for f in _COMMAND_TIMES:
        values[f] = _opt(values[f], -offset)
    # an attempt with a stored exchange: resent as that exchange within its lifetime
    exchanged = rec.mid is not None or rec.token is not None
    return Command(**values, exchange_at=values["last_attempt_at"] if exchanged else None)


@lru_cache(maxsize=256)
def links_text(objects: RegisteredObjects) -> str:
    """The object list as link-format; devices of one kind share it, so it is cached."""
    return serialise_links(objects.links())


#: what the store keeps for a device bound to a DTLS session: not an address (the session
#: does not survive a restart; the device is reached again when it comes back with a new
#: handshake), but the mark that it registered over DTLS (`address_from_text` reads None)
SECURED = '["dtls"]'


def address_text(addr: tuple[Any, ...] | None) -> str | None:
    """A UDP address as the store keeps it (JSON `[host, port, ...]`); None stays None, and
    a DTLS session's address is `SECURED`."""
    if addr is None:
        return None
    if addr[0] == SESSION_HOST:
        return SECURED
    return _encode(addr).decode()


def address_from_text(text: str | None) -> tuple[Any, ...] | None:
    """The address `address_text` wrote; None for none or for a text that is not one."""
    if text is None:
        return None
    try:
        addr = _decode_address(text)
    except msgspec.DecodeError:
        return None
    if len(addr) not in (2, 4) or not isinstance(addr[0], str) or not isinstance(addr[1], int):
        return None
    return tuple(addr)


_encode = msgspec.json.encode
_decode_address = msgspec.json.Decoder(list[str | int]).decode


def registration_record(
    reg: Registration,
    offset: float,
    addr: tuple[Any, ...] | None = None,
    ingress: str | None = None,
) -> RegistrationRecord:
    """The record of `reg`; `addr` is the UDP device's address (None over TCP), `ingress`
    the cluster node its datagrams come in by (None: this node, or no cluster)."""
    return RegistrationRecord(
        endpoint=reg.endpoint,
        reg_id=reg.reg_id,
        lifetime=reg.lifetime,
        lwm2m_version=reg.lwm2m_version,
        binding=reg.binding,
        queue_mode=reg.queue_mode,
        links=links_text(reg.objects),
        registered_at=reg.registered_at + offset,
        updated_at=reg.updated_at + offset,
        endpoint_type=reg.endpoint_type,
        address=address_text(addr),
        ingress=ingress,
    )


def registration_from_record(rec: RegistrationRecord, offset: float) -> Registration:
    return Registration(
        endpoint=rec.endpoint,
        reg_id=rec.reg_id,
        lifetime=rec.lifetime,
        lwm2m_version=rec.lwm2m_version,
        binding=rec.binding,
        queue_mode=rec.queue_mode,
        sms=None,
        objects=shared_registered_objects(rec.links),  # (devices of one kind share it)
        registered_at=rec.registered_at - offset,
        updated_at=rec.updated_at - offset,
        endpoint_type=None if rec.endpoint_type is None else sys.intern(rec.endpoint_type),
    )
