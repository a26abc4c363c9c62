"""RFC 8323 framing: CoAP messages on a byte stream (TCP, TLS), and the signalling messages.

Owns the frame codec (`encode`, the incremental `StreamDecoder`) and RFC 8323 section 5:
builders for CSM, Ping, Pong, Release and Abort, and the CSM parser. Frames carry no type and
no Message ID, so every `Message` here has `mtype == 0` and `mid == 0`. Options and payload
use the RFC 7252 coding from `dm_actor.coap.message`.

Never does I/O, reads a clock, or keeps connection state beyond the bytes of one partial
frame: whether a CSM came first, answering a Ping, closing after an Abort all belong to the
caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message, Option, decode_options, encode_options, uint_bytes
from dm_actor.coap.numbers import Code, SignallingOption

#: RFC 8323 5.3.1: the Max-Message-Size every peer may assume before (or without) a CSM.
BASE_MAX_MESSAGE_SIZE = 1152

#: The smallest Max-Message-Size a peer may declare in its CSM; below it the CSM is refused
#: with an Abort naming the option (Bad-CSM-Option 2). Reasoned from the largest frame we must
#: send whole: a GET or Observe of the deepest path (/65535/65535/65535/65535) with an 8-byte
#: token, Observe, Accept and a Block2 option frames in about 50 bytes; a block-wise write's
#: smallest block (16 bytes, RFC 7959) with Block1 and Content-Format in about 80; the 2.01
#: answering a Register (Location-Path rd/<12 hex digits>) in about 30; our Abort diagnostics
#: are cut to fit. 128 leaves room for a few short Uri-Query options (write-attributes).
MIN_PEER_MESSAGE_SIZE = 128

#: What `StreamDecoder` accepts by default (and what the server may advertise in its CSM):
#: the base size plus headroom for a 1024-byte block under a long header.
MAX_MESSAGE_SIZE = 2048

_CSM = Code.CSM.value
_PING = Code.PING.value
_PONG = Code.PONG.value
_RELEASE = Code.RELEASE.value
_ABORT = Code.ABORT.value
_MAX_MESSAGE_SIZE = SignallingOption.MAX_MESSAGE_SIZE.value
_BLOCK_WISE_TRANSFER = SignallingOption.BLOCK_WISE_TRANSFER.value
_CUSTODY = SignallingOption.CUSTODY.value
_ALTERNATIVE_ADDRESS = SignallingOption.ALTERNATIVE_ADDRESS.value
_HOLD_OFF = SignallingOption.HOLD_OFF.value
_BAD_CSM_OPTION = SignallingOption.BAD_CSM_OPTION.value

_LONGEST_BODY = 65805 + 0xFFFFFFFF


# -- the frame codec ------------------------------------------------------------------------


def frame_code(frame: bytes) -> int:
    """The code of a frame `encode` made (after its length nibble and extended length)."""
    return frame[1 + _EXTENDED_LENGTH_BYTES[frame[0] >> 4]]


_EXTENDED_LENGTH_BYTES = (0,) * 13 + (1, 2, 4)


def encode(msg: Message) -> bytes:
    """The RFC 8323 section 3.2 frame for a message (`msg.mtype` and `msg.mid` are not sent).

    Raises:
        ValueError: a token longer than 8 bytes, unsorted options, or a body too long to frame.
    """
    token = msg.token
    tkl = len(token)
    if tkl > 8:
        raise ValueError("token longer than 8 bytes")
    body = encode_options(msg.options, msg.payload) if msg.options or msg.payload else b""
    n = len(body)
    if n < 13:
        head = bytes(((n << 4) | tkl, msg.code))
    elif n < 269:
        head = bytes((0xD0 | tkl, n - 13, msg.code))
    elif n < 65805:
        n -= 269
        head = bytes((0xE0 | tkl, n >> 8, n & 0xFF, msg.code))
    elif n <= _LONGEST_BODY:
        head = bytes((0xF0 | tkl,)) + (n - 65805).to_bytes(4, "big") + bytes((msg.code,))
    else:
        raise ValueError("options and payload too long for one frame")
    return b"".join((head, token, body))


class StreamDecoder:
    """Incremental decoder for one direction of a stream: bytes in, messages out.

    Feed whatever the stream delivers with `receive_data()`, split at any offset, then call
    `next_message()` until it returns None. Holding at most one partial frame between calls,
    the buffer stays bounded by `max_message_size` plus the last chunk received.

    After a `DecodeError` the stream cannot be resynchronised: send an Abort and close.
    Empty messages (code 0.00) are returned like any other; RFC 8323 3.4 says to ignore them.

    Args:
        max_message_size: the largest frame accepted, counted in whole frame bytes (length,
            code, token, options and payload), as RFC 8323 5.3.1 counts it.
    """

    __slots__ = ("_buffer", "_start", "max_message_size")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._start = 0

    def receive_data(self, data: bytes) -> None:
        """Append bytes read from the stream."""
        self._buffer += data

    def next_message(self) -> Message | None:
        """The next complete message, or None when more bytes are needed.

        Raises:
            DecodeError: with `reply` ABORT for a malformed frame (token length above 8, a
                reserved code class, bad options), and for a frame longer than
                `max_message_size`, raised as soon as its length field has arrived.
        """
        buf = self._buffer
        start = self._start
        avail = len(buf) - start
        if avail:
            b0 = buf[start]
            tkl = b0 & 0x0F
            if tkl > 8:
                raise DecodeError(f"reserved token length {tkl}", Reply.ABORT)
            n = b0 >> 4
            head = 2
            if n >= 13:
                if n == 13:
                    head = 3
                    if avail >= 2:
                        n = buf[start + 1] + 13
                elif n == 14:
                    head = 4
                    if avail >= 3:
                        n = ((buf[start + 1] << 8) | buf[start + 2]) + 269
                else:
                    head = 6
                    if avail >= 5:
                        n = int.from_bytes(buf[start + 1 : start + 5], "big") + 65805
            if avail >= head - 1:
                total = head + tkl + n
                if total > self.max_message_size:
                    raise DecodeError(
                        f"{total}-byte frame exceeds Max-Message-Size {self.max_message_size}",
                        Reply.ABORT,
                    )
                if avail >= total:
                    return self._take(start, head, tkl, total)
        if start:
            del buf[:start]
            self._start = 0
        return None

    def _take(self, start: int, head: int, tkl: int, total: int) -> Message:
        buf = self._buffer
        end = start + total
        frame = bytes(buf) if end == len(buf) and not start else bytes(buf[start:end])
        c = frame[head - 1]
        cls = c >> 5
        if cls == 1 or cls == 6:
            raise DecodeError(f"reserved code class {cls}", Reply.ABORT)
        token = frame[head : head + tkl]
        if head + tkl == total:
            msg = Message(0, c, 0, token, (), b"")
        else:
            parsed = decode_options(frame, head + tkl, total)
            if isinstance(parsed, str):
                raise DecodeError(parsed, Reply.ABORT, token=token)
            msg = Message(0, c, 0, token, parsed[0], parsed[1])
        if end == len(buf):
            buf.clear()
            self._start = 0
        else:
            self._start = end
        return msg


# -- signalling (RFC 8323 section 5) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Csm:
    """The peer's capabilities and settings (RFC 8323 5.3), with the base values as defaults."""

    max_message_size: int = BASE_MAX_MESSAGE_SIZE
    block_wise: bool = False


