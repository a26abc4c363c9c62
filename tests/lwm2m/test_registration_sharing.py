"""Registrations of a fleet share their immutable parts: devices that register the same object
list get one `RegisteredObjects` value, and equal lifetimes one int (memory per idle device)."""

from __future__ import annotations

from dm_actor.coap.message import Message, path_options, query_options, sort_options
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.lwm2m.registration import RegisterRequest, RegistrationError, parse_register

_LINK_FORMAT = (OptionNumber.CONTENT_FORMAT.value, bytes([ContentFormat.LINK_FORMAT.value]))


def register(query: str, payload: bytes) -> RegisterRequest | RegistrationError:
    # fresh bytes and str objects every time, as datagrams off a socket would be
    options = sort_options((*path_options("rd"), *query_options(query), _LINK_FORMAT))
    msg = Message(MessageType.CON, Code.POST, 1, b"t", options, bytes(bytearray(payload)))
    return parse_register(msg)


def test_same_object_list_is_one_value() -> None:
    a = register("ep=a&lt=86400", b"</1/0>,</3/0>,</3303/0>")
    b = register("ep=b&lt=86400", b"</1/0>,</3/0>,</3303/0>")
    other = register("ep=c&lt=86400", b"</1/0>,</3/0>")
    assert isinstance(a, RegisterRequest) and isinstance(b, RegisterRequest)
    assert isinstance(other, RegisterRequest)
    assert a.objects is b.objects
    assert a.lifetime is b.lifetime
    assert other.objects != a.objects
    assert [str(p) for p in other.objects.paths()] == ["/1/0", "/3/0"]


def test_invalid_requests_are_refused_every_time() -> None:
    for _ in range(2):
        assert register("ep=a&lt=0", b"</1/0>") == RegistrationError(
            Code.BAD_REQUEST, "lifetime lt='0' is not 1..2^32-1"
        )
        bad_links = register("ep=a", b"</1/0")
        assert isinstance(bad_links, RegistrationError)
        assert bad_links.code == Code.BAD_REQUEST
