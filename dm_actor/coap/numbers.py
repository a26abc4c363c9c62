"""CoAP numbers: message types, codes, option numbers, content formats, transmission parameters.

Sources: RFC 7252 sections 3, 4.8, 5.10, 12; RFC 7641; RFC 7959; RFC 8323 section 5.
Wire values that this module does not name stay plain ints everywhere else, so an unknown
code or option never raises here. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MessageType(enum.IntEnum):
    """RFC 7252 section 3: the 2-bit T field."""

    CON = 0
    NON = 1
    ACK = 2
    RST = 3


def code(cls: int, detail: int) -> int:
    """The 8-bit code `c.dd`."""
    return (cls << 5) | detail


def code_class(c: int) -> int:
    return c >> 5


def code_str(c: int) -> str:
    """`69` -> `"2.05"`."""
    return f"{c >> 5}.{c & 0x1F:02d}"


class Code(enum.IntEnum):
    """Request, response and signalling codes (RFC 7252 12.1, RFC 7959, RFC 8132, RFC 8323)."""

    EMPTY = 0
    # requests (class 0)
    GET = 1
    POST = 2
    PUT = 3
    DELETE = 4
    FETCH = 5
    PATCH = 6
    IPATCH = 7
    # 2.xx success
    CREATED = code(2, 1)
    DELETED = code(2, 2)
    VALID = code(2, 3)
    CHANGED = code(2, 4)
    CONTENT = code(2, 5)
    CONTINUE = code(2, 31)
    # 4.xx client error
    BAD_REQUEST = code(4, 0)
    UNAUTHORIZED = code(4, 1)
    BAD_OPTION = code(4, 2)
    FORBIDDEN = code(4, 3)
    NOT_FOUND = code(4, 4)
    METHOD_NOT_ALLOWED = code(4, 5)
    NOT_ACCEPTABLE = code(4, 6)
    REQUEST_ENTITY_INCOMPLETE = code(4, 8)
    CONFLICT = code(4, 9)
    PRECONDITION_FAILED = code(4, 12)
    REQUEST_ENTITY_TOO_LARGE = code(4, 13)
    UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
    UNPROCESSABLE_ENTITY = code(4, 22)
    TOO_MANY_REQUESTS = code(4, 29)
    # 5.xx server error
    INTERNAL_SERVER_ERROR = code(5, 0)
    NOT_IMPLEMENTED = code(5, 1)
    BAD_GATEWAY = code(5, 2)
    SERVICE_UNAVAILABLE = code(5, 3)
    GATEWAY_TIMEOUT = code(5, 4)
    PROXYING_NOT_SUPPORTED = code(5, 5)
    # 7.xx signalling (RFC 8323 section 5)
    CSM = code(7, 1)
    PING = code(7, 2)
    PONG = code(7, 3)
    RELEASE = code(7, 4)
    ABORT = code(7, 5)


def is_request(c: int) -> bool:
    return 1 <= c <= 31


def is_response(c: int) -> bool:
    return 2 <= (c >> 5) <= 5


def is_signalling(c: int) -> bool:
    return (c >> 5) == 7


def code_reason(c: int) -> str:
    """`Code.NOT_FOUND` -> `"NOT_FOUND"`; an unnamed code -> `"CODE_4_07"`."""
    try:
        return Code(c).name
    except ValueError:
        return f"CODE_{c >> 5}_{c & 0x1F:02d}"


class OptionNumber(enum.IntEnum):
    """RFC 7252 5.10, RFC 7641, RFC 7959, RFC 8613 (numbers only), RFC 7967."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    ACCEPT = 17
    LOCATION_QUERY = 20
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    NO_RESPONSE = 258


def is_critical(number: int) -> bool:
    """RFC 7252 5.4.6: odd option numbers are critical."""
    return bool(number & 1)


def is_unsafe(number: int) -> bool:
    return bool(number & 2)


def is_no_cache_key(number: int) -> bool:
    return (number & 0x1E) == 0x1C