#: The values in force before the peer's first CSM.
BASE_CSM = Csm()


class BadCsmOption(DecodeError):
    """A CSM this side cannot accept (RFC 8323 5.3, 5.6): a critical option it does not know,
    or a Max-Message-Size below `MIN_PEER_MESSAGE_SIZE`.

    Attributes:
        option: the option number, to send back in the Abort's Bad-CSM-Option.
    """

    def __init__(self, option: int, reason: str | None = None) -> None:
        super().__init__(reason or f"unknown critical CSM option {option}", Reply.ABORT)
        self.option = option


def check_signalling(msg: Message) -> None:
    """Reject a signalling message with an unknown critical option (RFC 8323 5.2).

    Every option RFC 8323 defines is elective, so any critical (odd) option is unknown.
    Unknown elective options are ignored.

    Raises:
        BadCsmOption: in a CSM.
        DecodeError: with `reply` ABORT, in any other signalling message.
    """
    for number, _ in msg.options:
        if number & 1:
            if msg.code == _CSM:
                raise BadCsmOption(number)
            raise DecodeError(f"unknown critical signalling option {number}", Reply.ABORT)


def parse_csm(msg: Message, base: Csm = BASE_CSM) -> Csm:
    """The settings in force after the CSM `msg`.

    CSM options are cumulative: an option a CSM leaves out keeps its value from `base` (the
    previous `Csm` of the connection). A Max-Message-Size longer than 4 bytes, a repeated one,
    and a non-empty Block-Wise-Transfer are ignored like unknown elective options. Any
    Max-Message-Size of at least `MIN_PEER_MESSAGE_SIZE` is taken as declared (up to 4 GiB).

    Raises:
        BadCsmOption: an unknown critical option, or a Max-Message-Size below
            `MIN_PEER_MESSAGE_SIZE` (the peer could not take our requests); send
            `abort(bad_csm_option=e.option)`.
        ValueError: `msg` is not a CSM.
    """
    if msg.code != _CSM:
        raise ValueError("not a CSM")
    check_signalling(msg)
    size: int | None = None
    block_wise = base.block_wise
    for number, value in msg.options:
        if number == _MAX_MESSAGE_SIZE:
            if size is None and len(value) <= 4:
                size = int.from_bytes(value, "big")
                if size < MIN_PEER_MESSAGE_SIZE:
                    raise BadCsmOption(
                        number,
                        f"Max-Message-Size {size} is below {MIN_PEER_MESSAGE_SIZE} bytes",
                    )
        elif number == _BLOCK_WISE_TRANSFER and not value:
            block_wise = True
    return Csm(base.max_message_size if size is None else size, block_wise)


