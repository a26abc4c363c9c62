"""Bounds-checked reading of DTLS wire structures (RFC 5246 §4 presentation language).

Pure: no I/O. Every read past the end raises `DecodeError`; nothing here re-slices the input
per field: a `Reader` walks one `bytes` object with an offset.
"""

from __future__ import annotations

from dm_actor.dtls.errors import DecodeError


class Reader:
    """A cursor over `data[pos:end]`; each accessor consumes what it returns."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _advance(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.end:
            raise DecodeError(f"truncated: need {n} bytes at {start}, have {self.end - start}")
        self.pos = start + n
        return start

    def uint(self, n: int) -> int:
        start = self._advance(n)
        return int.from_bytes(self.data[start : start + n], "big")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u24(self) -> int:
        return self.uint(3)

    def take(self, n: int) -> bytes:
        start = self._advance(n)
        return self.data[start : start + n]

    def vec8(self) -> bytes:
        return self.take(self.u8())

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(self.remaining)

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise DecodeError(f"{self.end - self.pos} trailing bytes")


def vec8(data: bytes) -> bytes:
    """`opaque x<0..2^8-1>`: a one-byte length, then the bytes."""
    return bytes((len(data),)) + data


def vec16(data: bytes) -> bytes:
    """`opaque x<0..2^16-1>`: a two-byte length, then the bytes."""
    return len(data).to_bytes(2, "big") + data
