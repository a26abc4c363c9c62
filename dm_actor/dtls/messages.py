"""DTLS 1.2 handshake messages for the PSK suite: the 12-byte handshake header (RFC 6347
§4.2.2), ClientHello, HelloVerifyRequest, ServerHello, ClientKeyExchange (RFC 4279), the
extensions this machine speaks, alerts, and bounded fragment reassembly (§4.2.3).

Pure: no I/O. Parsers raise `DecodeError`; builders return bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from dm_actor.dtls.errors import DecodeError
from dm_actor.dtls.wire import Reader, vec8, vec16

HANDSHAKE_HEADER_LENGTH = 12
#: TLS_PSK_WITH_AES_128_CCM_8 (RFC 6655 §4): the suite LwM2M 1.1 mandates for PSK.
TLS_PSK_WITH_AES_128_CCM_8 = 0xC0A8
#: TLS_EMPTY_RENEGOTIATION_INFO_SCSV (RFC 5746 §3.3).
EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF
#: The largest handshake message accepted, whole (a ClientHello with many suites/extensions).
MAX_HANDSHAKE_MESSAGE = 4096


class HandshakeType(IntEnum):
    """HandshakeType (RFC 5246 §7.4, RFC 6347 §4.3.2)."""

    HELLO_REQUEST = 0
    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    HELLO_VERIFY_REQUEST = 3
    SERVER_KEY_EXCHANGE = 12
    SERVER_HELLO_DONE = 14
    CLIENT_KEY_EXCHANGE = 16
    FINISHED = 20


class ExtensionType(IntEnum):
    """The extensions this machine reads or writes."""

    EXTENDED_MASTER_SECRET = 23  # RFC 7627
    CONNECTION_ID = 54  # RFC 9146
    RENEGOTIATION_INFO = 0xFF01  # RFC 5746


class AlertLevel(IntEnum):
    WARNING = 1
    FATAL = 2


class AlertDescription(IntEnum):
    """The alerts this machine sends or acts on (RFC 5246 §7.2, RFC 4279 §2)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    HANDSHAKE_FAILURE = 40
    ILLEGAL_PARAMETER = 47
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INTERNAL_ERROR = 80
    NO_RENEGOTIATION = 100
    UNKNOWN_PSK_IDENTITY = 115


def alert(level: int, description: int) -> bytes:
    return bytes((level, description))


@dataclass(frozen=True, slots=True)
class Fragment:
    """One handshake fragment (RFC 6347 §4.2.2)."""

    msg_type: int
    length: int
    message_seq: int
    offset: int
    body: bytes


def split_fragments(payload: bytes) -> list[Fragment]:
    """The handshake fragments of one record's plaintext (a record may carry several)."""
    reader = Reader(payload)
    out: list[Fragment] = []
    while reader.remaining:
        msg_type = reader.u8()
        length = reader.u24()
        message_seq = reader.u16()
        offset = reader.u24()
        frag_length = reader.u24()
        if offset + frag_length > length:
            raise DecodeError("fragment beyond its message")
        out.append(Fragment(msg_type, length, message_seq, offset, reader.take(frag_length)))
    return out


def handshake_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """A whole, unfragmented handshake message: what is sent and what the transcript hashes."""
    n = len(body).to_bytes(3, "big")
    return bytes((msg_type,)) + n + message_seq.to_bytes(2, "big") + b"\x00\x00\x00" + n + body


