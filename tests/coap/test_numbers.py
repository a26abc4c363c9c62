"""Content-Format names and numbers."""

from __future__ import annotations

import pytest

from dm_actor.coap.numbers import ContentFormat, content_format_for, media_type


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("application/vnd.oma.lwm2m+tlv", 11542),  # not the pre-standard 1542 (Anjay: 4.06)
        ("application/vnd.oma.lwm2m+json", 11543),  # not 1543
        ("application/vnd.oma.lwm2m+cbor", 11544),
        ("application/senml+json", 110),
        ("text/plain", 0),
        ("Text/Plain; charset=utf-8", 0),
        ("1542", 1542),  # by number, anything goes
    ],
)
def test_names_map_to_the_registered_numbers(name: str, number: int) -> None:
    assert content_format_for(name) == number


def test_the_legacy_numbers_are_still_read() -> None:
    assert media_type(ContentFormat.LWM2M_TLV_LEGACY) == "application/vnd.oma.lwm2m+tlv"
    assert media_type(ContentFormat.LWM2M_JSON_LEGACY) == "application/vnd.oma.lwm2m+json"