class SignallingOption(enum.IntEnum):
    """RFC 8323 section 5: option numbers that are only meaningful inside signalling messages."""

    MAX_MESSAGE_SIZE = 2  # in CSM
    BLOCK_WISE_TRANSFER = 4  # in CSM
    EXTENDED_TOKEN_LENGTH = 6  # in CSM (RFC 8974)
    CUSTODY = 2  # in Ping/Pong
    ALTERNATIVE_ADDRESS = 2  # in Release
    HOLD_OFF = 4  # in Release
    BAD_CSM_OPTION = 2  # in Abort


class ContentFormat(enum.IntEnum):
    """CoAP Content-Formats registry entries that LwM2M uses."""

    TEXT = 0
    LINK_FORMAT = 40
    XML = 41
    OCTET_STREAM = 42
    EXI = 47
    JSON = 50
    CBOR = 60
    SENML_JSON = 110
    SENML_CBOR = 112
    LWM2M_TLV_LEGACY = 1542
    LWM2M_JSON_LEGACY = 1543
    LWM2M_TLV = 11542
    LWM2M_JSON = 11543
    LWM2M_CBOR = 11544


MEDIA_TYPES: dict[int, str] = {
    ContentFormat.TEXT: "text/plain",
    ContentFormat.LINK_FORMAT: "application/link-format",
    ContentFormat.XML: "application/xml",
    ContentFormat.OCTET_STREAM: "application/octet-stream",
    ContentFormat.EXI: "application/exi",
    ContentFormat.JSON: "application/json",
    ContentFormat.CBOR: "application/cbor",
    ContentFormat.SENML_JSON: "application/senml+json",
    ContentFormat.SENML_CBOR: "application/senml+cbor",
    ContentFormat.LWM2M_TLV_LEGACY: "application/vnd.oma.lwm2m+tlv",
    ContentFormat.LWM2M_JSON_LEGACY: "application/vnd.oma.lwm2m+json",
    ContentFormat.LWM2M_TLV: "application/vnd.oma.lwm2m+tlv",
    ContentFormat.LWM2M_JSON: "application/vnd.oma.lwm2m+json",
    ContentFormat.LWM2M_CBOR: "application/vnd.oma.lwm2m+cbor",
}

# the registered numbers win: TLV and LwM2M JSON by name are 11542 and 11543, the pre-standard
# 1542/1543 are only understood when a device sends them (Anjay answers Accept 1542 with 4.06)
_FORMATS_BY_MEDIA_TYPE: dict[str, int] = {
    media: number
    for number, media in MEDIA_TYPES.items()
    if number not in (ContentFormat.LWM2M_TLV_LEGACY, ContentFormat.LWM2M_JSON_LEGACY)
}
_FORMATS_BY_MEDIA_TYPE["text/plain;charset=utf-8"] = ContentFormat.TEXT


def media_type(content_format: int) -> str:
    """The media type string for a Content-Format number; unknown numbers stay readable."""
    return MEDIA_TYPES.get(content_format, f"application/x-coap-{content_format}")


def content_format_for(media: str) -> int | None:
    """The Content-Format number for a media type string (case- and space-insensitive)."""
    key = media.strip().lower().replace(" ", "")
    if key.isdigit():
        return int(key)
    return _FORMATS_BY_MEDIA_TYPE.get(key)


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 section 4.8, with dm_actor's defaults (see delivery.md rule 3.2).

    Defaults give retransmission timeouts 2, 4, 8, 16, 32, 64 s (no random factor) and give up
    126 s after the first send. The derived times follow section 4.8.2's formulas.
    """

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.0
    max_retransmit: int = 5
    max_latency: float = 100.0
    processing_delay: float | None = None  # None means ack_timeout, as RFC 7252 does
    nstart: int = 1

    def __post_init__(self) -> None:
        if self.ack_timeout <= 0:
            raise ValueError("ack_timeout must be positive")
        if self.ack_random_factor < 1.0:
            raise ValueError("ack_random_factor must be >= 1.0")
        if not 0 <= self.max_retransmit <= 20:
            raise ValueError("max_retransmit must be within 0..20")

    @property
    def max_transmit_span(self) -> float:
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def max_transmit_wait(self) -> float:
        return self.ack_timeout * ((1 << (self.max_retransmit + 1)) - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        delay = self.ack_timeout if self.processing_delay is None else self.processing_delay
        return self.max_transmit_span + 2 * self.max_latency + delay

    @property
    def non_lifetime(self) -> float:
        return self.max_transmit_span + self.max_latency
