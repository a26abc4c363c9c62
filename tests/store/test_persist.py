"""The actors' live values through the store and back (`dm_actor.actors.persist`): every field
the record keeps comes back under its own name, times moved by the wall offset both ways."""

from __future__ import annotations

import dataclasses

from dm_actor.actors.persist import (
    command_from_record,
    command_record,
    registration_from_record,
    registration_record,
)
from dm_actor.delivery.queue import Command
from dm_actor.lwm2m.link_format import parse_links, registered_objects
from dm_actor.lwm2m.registration import Registration
from dm_actor.store.base import CommandRecord, RegistrationRecord

from .support import Backend, running

OFFSET = 1_700_000_000.0  # wall minus Trio time


def a_command(**fields: object) -> Command:
    values: dict[str, object] = {
        "async_id": "c-1",
        "method": "POST",
        "uri": "/3/0/4?x=1",
        "payload": b"\x00run",
        "content_format": 42,
        "accept": 11542,
        "accepted_at": 10.0,
        "expires_at": 7210.0,
        "attempts_left": 2,
        "observe": True,
        "owner": "app-1",
        "attempts": 1,
        "last_attempt_at": 12.5,
        "mid": 4711,
        "token": b"\x01\x02",
    }
    values.update(fields)
    return Command(**values)  # type: ignore[arg-type]


def a_registration() -> Registration:
    return Registration(
        endpoint="ep-1",
        reg_id="r-1",
        lifetime=300,
        lwm2m_version="1.1",
        binding="UQ",
        queue_mode=True,
        sms=None,
        objects=registered_objects(parse_links(b"</1/0>,</3/0>")),
        registered_at=5.0,
        updated_at=8.0,
        endpoint_type="Light",
    )


def test_every_stored_field_of_a_command_is_named_once() -> None:
    """The record's fields are the command's (but the endpoint): nothing to keep in step."""
    stored = set(CommandRecord.__struct_fields__) - {"endpoint"}
    assert stored <= {f.name for f in dataclasses.fields(Command)}
    rec = command_record("ep-1", a_command(), OFFSET)
    assert rec.endpoint == "ep-1"
    assert (rec.accepted_at, rec.expires_at, rec.last_attempt_at) == (
        10.0 + OFFSET,
        7210.0 + OFFSET,
        12.5 + OFFSET,
    )
    assert (rec.mid, rec.token, rec.observe, rec.owner) == (4711, b"\x01\x02", True, "app-1")


async def test_a_command_comes_back_from_the_store_as_it_was(backend: Backend) -> None:
    """Both stores, the SQLite one read back from its file: every kept field, bools as
    bools, times on the new process's clock (another offset), the exchange resumable."""
    cmd = a_command()
    fresh = a_command(async_id="c-2", observe=False, attempts=0, last_attempt_at=None,
                      mid=None, token=None)  # fmt: skip
    store = backend.open()
    async with running(store):
        store.put_command(command_record("ep-1", cmd, OFFSET))
        store.put_command(command_record("ep-1", fresh, OFFSET))
        await store.durable()
    snap = backend.reopen(store)
    later = OFFSET - 1000.0  # the new process's Trio clock started 1000 s later
    back = [command_from_record(r, later) for r in snap.commands]
    assert [c.async_id for c in back] == ["c-1", "c-2"]
    again, new = back
    assert [type(c.observe) for c in back] == [bool, bool]  # SQLite keeps integers
    for name in set(CommandRecord.__struct_fields__) - {"endpoint"}:
        if name.endswith("_at"):
            continue
        assert getattr(again, name) == getattr(cmd, name), name
        assert getattr(new, name) == getattr(fresh, name), name
    assert (again.accepted_at, again.expires_at, again.last_attempt_at) == (1010.0, 8210.0, 1012.5)
    assert again.exchange_at == 1012.5  # resent as the same exchange within its lifetime
    assert (new.last_attempt_at, new.exchange_at, new.finished_at) == (None, None, None)


async def test_a_registration_comes_back_from_the_store_as_it_was(backend: Backend) -> None:
    reg = a_registration()
    rec = registration_record(reg, OFFSET, ("127.0.0.1", 5683))
    assert (rec.registered_at, rec.updated_at) == (5.0 + OFFSET, 8.0 + OFFSET)
    assert (rec.links, rec.address) == ("</1/0>,</3/0>", '["127.0.0.1",5683]')
    store = backend.open()
    async with running(store):
        store.put_registration(rec)
        await store.durable()
    [stored] = backend.reopen(store).registrations
    assert type(stored.queue_mode) is bool
    assert stored == rec
    back = registration_from_record(stored, OFFSET)
    assert back == reg
    assert back.endpoint_type is not None
    assert back.endpoint_type == "Light"


def test_a_registration_record_names_only_what_the_registration_has() -> None:
    """Each record field but `links`, `address` and `ingress` (a cluster node's name) is the
    registration's own field."""
    kept = set(RegistrationRecord.__struct_fields__) - {"links", "address", "ingress"}
    assert kept <= {f.name for f in dataclasses.fields(Registration)}
    rec = registration_record(a_registration(), 0.0)  # over TCP: no address
    assert rec.address is None
    assert registration_from_record(rec, 0.0) == a_registration()
