"""ReplayStream: the bytes h11 already read come first, then the stream's own."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dm_actor.api.replay import ReplayStream


async def _pair_drained_prefix() -> tuple[ReplayStream, ReplayStream]:
    """Both ends wrapped; each first replays a prefix, which is read before the checks run."""
    left, right = trio.testing.memory_stream_pair()
    a, b = ReplayStream(left, b"xy"), ReplayStream(right, b"z")
    assert await a.receive_some(1) == b"x"
    assert await a.receive_some() == b"y"
    assert await b.receive_some() == b"z"
    return a, b


async def _pair_plain() -> tuple[ReplayStream, ReplayStream]:
    left, right = trio.testing.memory_stream_pair()
    return ReplayStream(left, b""), ReplayStream(right, b"")


async def _clogged() -> tuple[ReplayStream, ReplayStream]:
    left, right = trio.testing.lockstep_stream_pair()
    return ReplayStream(left, b""), ReplayStream(right, b"")


async def test_conforms_to_half_closeable_stream() -> None:
    # lockstep streams are clogged but not half-closeable: check them two-way only
    await trio.testing.check_two_way_stream(_pair_plain, _clogged)
    await trio.testing.check_half_closeable_stream(_pair_plain, None)
    await trio.testing.check_half_closeable_stream(_pair_drained_prefix, None)


async def test_prefix_first_then_the_stream() -> None:
    left, right = trio.testing.memory_stream_pair()
    wrapped = ReplayStream(right, b"GET / HTTP/1.1\r\n")
    await left.send_all(b"after")
    assert await wrapped.receive_some(4) == b"GET "
    assert await wrapped.receive_some() == b"/ HTTP/1.1\r\n"
    assert await wrapped.receive_some() == b"after"
    await wrapped.send_all(b"back")
    assert await left.receive_some() == b"back"
    await wrapped.send_eof()
    assert await left.receive_some() == b""


async def test_closed_with_a_prefix_pending() -> None:
    _, right = trio.testing.memory_stream_pair()
    wrapped = ReplayStream(right, b"unread")
    await wrapped.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await wrapped.receive_some()
    with pytest.raises(ValueError, match="max_bytes"):
        await ReplayStream(right, b"x").receive_some(0)


async def test_concurrent_receive_is_refused_while_replaying() -> None:
    _, right = trio.testing.memory_stream_pair()
    wrapped = ReplayStream(right, b"abc")
    with pytest.raises(ExceptionGroup) as info:  # noqa: PT012
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wrapped.receive_some, 1)
            nursery.start_soon(wrapped.receive_some, 1)
    assert info.group_contains(trio.BusyResourceError)