def csm(max_message_size: int = BASE_MAX_MESSAGE_SIZE, block_wise: bool = False) -> Message:
    """A CSM announcing the largest frame this side accepts, and whether it does BERT/blocks."""
    options: tuple[Option, ...] = ((_MAX_MESSAGE_SIZE, uint_bytes(max_message_size)),)
    if block_wise:
        options += ((_BLOCK_WISE_TRANSFER, b""),)
    return Message(0, _CSM, 0, b"", options)


def _custody(custody: bool) -> tuple[Option, ...]:
    return ((_CUSTODY, b""),) if custody else ()


def ping(*, token: bytes = b"", custody: bool = False) -> Message:
    """A Ping (RFC 8323 5.4); the Pong echoes `token`."""
    return Message(0, _PING, 0, token, _custody(custody))


def pong(token: bytes, *, custody: bool = False) -> Message:
    """The Pong answering a Ping with `token` (RFC 8323 5.4)."""
    return Message(0, _PONG, 0, token, _custody(custody))


def release(*, alternative_address: str | None = None, hold_off: int | None = None) -> Message:
    """A Release (RFC 8323 5.5): this side will close; reconnect elsewhere or after `hold_off` s."""
    options: tuple[Option, ...] = ()
    if alternative_address is not None:
        options += ((_ALTERNATIVE_ADDRESS, alternative_address.encode()),)
    if hold_off is not None:
        options += ((_HOLD_OFF, uint_bytes(hold_off)),)
    return Message(0, _RELEASE, 0, b"", options)


#: Diagnostic payload bytes an Abort carries at most: the frame then fits in any
#: Max-Message-Size we accept (`MIN_PEER_MESSAGE_SIZE`).
MAX_DIAGNOSTIC = 96


def abort(diagnostic: str = "", bad_csm_option: int | None = None) -> Message:
    """An Abort (RFC 8323 5.6) with a diagnostic payload, naming a rejected CSM option if any.

    The diagnostic is cut to `MAX_DIAGNOSTIC` bytes (on a UTF-8 character boundary).
    """
    options: tuple[Option, ...] = ()
    if bad_csm_option is not None:
        options = ((_BAD_CSM_OPTION, uint_bytes(bad_csm_option)),)
    payload = diagnostic.encode()
    if len(payload) > MAX_DIAGNOSTIC:
        payload = payload[:MAX_DIAGNOSTIC].decode(errors="ignore").encode()
    return Message(0, _ABORT, 0, b"", options, payload)