class Reassembly:
    """The fragments of one handshake message, put back together (bounded by its length).

    Overlapping and duplicated fragments are fine; a fragment that disagrees on type or length
    raises `DecodeError`.
    """

    __slots__ = ("buffer", "filled", "length", "message_seq", "missing", "msg_type")

    def __init__(self, first: Fragment) -> None:
        if first.length > MAX_HANDSHAKE_MESSAGE:
            raise DecodeError(f"handshake message of {first.length} bytes")
        self.msg_type = first.msg_type
        self.length = first.length
        self.message_seq = first.message_seq
        self.buffer = bytearray(first.length)
        self.filled = bytearray(first.length)
        self.missing = first.length

    def add(self, fragment: Fragment) -> bytes | None:
        """Add one fragment; the whole body once every byte has arrived."""
        if fragment.msg_type != self.msg_type or fragment.length != self.length:
            raise DecodeError("fragment disagrees with its message")
        start, stop = fragment.offset, fragment.offset + len(fragment.body)
        self.missing -= stop - start - self.filled[start:stop].count(1)
        self.buffer[start:stop] = fragment.body
        self.filled[start:stop] = b"\x01" * (stop - start)
        return bytes(self.buffer) if self.missing == 0 else None


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A parsed ClientHello (RFC 6347 §4.2.1: with the cookie field)."""

    version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: bytes
    extensions: dict[int, bytes]
    #: The bytes the cookie covers: everything but the cookie itself.
    cookie_input: bytes


def parse_extensions(reader: Reader) -> dict[int, bytes]:
    if not reader.remaining:
        return {}
    block = Reader(reader.vec16())
    reader.expect_end()
    out: dict[int, bytes] = {}
    while block.remaining:
        ext_type = block.u16()
        data = block.vec16()
        if ext_type in out:
            raise DecodeError(f"extension {ext_type} twice")
        out[ext_type] = data
    return out


def encode_extensions(extensions: list[tuple[int, bytes]]) -> bytes:
    if not extensions:
        return b""
    return vec16(b"".join(t.to_bytes(2, "big") + vec16(d) for t, d in extensions))


def parse_client_hello(body: bytes) -> ClientHello:
    reader = Reader(body)
    version = reader.u16()
    random = reader.take(32)
    session_id = reader.vec8()
    if len(session_id) > 32:
        raise DecodeError("session_id longer than 32")
    cookie_at = reader.pos
    cookie = reader.vec8()
    after_cookie = reader.pos
    suites_raw = reader.vec16()
    if len(suites_raw) % 2 or not suites_raw:
        raise DecodeError("cipher_suites")
    compression = reader.vec8()
    if not compression:
        raise DecodeError("compression_methods empty")
    extensions = parse_extensions(reader)
    suites = tuple(
        int.from_bytes(suites_raw[i : i + 2], "big") for i in range(0, len(suites_raw), 2)
    )
    return ClientHello(
        version=version,
        random=random,
        session_id=session_id,
        cookie=cookie,
        cipher_suites=suites,
        compression_methods=compression,
        extensions=extensions,
        cookie_input=body[:cookie_at] + body[after_cookie:],
    )


def client_hello(
    random: bytes, cookie: bytes, extensions: list[tuple[int, bytes]], version: int
) -> bytes:
    """A ClientHello offering TLS_PSK_WITH_AES_128_CCM_8 (and the renegotiation SCSV)."""
    suites = TLS_PSK_WITH_AES_128_CCM_8.to_bytes(2, "big") + EMPTY_RENEGOTIATION_INFO_SCSV.to_bytes(
        2, "big"
    )
    return (
        version.to_bytes(2, "big")
        + random
        + vec8(b"")
        + vec8(cookie)
        + vec16(suites)
        + vec8(b"\x00")
        + encode_extensions(extensions)
    )


def hello_verify_request(cookie: bytes, version: int) -> bytes:
    return version.to_bytes(2, "big") + vec8(cookie)


def parse_hello_verify_request(body: bytes) -> bytes:
    reader = Reader(body)
    reader.u16()
    cookie = reader.vec8()
    reader.expect_end()
    return cookie


@dataclass(frozen=True, slots=True)
class ServerHello:
    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: dict[int, bytes]


def server_hello(
    version: int, random: bytes, session_id: bytes, extensions: list[tuple[int, bytes]]
) -> bytes:
    return (
        version.to_bytes(2, "big")
        + random
        + vec8(session_id)
        + TLS_PSK_WITH_AES_128_CCM_8.to_bytes(2, "big")
        + b"\x00"
        + encode_extensions(extensions)
    )


def parse_server_hello(body: bytes) -> ServerHello:
    reader = Reader(body)
    version = reader.u16()
    random = reader.take(32)
    session_id = reader.vec8()
    suite = reader.u16()
    compression = reader.u8()
    return ServerHello(version, random, session_id, suite, compression, parse_extensions(reader))


def parse_client_key_exchange(body: bytes) -> bytes:
    """The psk_identity of a plain-PSK ClientKeyExchange (RFC 4279 §2)."""
    reader = Reader(body)
    identity = reader.vec16()
    reader.expect_end()
    return identity
