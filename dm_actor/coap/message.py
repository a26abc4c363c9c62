"""The CoAP message value and its RFC 7252 datagram codec.

`Message` is an immutable value holding the wire fields. Option values are kept as raw bytes in
wire order, so `encode(decode(b)) == b` for every well-formed datagram; typed accessors decode
the values a caller asks for. Pure: no I/O, no clock.
"""

from __future__ import annotations

from typing import NamedTuple

from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.numbers import MessageType, OptionNumber, is_critical

Option = tuple[int, bytes]

_URI_PATH = OptionNumber.URI_PATH.value
_URI_QUERY = OptionNumber.URI_QUERY.value
_LOCATION_PATH = OptionNumber.LOCATION_PATH.value
_CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
_ACCEPT = OptionNumber.ACCEPT.value
_OBSERVE = OptionNumber.OBSERVE.value
_MAX_AGE = OptionNumber.MAX_AGE.value

#: Options this codebase understands; an unknown critical option is answered with 4.02.
KNOWN_OPTIONS: frozenset[int] = frozenset(int(o) for o in OptionNumber)

#: Value length limits (RFC 7252 5.10, RFC 7641, RFC 7959) as (min, max); a value outside
#: its range is treated like an unrecognised option (RFC 7252 5.4.3).
OPTION_LENGTHS: dict[int, tuple[int, int]] = {
    OptionNumber.IF_MATCH: (0, 8),
    OptionNumber.URI_HOST: (1, 255),
    OptionNumber.ETAG: (1, 8),
    OptionNumber.IF_NONE_MATCH: (0, 0),
    OptionNumber.OBSERVE: (0, 3),
    OptionNumber.URI_PORT: (0, 2),
    OptionNumber.LOCATION_PATH: (0, 255),
    OptionNumber.URI_PATH: (0, 255),
    OptionNumber.CONTENT_FORMAT: (0, 2),
    OptionNumber.MAX_AGE: (0, 4),
    OptionNumber.URI_QUERY: (0, 255),
    OptionNumber.ACCEPT: (0, 2),
    OptionNumber.LOCATION_QUERY: (0, 255),
    OptionNumber.BLOCK2: (0, 3),
    OptionNumber.BLOCK1: (0, 3),
    OptionNumber.SIZE2: (0, 4),
    OptionNumber.PROXY_URI: (1, 1034),
    OptionNumber.PROXY_SCHEME: (1, 255),
    OptionNumber.SIZE1: (0, 4),
    OptionNumber.NO_RESPONSE: (0, 1),
}


def uint_bytes(value: int) -> bytes:
    """The shortest big-endian encoding of a non-negative integer option value (0 -> b"")."""
    return value.to_bytes((value.bit_length() + 7) >> 3, "big")


