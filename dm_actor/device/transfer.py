"""Bodies in blocks (RFC 7959): one transfer's bookkeeping each; sending and answering the
blocks is the machine's.

`Transfer`: a body that arrives in blocks (2.4), the answer to the attempt in flight, or a
notification (2.6) whose rest is fetched with GETs. `Upload`: a request body we send in
blocks (2.5). `Incoming`: a request the device sends in blocks, reassembled. `Block1Pool`:
the bound on reassemblies, shared by every device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from dm_actor.coap.blockwise import (
    Ask,
    Block1Receiver,
    Block1Sender,
    Block2Assembler,
    Complete,
    Continue,
    Failed,
    Reject,
    get_block,
    get_size,
    size_option,
)
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import uint_bytes
from dm_actor.coap.numbers import Code, OptionNumber

if TYPE_CHECKING:
    from dm_actor.coap.message import Message, Option

_BLOCK1 = OptionNumber.BLOCK1.value
_BLOCK2 = OptionNumber.BLOCK2.value
_SIZE1 = OptionNumber.SIZE1.value
_MAX_AGE = OptionNumber.MAX_AGE.value
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


class Answer(NamedTuple):
    """What to answer a block of a request instead of handling it (yet)."""

    code: int
    options: tuple[Option, ...] = ()


def intake(
    incoming: Incoming | None,
    owner: object,
    request: Message,
    pool: Block1Pool,
    *,
    szx: int,
    max_body: int,
    retry_after: int,
    now: float,
) -> tuple[Incoming | None, Message | Answer]:
    """Take one block of a request a peer sends in blocks (RFC 7959 2.5, Block1).

    Args:
        incoming: the peer's transfer so far, or None.
        owner: the peer, as the pool knows it.
        request: the request, with a Block1 option.
        pool: the shared bound.
        szx: the largest block size asked for in 2.31 answers.
        max_body: the largest body taken.
        retry_after: Max-Age of a 5.03 when the pool is full.
        now: the time.

    Returns:
        The transfer to keep (None: none), and either the whole request (the last block's,
        with the whole body; its Block1 is to be echoed in the answer) or the `Answer` to
        give: 2.31 Continue, 4.08 for a gap, 4.13 + Size1 for a body over `max_body`, 4.02
        for a malformed option, 5.03 + Max-Age when the pool is full.
    """
    try:
        block = get_block(request, _BLOCK1)
        size1 = get_size(request, _SIZE1)
        key = (request.code, request.uri_path, request.uri_query)
    except DecodeError:
        if incoming is not None:
            pool.release(owner)
        return None, Answer(Code.BAD_OPTION.value)
    if block is None:
        return incoming, request
    if incoming is None or incoming.key != key or block.num == 0:
        if incoming is not None:
            pool.release(owner)
        if block.num == 0 and not block.more:
            return None, request  # the whole body in one block
        if block.num != 0:
            return None, Answer(Code.REQUEST_ENTITY_INCOMPLETE.value)
        incoming = Incoming(key, Block1Receiver(szx=szx, max_body=max_body))
        if not pool.take(owner, incoming, now):
            retry = ((_MAX_AGE, uint_bytes(retry_after)),)
            return None, Answer(Code.SERVICE_UNAVAILABLE.value, retry)
    elif incoming.receiver is None:  # (its place was given to another: start again)
        return None, Answer(Code.REQUEST_ENTITY_INCOMPLETE.value)
    else:
        pool.take(owner, incoming, now)  # (it holds its place: only its time moves)
    receiver = incoming.receiver
    assert receiver is not None
    step = receiver.feed(block, request.payload, size1)
    if isinstance(step, Continue):
        return incoming, Answer(Code.CONTINUE.value, (step.block.option(_BLOCK1),))
    pool.release(owner)
    if isinstance(step, Reject):
        size = () if step.size1 is None else (size_option(_SIZE1, step.size1),)
        return None, Answer(step.code, size)
    return None, request._replace(payload=step.body)
