"""The pure credentials index and the identity rules (dm_actor.credentials)."""

from __future__ import annotations

import pytest

from dm_actor.coap.numbers import Code
from dm_actor.credentials import (
    NEEDS_DTLS,
    Credential,
    CredentialError,
    Credentials,
    IdentityTaken,
    admit,
    validate,
)

KEY = bytes(range(16))


def creds() -> Credentials:
    return Credentials(
        [Credential("dev-a", "id-a", KEY, 1.0), Credential("dev-b", "id-b", KEY, 2.0)]
    )


def test_lookups_both_ways_and_the_psk_callable() -> None:
    c = creds()
    assert len(c) == 2 and "dev-a" in c and "dev-c" not in c
    assert c.endpoint_of("id-a") == "dev-a" and c.endpoint_of("id-x") is None
    assert c.of_endpoint("dev-b") == Credential("dev-b", "id-b", KEY, 2.0)
    assert c.psk(b"id-a") == KEY
    assert c.psk(b"id-x") is None
    assert c.psk(b"\xff\xfe") is None  # not UTF-8: unknown, never an exception
    assert [r.endpoint for r in c.records()] == ["dev-a", "dev-b"]


def test_an_identity_belongs_to_one_endpoint() -> None:
    c = creds()
    with pytest.raises(IdentityTaken) as taken:
        c.put(Credential("dev-c", "id-a", KEY, 3.0))
    assert taken.value.holder == "dev-a"
    assert c.endpoint_of("id-a") == "dev-a" and "dev-c" not in c  # nothing changed
    # the same endpoint may put its identity again, or take a new one (the old one is free)
    old = c.put(Credential("dev-a", "id-a2", KEY, 4.0))
    assert old is not None and old.identity == "id-a"
    assert c.endpoint_of("id-a") is None and c.endpoint_of("id-a2") == "dev-a"
    c.put(Credential("dev-c", "id-a", KEY, 5.0))  # free again
    assert c.remove("dev-c") is not None and c.remove("dev-c") is None
    assert c.psk(b"id-a") is None


def test_the_key_is_never_in_a_repr() -> None:
    record = Credential("dev-a", "id-a", bytes.fromhex("cafebabe" * 4), 1.0)
    assert "cafebabe" not in repr(record) and "\\xca" not in repr(record)
    assert "16 bytes" in repr(record)


def test_validation() -> None:
    assert validate("dev", "id", "00" * 16) == ("id", bytes(16))
    assert validate("dev", "é" * 64, "AB" * 64) == ("é" * 64, b"\xab" * 64)
    bad = [
        ("", "id", "00" * 16, "endpoint"),
        ("dev", "", "00" * 16, "psk_identity"),
        ("dev", "x" * 129, "00" * 16, "psk_identity"),
        ("dev", "é" * 65, "00" * 16, "psk_identity"),  # 130 bytes
        ("dev", 5, "00" * 16, "psk_identity"),
        ("dev", "\ud800", "00" * 16, "psk_identity"),  # a lone surrogate: not UTF-8
        ("dev", "id", "00" * 15, "psk_key"),
        ("dev", "id", "00" * 65, "psk_key"),
        ("dev", "id", "zz" * 16, "psk_key"),
        ("dev", "id", "0" * 33, "psk_key"),
        ("dev", "id", None, "psk_key"),
    ]
    for endpoint, identity, key, field in bad:
        with pytest.raises(CredentialError) as refused:
            validate(endpoint, identity, key)
        assert refused.value.field == field, (endpoint, identity, key)


def test_the_identity_rules() -> None:
    c = creds()
    # plain CoAP: accepted only for an endpoint without credentials
    assert admit(c, "dev-c", None) is None
    assert admit(c, "dev-a", None) == (Code.FORBIDDEN, NEEDS_DTLS)
    # DTLS: the session's identity must be the endpoint's
    assert admit(c, "dev-a", "id-a") is None
    refusal = admit(c, "dev-a", "id-b")
    assert refusal is not None and refusal.code == Code.FORBIDDEN
    assert "another endpoint" in refusal.reason
    refusal = admit(c, "dev-c", "id-b")  # an endpoint without credentials, another's identity
    assert refusal is not None and refusal.code == Code.FORBIDDEN
    refusal = admit(c, "dev-a", "id-gone")  # removed while its session lived
    assert refusal is not None and refusal.code == Code.FORBIDDEN
