"""Conversions between the actors' live values and the store's records.

The actors keep times on the Trio clock (monotonic, virtual in tests); records keep wall-clock
seconds, so that they mean the same after a restart. `offset` is wall minus Trio time.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any

import msgspec

from dm_actor.delivery.queue import Command
from dm_actor.lwm2m.link_format import (
    RegisteredObjects,
    parse_links,
    registered_objects,
    serialise_links,
)
from dm_actor.lwm2m.registration import Registration
from dm_actor.store.base import CommandRecord, RegistrationRecord


def _opt(t: float | None, offset: float) -> float | None:
    return None if t is None else t + offset


def command_record(endpoint: str, cmd: Command, offset: float) -> CommandRecord:
    return CommandRecord(
        endpoint=endpoint,
        async_id=cmd.async_id,
        method=cmd.method,
        uri=cmd.uri,
        payload=cmd.payload,
        content_format=cmd.content_format,
        accept=cmd.accept,
        accepted_at=cmd.accepted_at + offset,
        expires_at=cmd.expires_at + offset,
        attempts_left=cmd.attempts_left,
        attempts=cmd.attempts,
        last_attempt_at=_opt(cmd.last_attempt_at, offset),
        observe=cmd.observe,
        owner=cmd.owner,
        mid=cmd.mid,
        token=cmd.token,
    )


def command_from_record(rec: CommandRecord, offset: float) -> Command:
    last = _opt(rec.last_attempt_at, -offset)
    return Command(
        rec.async_id, rec.method, rec.uri, rec.payload, rec.content_format, rec.accept,
        rec.accepted_at - offset, rec.expires_at - offset, rec.attempts_left, rec.observe,
        rec.owner, rec.attempts, last, mid=rec.mid, token=rec.token,
        exchange_at=last if rec.mid is not None or rec.token is not None else None,
    )  # fmt: skip


@lru_cache(maxsize=256)
def links_text(objects: RegisteredObjects) -> str:
    """The object list as link-format; devices of one kind share it, so it is cached."""
    return serialise_links(objects.links())


def address_text(addr: tuple[Any, ...] | None) -> str | None:
    """A UDP address as the store keeps it (JSON `[host, port, ...]`); None stays None."""
    return None if addr is None else _encode(addr).decode()


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
    reg: Registration, offset: float, addr: tuple[Any, ...] | None = None
) -> RegistrationRecord:
    """The record of `reg`; `addr` is the UDP device's address (None over TCP)."""
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
        objects=registered_objects(parse_links(rec.links)),
        registered_at=rec.registered_at - offset,
        updated_at=rec.updated_at - offset,
        endpoint_type=None if rec.endpoint_type is None else sys.intern(rec.endpoint_type),
    )
