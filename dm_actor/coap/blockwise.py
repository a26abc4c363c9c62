"""RFC 7959 block-wise transfers: the Block option value and the four transfer machines.

Owns the Block1/Block2 option value (with RFC 8323 BERT, SZX 7, where the caller says the
transport allows it), the Size1/Size2 options, and small state machines that segment and
reassemble bodies: `Block2Assembler` (client, reading a large response), `Block1Sender`
(client, sending a large request), `Block1Receiver` (server, taking a large request) and
`slice_block2` (server, serving a large response). It never sends, matches tokens or keys
transfers by peer and resource: each machine is one transfer, kept by its caller.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import uint_bytes
from dm_actor.coap.numbers import Code

if TYPE_CHECKING:
    from dm_actor.coap.message import Message, Option

#: Largest block number a 3-byte Block option can carry.
MAX_NUM = (1 << 20) - 1
#: SZX value meaning BERT (RFC 8323 section 6): 1024-byte units, several per message.
BERT_SZX = 7
#: Default bound on a reassembled body.
DEFAULT_MAX_BODY = 1 << 20

_CONTINUE = Code.CONTINUE.value
_BAD_REQUEST = Code.BAD_REQUEST.value
_INCOMPLETE = Code.REQUEST_ENTITY_INCOMPLETE.value
_TOO_LARGE = Code.REQUEST_ENTITY_TOO_LARGE.value


def _unit(szx: int) -> int:
    return 1024 if szx == BERT_SZX else 1 << (szx + 4)


def _block_at(offset: int, szx: int, *, more: bool) -> Block:
    """The block of exponent `szx` starting at `offset` (a multiple of its size)."""
    return Block(offset // _unit(szx), more, szx)


def _numbered(length: int, szx: int) -> bool:
    """Whether every block of a `length`-byte body has a number below 2**20."""
    return length <= (MAX_NUM + 1) * _unit(szx)


@dataclass(frozen=True, slots=True)
class Block:
    """A Block1 or Block2 option value: block number, more flag, size exponent.

    Raises:
        ValueError: num outside 0 .. 2**20 - 1 or szx outside 0 .. 7.
    """

    num: int
    more: bool
    szx: int

    def __post_init__(self) -> None:
        if not 0 <= self.num <= MAX_NUM or not 0 <= self.szx <= BERT_SZX:
            raise ValueError(f"invalid block ({self.num}, {self.more}, {self.szx})")

    @property
    def size(self) -> int:
        """Block size in bytes, 2**(szx + 4); BERT (szx 7) counts in 1024-byte units."""
        return _unit(self.szx)

    @property
    def offset(self) -> int:
        """Byte offset of this block in the body (descriptive use)."""
        return self.num * self.size

    def fits(self, length: int) -> bool:
        """Whether a payload of `length` bytes is valid for this block (RFC 7959 2.2, RFC 8323 6).

        A block with `more` set carries exactly `size` bytes (BERT: a positive multiple of
        1024); the last block carries at most `size` bytes (BERT: any number).
        """
        if self.szx == BERT_SZX:
            return not self.more or (length > 0 and length % 1024 == 0)
        return length == self.size if self.more else length <= self.size

    def encode(self) -> bytes:
        """The option value as a minimal 0-3 byte unsigned integer."""
        return uint_bytes(self.num << 4 | self.more << 3 | self.szx)

    def option(self, number: int) -> Option:
        """This value as option `number` (Block1 27 or Block2 23)."""
        return (number, self.encode())

    @classmethod
    def decode(cls, raw: bytes, *, bert: bool = False) -> Block:
        """Parse a Block option value.

        Args:
            raw: the option value (leading zero bytes are accepted).
            bert: the transport is reliable and both sides announced BERT, so SZX 7 is allowed.

        Raises:
            DecodeError: `Reply.BAD_OPTION` for more than 3 bytes or a reserved SZX 7.
        """
        if len(raw) > 3:
            raise DecodeError("block option longer than 3 bytes", Reply.BAD_OPTION)
        value = int.from_bytes(raw, "big")
        if value & 7 == BERT_SZX and not bert:
            raise DecodeError("block option with reserved SZX 7", Reply.BAD_OPTION)
        return cls(value >> 4, bool(value & 8), value & 7)


def get_block(msg: Message, number: int, *, bert: bool = False) -> Block | None:
    """The message's Block1 or Block2 option (`number`), or None when absent.

    Raises:
        DecodeError: as `Block.decode`.
    """
    raw = msg.option(number)
    return None if raw is None else Block.decode(raw, bert=bert)


def size_option(number: int, size: int) -> Option:
    """A Size1 (60) or Size2 (28) option carrying `size` bytes."""
    return (number, uint_bytes(size))


def get_size(msg: Message, number: int) -> int | None:
    """The message's Size1 or Size2 option (`number`).

    Returns:
        The size, or None when absent or longer than 4 bytes: Size1 and Size2 are elective,
        so a value of the wrong length is ignored (RFC 7252 5.4.3).
    """
    raw = msg.option(number)
    return None if raw is None or len(raw) > 4 else int.from_bytes(raw, "big")


# -- outcomes --------------------------------------------------------------------------------


class Ask(NamedTuple):
    """Block2 client: request the next block with this Block2 option (same request otherwise)."""

    block: Block


class Complete(NamedTuple):
    """The whole body has arrived."""

    body: bytes


class Send(NamedTuple):
    """Block1 client: send the request with this Block1 option and payload."""

    block: Block
    payload: bytes


class Done(NamedTuple):
    """Block1 client: the response (with this code) is the final one; the upload is over."""

    code: int


class Continue(NamedTuple):
    """Block1 server: answer 2.31 Continue carrying this Block1 option."""

    block: Block


class Reject(NamedTuple):
    """Block1 server: answer with this error code, plus a Size1 option when `size1` is set."""

    code: int
    size1: int | None = None


class Failed(NamedTuple):
    """Client side: the peer broke the protocol or a limit was hit; the transfer is abandoned."""

    reason: str


# -- client: Block2 reassembly ---------------------------------------------------------------


class Block2Assembler:
    """Client side of one Block2 response stream (RFC 7959 2.4), fed one response at a time.

    Blocks must arrive at the offset asked for; a different offset is asked again, and a
    changed ETag (the representation changed) restarts from block 0. Both count against
    `max_retries`. The reassembled body is bounded by `max_body`.
    """

    __slots__ = ("_ask_szx", "_buf", "_etag", "_retries", "max_body", "max_retries", "szx")

    def __init__(
        self, *, szx: int = 6, max_body: int = DEFAULT_MAX_BODY, max_retries: int = 3
    ) -> None:
        """Args:
        szx: the largest block size exponent to ask for (7 only over BERT-capable TCP).
        max_body: the largest body accepted, in bytes.
        max_retries: repeated or restarted requests allowed before giving up.
        """
        self.szx = szx
        self.max_body = max_body
        self.max_retries = max_retries
        self._buf = bytearray()
        self._etag: bytes | None = None
        self._ask_szx = szx
        self._retries = 0

    def _reset(self) -> None:
        self._buf = bytearray()
        self._etag = None
        self._ask_szx = self.szx
        self._retries = 0

    def _fail(self, reason: str) -> Failed:
        self._reset()
        return Failed(reason)

    def _spend_retry(self, why: str) -> Failed | None:
        self._retries += 1
        if self._retries > self.max_retries:
            return self._fail(f"{why}; gave up after {self.max_retries} retries")
        return None

    def _ask(self) -> Ask:
        """Ask for the block at the end of what has arrived."""
        return Ask(_block_at(len(self._buf), self._ask_szx, more=False))

    def feed(
        self,
        block: Block | None,
        payload: bytes,
        etag: bytes | None = None,
        size2: int | None = None,
    ) -> Complete | Ask | Failed:
        """Take one response.

        Args:
            block: the response's Block2 option, or None (the response is the whole body).
            payload: the response payload.
            etag: the response's ETag, or None.
            size2: the response's Size2 (announced total size), or None.

        Returns:
            `Complete` with the body, `Ask` for the next request, or `Failed`. After
            `Complete` or `Failed` the assembler is ready for a new transfer.
        """
        if block is None:
            if len(payload) > self.max_body:
                return self._fail(f"body of {len(payload)} bytes exceeds {self.max_body}")
            self._reset()
            return Complete(payload)
        if size2 is not None and size2 > self.max_body:
            return self._fail(f"announced size {size2} exceeds {self.max_body}")
        if self._buf and etag != self._etag:
            self._buf = bytearray()  # the representation changed: start again from block 0
            failed = self._spend_retry("ETag changed")
            if failed is not None:
                return failed
            if block.num != 0:
                return self._ask()
        elif block.offset != len(self._buf):
            failed = self._spend_retry(f"expected offset {len(self._buf)}, got {block.offset}")
            return self._ask() if failed is None else failed
        if not block.fits(len(payload)):
            return self._fail(f"payload of {len(payload)} bytes does not fit {block}")
        if len(self._buf) + len(payload) > self.max_body:
            return self._fail(f"body exceeds {self.max_body} bytes")
        self._etag = etag
        self._buf += payload
        if not block.more:
            body = bytes(self._buf)
            self._reset()
            return Complete(body)
        self._ask_szx = min(block.szx, self.szx)
        return self._ask()


# -- client: Block1 segmentation -------------------------------------------------------------


class Block1Sender:
    """Client side of one Block1 request upload (RFC 7959 2.3, 2.5).

    `current` is the block to send; `on_response` takes the answer to it. The client follows
    a smaller SZX that the server asks for in its 2.31 Continue (never a larger one), and
    restarts with a smaller SZX when the first block is answered 4.13 with a Block1 option
    (RFC 7959 2.9.3).
    """

    __slots__ = ("_offset", "_payload", "_szx", "_units")

    def __init__(self, payload: bytes, szx: int = 6, *, bert_units: int = 1) -> None:
        """Args:
        payload: the whole request body.
        szx: the initial block size exponent (7: BERT, only over TCP after CSM).
        bert_units: 1024-byte units per BERT message (only used while szx is 7).
        """
        if not 0 <= szx <= BERT_SZX or bert_units < 1 or not _numbered(len(payload), szx):
            raise ValueError("invalid szx or bert_units, or payload too large for szx")
        self._payload = payload
        self._offset = 0
        self._szx = szx
        self._units = bert_units

    @property
    def current(self) -> Send:
        """The Block1 option and payload of the request to send now."""
        chunk = _unit(self._szx) * (self._units if self._szx == BERT_SZX else 1)
        end = self._offset + chunk
        more = end < len(self._payload)
        return Send(
            _block_at(self._offset, self._szx, more=more), self._payload[self._offset : end]
        )

    def on_response(self, code: int, block1: Block | None) -> Send | Done | Failed:
        """Take the response to `current`.

        Args:
            code: the response code.
            block1: the response's Block1 option, or None.

        Returns:
            `Send` the next block, `Done` (this response is final), or `Failed`.
        """
        sent = self.current
        if code >> 5 >= 4:
            if (
                code == _TOO_LARGE
                and self._offset == 0
                and block1 is not None
                and block1.szx < self._szx
            ):
                self._szx = block1.szx
                return self.current
            return Done(code)
        if not sent.block.more:
            if code == _CONTINUE:
                return Failed("2.31 Continue after the last block")
            return Done(code)
        if block1 is None or block1.num != sent.block.num:
            return Failed(f"response does not acknowledge block {sent.block.num}")
        if code != _CONTINUE and block1.more:
            return Failed(f"code {code} with Block1 M set for a non-final block")
        szx = min(self._szx, block1.szx)
        offset = self._offset + len(sent.payload)
        if not _numbered(len(self._payload), szx):
            return Failed(f"payload too large to number in blocks of szx {szx}")
        self._offset = offset
        self._szx = szx
        return self.current


# -- server: Block1 reassembly ---------------------------------------------------------------


class Block1Receiver:
    """Server side of one Block1 request upload (RFC 7959 2.3, 2.9).

    Blocks must arrive in order from block 0 (a new block 0 restarts the transfer). A gap is
    answered 4.08 Request Entity Incomplete, a payload that does not match its block size
    4.00 Bad Request, and a body over `max_body` (announced in Size1 or reached) 4.13 Request
    Entity Too Large with Size1 = `max_body`. The final response to the last block echoes
    that request's Block1 option, which the caller copies.
    """

    __slots__ = ("_buf", "max_body", "szx")

    def __init__(self, *, szx: int = 6, max_body: int = DEFAULT_MAX_BODY) -> None:
        """Args:
        szx: the largest block size exponent the server wants (asked for in 2.31 answers).
        max_body: the largest body accepted, in bytes.
        """
        self.szx = szx
        self.max_body = max_body
        self._buf = bytearray()

    def feed(
        self, block: Block, payload: bytes, size1: int | None = None
    ) -> Continue | Complete | Reject:
        """Take one request block.

        Args:
            block: the request's Block1 option.
            payload: the request payload.
            size1: the request's Size1 (announced total size), or None.

        Returns:
            `Continue` (answer 2.31), `Complete` with the body (answer finally), or `Reject`
            (4.08 gap, 4.00 payload does not match the block size, 4.13 too large).
            A `Reject` ends the transfer.
        """
        if block.num == 0:
            self._buf = bytearray()
        if block.offset != len(self._buf):
            self._buf = bytearray()
            return Reject(_INCOMPLETE)
        if not block.fits(len(payload)):
            self._buf = bytearray()
            return Reject(_BAD_REQUEST)
        total = len(self._buf) + len(payload)
        if total > self.max_body or (size1 is not None and size1 > self.max_body):
            self._buf = bytearray()
            return Reject(_TOO_LARGE, self.max_body)
        self._buf += payload
        if block.more:
            return Continue(Block(block.num, True, min(block.szx, self.szx)))
        body = bytes(self._buf)
        self._buf = bytearray()
        return Complete(body)


# -- server: Block2 slicing ------------------------------------------------------------------


def slice_block2(
    payload: bytes, request: Block | None, szx: int = 6, *, bert_units: int = 1
) -> tuple[Block, bytes]:
    """The Block2 option and payload slice answering a request for a large body (RFC 7959 2.4).

    The block size is the smaller of the request's and `szx`; the request's byte offset is
    kept, so the block number follows the size actually used.

    Args:
        payload: the whole response body (at most 2**20 blocks of the chosen size).
        request: the request's Block2 option, or None (serve block 0).
        szx: the server's largest block size exponent (7: BERT, over TCP only).
        bert_units: 1024-byte units per BERT response (only used when the size is BERT).

    Raises:
        DecodeError: `Reply.BAD_OPTION` when the requested block starts past the end.
    """
    offset = 0
    if request is not None:
        szx = min(szx, request.szx)
        offset = request.offset
        if offset and offset >= len(payload):
            raise DecodeError(f"block {request.num} is past the end", Reply.BAD_OPTION)
    end = offset + _unit(szx) * (bert_units if szx == BERT_SZX else 1)
    return _block_at(offset, szx, more=end < len(payload)), payload[offset:end]
