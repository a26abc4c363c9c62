"""Bodies in blocks (RFC 7959): one transfer's bookkeeping each; sending and answering the
blocks is the machine's.

`Transfer`: a body that arrives in blocks (2.4), the answer to the attempt in flight, or a
notification (2.6) whose rest is fetched with GETs. `Upload`: a request body we send in
blocks (2.5). `Incoming`: a request the device sends in blocks, reassembled. `Block1Pool`:
the bound on reassemblies, shared by every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.coap.blockwise import (
    Ask,
    Block1Receiver,
    Block1Sender,
    Block2Assembler,
    Complete,
    Failed,
    get_block,
    get_size,
)
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.numbers import OptionNumber

if TYPE_CHECKING:
    from dm_actor.coap.message import Message

_BLOCK2 = OptionNumber.BLOCK2.value
_ETAG = OptionNumber.ETAG.value
_SIZE2 = OptionNumber.SIZE2.value
#: ask for blocks of at most 1024 bytes
BLOCK_SZX = 6


class Transfer:
    """One body in blocks: its first response, and the exchange that asked for the latest."""

    __slots__ = ("assembler", "first", "token", "uri")

    def __init__(self, first: Message, uri: str = "") -> None:
        self.assembler = Block2Assembler(szx=BLOCK_SZX)
        self.first = first  # the first block's response: its code, Observe, Content-Format
        self.token = b""  # the exchange that asked for the latest block
        self.uri = uri  # a notification's observed path (its observation's token: `first`)

    def feed(self, response: Message) -> Complete | Ask | Failed:
        """Take one response; an error answer to a later block fails the transfer."""
        code = response.code
        if code >> 5 != 2 and response is not self.first:
            return Failed(f"a later block was answered {code >> 5}.{code & 31:02d}")
        try:
            block = get_block(response, _BLOCK2)
        except DecodeError as exc:
            return Failed(str(exc))
        etag, size2 = response.option(_ETAG), get_size(response, _SIZE2)
        return self.assembler.feed(block, response.payload, etag, size2)


class Upload:
    """A request body we send in blocks (RFC 7959 2.5, Block1): the sender, and the exchange
    of the block sent last (block 0's is the command's own, the one a restart resends)."""

    __slots__ = ("sender", "token")

    def __init__(self, sender: Block1Sender, token: bytes) -> None:
        self.sender = sender
        self.token = token


class Incoming:
    """A request a peer sends in blocks (RFC 7959 2.5, Block1), reassembled: one per peer at
    a time, named by its method, path and query. `receiver` is None once its place in the
    pool was given to another (its buffer is freed; its next block is answered 4.08)."""

    __slots__ = ("key", "receiver")

    def __init__(self, key: tuple[object, ...], receiver: Block1Receiver) -> None:
        self.key = key
        self.receiver: Block1Receiver | None = receiver


class Block1Pool:
    """The bound on requests being reassembled from blocks, shared by every device and by
    the peers that have no device yet: at most `limit` at once, each at most its receiver's
    `max_body`, so at most `limit * max_body` bytes whatever peers do. When it is full, the
    one idle longest gives its place if it was idle `max_age` seconds (its buffer is freed
    at once); else a new one is refused (the caller answers 5.03). Times are `now`."""

    __slots__ = ("_slots", "limit", "max_age")

    def __init__(self, limit: int, max_age: float) -> None:
        self.limit = limit
        self.max_age = max_age
        # owner -> (when its last block came, its transfer), the longest idle first
        self._slots: dict[object, tuple[float, Incoming]] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def take(self, owner: object, incoming: Incoming, now: float) -> bool:
        """Hold (or keep holding) a place for `owner`'s transfer; False when there is none."""
        slots = self._slots
        if slots.pop(owner, None) is None and len(slots) >= self.limit:
            oldest = next(iter(slots))
            since, given = slots[oldest]
            if now - since < self.max_age:
                return False
            del slots[oldest]
            given.receiver = None
        slots[owner] = (now, incoming)
        return True

    def release(self, owner: object) -> None:
        self._slots.pop(owner, None)
