"""A body that arrives in blocks (RFC 7959 2.4): the answer to the attempt in flight, or a
notification (RFC 7959 2.6) whose rest is fetched with GETs.

This module owns one transfer's bookkeeping; asking for the next block is the machine's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.coap.blockwise import Ask, Block2Assembler, Complete, Failed, get_block, get_size
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
