"""LwM2M content formats: one registry over every codec the server speaks.

Owns the mapping from CoAP Content-Format numbers to codecs. Every codec turns a payload into a
flat list of `ResourceValue`s with absolute paths and back; `base` is the request path, which
the formats that do not spell paths (text, opaque, CBOR, TLV) need. Never does I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.coap.numbers import ContentFormat
from dm_actor.lwm2m.content import cbor, senml, text, tlv
from dm_actor.lwm2m.content.tlv import tlv_bool, tlv_float, tlv_int, tlv_objlnk, tlv_str
from dm_actor.lwm2m.content.values import (
    ContentDecodeError,
    ContentEncodeError,
    ObjLink,
    ResourceValue,
    UnsupportedContentFormat,
    Value,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    Decoder = Callable[[bytes, str | None], list[ResourceValue]]
    Encoder = Callable[[list[ResourceValue], str | None], bytes]

__all__ = [
    "CODECS",
    "ContentDecodeError",
    "ContentEncodeError",
    "ObjLink",
    "ResourceValue",
    "UnsupportedContentFormat",
    "Value",
    "decode",
    "encode",
    "tlv_bool",
    "tlv_float",
    "tlv_int",
    "tlv_objlnk",
    "tlv_str",
]

CODECS: dict[int, tuple[Decoder, Encoder]] = {
    ContentFormat.TEXT: (text.decode_text, text.encode_text),
    ContentFormat.OCTET_STREAM: (text.decode_opaque, text.encode_opaque),
    ContentFormat.CBOR: (cbor.decode_cbor, cbor.encode_cbor),
    ContentFormat.SENML_JSON: (senml.decode_senml_json, senml.encode_senml_json),
    ContentFormat.SENML_CBOR: (senml.decode_senml_cbor, senml.encode_senml_cbor),
    ContentFormat.LWM2M_TLV: (tlv.decode, tlv.encode),
    ContentFormat.LWM2M_TLV_LEGACY: (tlv.decode, tlv.encode),
    ContentFormat.LWM2M_JSON: (senml.decode_lwm2m_json, senml.encode_lwm2m_json),
    ContentFormat.LWM2M_JSON_LEGACY: (senml.decode_lwm2m_json, senml.encode_lwm2m_json),
    ContentFormat.LWM2M_CBOR: (cbor.decode_lwm2m_cbor, cbor.encode_lwm2m_cbor),
}


def _codec(content_format: int) -> tuple[Decoder, Encoder]:
    try:
        return CODECS[content_format]
    except KeyError:
        raise UnsupportedContentFormat(content_format) from None


def decode(content_format: int, payload: bytes, base: str | None = None) -> list[ResourceValue]:
    """Decode a payload of `content_format`; `base` is the request path (e.g. "/3/0").

    Raises:
        UnsupportedContentFormat: no codec for this number.
        ContentDecodeError: the payload is malformed, or does not fit `base`.
    """
    return _codec(content_format)[0](payload, base)


def encode(content_format: int, values: list[ResourceValue], base: str | None = None) -> bytes:
    """Encode values as `content_format`, relative to `base` where the format needs one.

    Raises:
        UnsupportedContentFormat: no codec for this number.
        ContentEncodeError: the values cannot be represented in that format.
    """
    return _codec(content_format)[1](values, base)