def uint_value(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


class Message(NamedTuple):
    """One CoAP message.

    For RFC 8323 (TCP) framing `mtype` and `mid` do not exist on the wire; they are 0 there.
    `options` is a tuple of `(number, raw value)` sorted by number (repeats keep their order).
    """

    mtype: int
    code: int
    mid: int = 0
    token: bytes = b""
    options: tuple[Option, ...] = ()
    payload: bytes = b""

    # -- option access -----------------------------------------------------------------

    def option(self, number: int) -> bytes | None:
        """The first value of an option, or None."""
        for n, v in self.options:
            if n == number:
                return v
            if n > number:
                break
        return None

    def option_values(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    def uint_option(self, number: int) -> int | None:
        raw = self.option(number)
        return None if raw is None else int.from_bytes(raw, "big")

    def _strings(self, number: int) -> tuple[str, ...]:
        try:
            return tuple([v.decode() for n, v in self.options if n == number])
        except UnicodeDecodeError:
            # 4.00 answers only a confirmable request; a confirmable response gets a Reset
            if self.mtype != MessageType.CON:
                reply = Reply.IGNORE
            else:
                reply = Reply.BAD_REQUEST if 1 <= self.code <= 31 else Reply.RESET
            raise DecodeError(
                f"option {number} is not UTF-8",
                reply,
                mtype=self.mtype,
                mid=self.mid,
                token=self.token,
            ) from None

    @property
    def uri_path(self) -> tuple[str, ...]:
        return self._strings(_URI_PATH)

    @property
    def uri_query(self) -> tuple[str, ...]:
        return self._strings(_URI_QUERY)

    @property
    def location_path(self) -> tuple[str, ...]:
        return self._strings(_LOCATION_PATH)

    @property
    def content_format(self) -> int | None:
        return self.uint_option(_CONTENT_FORMAT)

    @property
    def accept(self) -> int | None:
        return self.uint_option(_ACCEPT)

    @property
    def observe(self) -> int | None:
        return self.uint_option(_OBSERVE)

    @property
    def max_age(self) -> int:
        """Max-Age in seconds; 60 when absent (RFC 7252 5.10.5)."""
        value = self.uint_option(_MAX_AGE)
        return 60 if value is None else value

    def with_options(self, *extra: Option) -> Message:
        """A copy with more options, kept in option-number order."""
        return self._replace(options=sort_options(self.options + extra))


def sort_options(options: tuple[Option, ...] | list[Option]) -> tuple[Option, ...]:
    """Stable sort by option number: repeated options keep their relative order."""
    return tuple(sorted(options, key=lambda o: o[0]))


def path_options(path: str, number: int = _URI_PATH) -> tuple[Option, ...]:
    """`"/3/0/1"` -> Uri-Path options `3`, `0`, `1` (an empty path gives none)."""
    return tuple((number, seg.encode()) for seg in path.strip("/").split("/") if seg)


def query_options(query: str) -> tuple[Option, ...]:
    """`"pmin=1&pmax=5"` -> Uri-Query options."""
    return tuple((_URI_QUERY, part.encode()) for part in query.split("&") if part)


# -- the codec ------------------------------------------------------------------------------


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    if value < 65805:
        return 14, (value - 269).to_bytes(2, "big")
    raise ValueError(f"option delta or length {value} is too large")


def encode_options(options: tuple[Option, ...], payload: bytes) -> bytes:
    """Options (sorted by number) and payload, as they follow the token on the wire."""
    out = bytearray()
    _put_options(out, options, payload)
    return bytes(out)


def _put_options(out: bytearray, options: tuple[Option, ...], payload: bytes) -> None:
    last = 0
    for number, value in options:
        delta = number - last
        if delta < 0:
            raise ValueError("options must be sorted by number")
        last = number
        length = len(value)
        if delta < 13 and length < 13:
            out.append((delta << 4) | length)
        else:
            dn, dx = _ext(delta)
            ln, lx = _ext(length)
            out.append((dn << 4) | ln)
            out += dx
            out += lx
        out += value
    if payload:
        out.append(0xFF)
        out += payload


def encode(msg: Message) -> bytes:
    """RFC 7252 datagram bytes for a message."""
    mtype, code, mid, token, options, payload = msg
    tkl = len(token)
    if tkl > 8:
        raise ValueError("token longer than 8 bytes")
    if not 0 <= mid <= 0xFFFF:
        raise ValueError("message ID out of range")
    # one buffer for the whole datagram: no intermediate bytes objects
    out = bytearray((0x40 | (mtype << 4) | tkl, code, mid >> 8, mid & 0xFF))
    out += token
    if options or payload:
        _put_options(out, options, payload)
    return bytes(out)


def decode_options(data: bytes, pos: int, end: int) -> tuple[tuple[Option, ...], bytes] | str:
    """Parse options and payload in `data[pos:end]`; a string return is a format error."""
    options: list[Option] = []
    number = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == end:
                return "payload marker followed by no payload"
            return tuple(options), data[pos:end]
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 13:
                if pos >= end:
                    return "truncated option delta"
                delta = data[pos] + 13
                pos += 1
            elif delta == 14:
                if pos + 2 > end:
                    return "truncated option delta"
                delta = ((data[pos] << 8) | data[pos + 1]) + 269
                pos += 2
            else:
                return "reserved option delta 15"
        if length >= 13:
            if length == 13:
                if pos >= end:
                    return "truncated option length"
                length = data[pos] + 13
                pos += 1
            elif length == 14:
                if pos + 2 > end:
                    return "truncated option length"
                length = ((data[pos] << 8) | data[pos + 1]) + 269
                pos += 2
            else:
                return "reserved option length 15"
        number += delta
        if pos + length > end:
            return "option value runs past the end"
        options.append((number, data[pos : pos + length]))
        pos += length
    return tuple(options), b""


# Building the tuple directly skips NamedTuple's generated __new__ (about 10% of `decode`).
_new_message = tuple.__new__


def decode(data: bytes) -> Message:
    """Decode one RFC 7252 datagram.

    Raises:
        DecodeError: with `reply` saying what to answer: IGNORE for datagrams that cannot even
            be identified (too short, wrong version) and for bad ACK/RST/NON; RESET for a
            confirmable message with a format error (RFC 7252 4.2, 4.3).
    """
    n = len(data)
    if n < 4:
        raise DecodeError("datagram shorter than the 4-byte header", Reply.IGNORE)
    b0 = data[0]
    if b0 >> 6 != 1:
        raise DecodeError(f"CoAP version {b0 >> 6}", Reply.IGNORE)
    mtype = (b0 >> 4) & 3
    tkl = b0 & 0x0F
    c = data[1]
    mid = (data[2] << 8) | data[3]
    if tkl > 8:
        raise _format_error(f"reserved token length {tkl}", mtype, mid, None)
    if 4 + tkl > n:
        raise _format_error("token runs past the end", mtype, mid, None)
    token = data[4 : 4 + tkl]
    if c == 0:
        if n != 4:
            raise _format_error("empty message with bytes after the header", mtype, mid, token)
        return _new_message(Message, (mtype, 0, mid, b"", (), b""))
    cls = c >> 5
    if cls == 1 or cls >= 6:
        raise _format_error(f"reserved code class {cls}", mtype, mid, token)
    if 4 + tkl == n:
        return _new_message(Message, (mtype, c, mid, token, (), b""))
    parsed = decode_options(data, 4 + tkl, n)
    if isinstance(parsed, str):
        raise _format_error(parsed, mtype, mid, token)
    return _new_message(Message, (mtype, c, mid, token, parsed[0], parsed[1]))


def _format_error(what: str, mtype: int, mid: int, token: bytes | None) -> DecodeError:
    reply = Reply.RESET if mtype == MessageType.CON else Reply.IGNORE
    return DecodeError(what, reply, mtype=mtype, mid=mid, token=token)


def check_options(msg: Message, known: frozenset[int] = KNOWN_OPTIONS) -> None:
    """Reject unrecognised critical options (RFC 7252 5.4.1, 5.4.3).

    An unknown critical option, or a known one whose value length is out of range, in a
    confirmable request gets 4.02 Bad Option; in another confirmable message a Reset; in a
    non-confirmable, ACK or RST message the message is ignored.

    Raises:
        DecodeError: with the reply to send.
    """
    for number, value in msg.options:
        bad = number not in known
        if not bad:
            limits = OPTION_LENGTHS.get(number)
            bad = limits is not None and not limits[0] <= len(value) <= limits[1]
        if bad and is_critical(number):
            if msg.mtype == MessageType.CON:
                reply = Reply.BAD_OPTION if 1 <= msg.code <= 31 else Reply.RESET
            else:
                reply = Reply.IGNORE
            raise DecodeError(
                f"unrecognised critical option {number}",
                reply,
                mtype=msg.mtype,
                mid=msg.mid,
                token=msg.token,
            )


def reset_for(mid: int) -> bytes:
    """The Reset datagram that rejects message `mid`."""
    return bytes((0x70, 0, mid >> 8, mid & 0xFF))


def empty_ack(mid: int) -> bytes:
    return bytes((0x60, 0, mid >> 8, mid & 0xFF))


def reply_for(error: DecodeError) -> bytes | None:
    """The datagram that answers an undecodable message, per `error.reply` (None: send nothing).

    4.00 and 4.02 are piggybacked on an ACK with the request's token.
    """
    if error.mid is None or error.reply is Reply.IGNORE or error.reply is Reply.ABORT:
        return None
    if error.reply is Reply.RESET or error.token is None:
        return reset_for(error.mid)
    c = 0x80 if error.reply is Reply.BAD_REQUEST else 0x82
    return encode(Message(MessageType.ACK, c, error.mid, error.token))
