"""A WebSocket subscriber that stops reading (issue 10, item 8).

Real loopback WebSockets (trio-websocket clients, and a raw one), in virtual time. A client
that takes no message for `ping_interval` (30 s: the kernel's buffers stay full) or answers
no ping within it is closed with 1001 and a reason saying so; the channel says
"disconnected" from then on; what was not sent waits in the channel (nothing lost, a message
being written may come again); another application's socket is never held up; a client whose
buffer overflowed is told how many events it lost (`events-lost`).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import trio
import trio.lowlevel
import trio.testing
from trio_websocket import ConnectionClosed

from .client import KEY_A, KEY_B, KEYS, Api, next_message, start_api, websocket
from .test_websocket import UPGRADE

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

OWNER_A = KEYS.owner(KEY_A) or ""
OWNER_B = KEYS.owner(KEY_B) or ""
PAYLOAD = base64.b64encode(b"x" * 384).decode()  # ~600 bytes of JSON an event


async def put_channel(api: Api, key: str, max_chunk_size: int = 100) -> None:
    async with api.client(key) as client:
        reply = await client.request(
            "PUT", "/v2/notification/websocket",
            json={"serialization": {"max_chunk_size": max_chunk_size}},
        )  # fmt: skip
        assert reply.status == 201, reply.text


async def status(api: Api, key: str = KEY_A) -> str:
    async with api.client(key) as client:
        view = (await client.request("GET", "/v2/notification/websocket")).json()
    state: str = view["status"]
    return state


def publish(api: Api, n: int, first: int = 0) -> None:
    """Events `first` .. `first + n - 1` for both applications, stamped with the time."""
    now = trio.current_time()
    for i in range(first, first + n):
        item = {"ep": "dev", "path": "/3303/0/5700", "payload": PAYLOAD, "n": i, "t": now}
        api.sup.events.publish("notifications", item, frozenset((OWNER_A, OWNER_B)))


async def produce(api: Api, per_second: int, seconds: int) -> None:
    """`per_second` events a second for `seconds` seconds (ten batches a second)."""
    for tick in range(seconds * 10):
        publish(api, per_second // 10, tick * (per_second // 10))
        await trio.sleep(0.1)


def numbers(message: dict[str, list[Any]]) -> list[int]:
    return [item["n"] for item in message.get("notifications", ())]


async def read_all(ws: WebSocketConnection, quiet: float = 5.0) -> list[int]:
    """What arrives until nothing did for `quiet` seconds."""
    got: list[int] = []
    while True:
        with trio.move_on_after(quiet):
            got += numbers(await next_message(ws))
            continue
        return got


async def test_a_subscriber_reading_one_message_a_second_is_closed_with_a_reason(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """2,000 events a second arrive; the client takes one message (100 events) a second.
    Within a minute the server closes the socket (1001, "Too slow: ...") and says so in the
    channel's status, while the client still reads what was sent before the close frame.
    After reconnecting, the client gets the rest, and its first message says how many events
    were dropped: every event arrived or was counted as lost."""
    api = await start_api(nursery)
    await put_channel(api, KEY_A)
    flipped: list[float] = []

    async def watch_status() -> None:
        while True:
            if await status(api) == "disconnected":
                flipped.append(trio.current_time())
                return
            await trio.sleep(1)

    async def produce_small(per_second: int, seconds: int) -> None:
        for tick in range(seconds * 10):
            for i in range(tick * per_second // 10, (tick + 1) * per_second // 10):
                ep = f"d{i}-{PAYLOAD[:90]}"  # ~100 bytes
                api.sup.events.publish("de-registrations", ep, frozenset((OWNER_A,)))
            await trio.sleep(0.1)

    def small(message: dict[str, Any]) -> list[int]:
        return [int(ep[1:].split("-")[0]) for ep in message.get("de-registrations", ())]

    got: list[int] = []
    lost = 0
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        await trio.sleep(0.5)
        nursery.start_soon(produce_small, 2000, 70)
        nursery.start_soon(watch_status)
        try:
            with trio.fail_after(200):  # (it never came before: read on forever)
                while True:
                    message: dict[str, Any] = await next_message(ws)
                    lost += message.get("events-lost", 0)
                    got += small(message)
                    await trio.sleep(1)
        except ConnectionClosed as exc:
            reason = exc.reason
        closed_at = trio.current_time()
    assert reason is not None
    assert reason.code == 1001
    # its TCP buffers hold a few hundred small messages: the first one not taken within
    # 30 s (or the channel's bound, or a missing pong: whichever comes first) ends it
    assert reason.reason is not None and reason.reason.startswith("Too slow: ")
    assert flipped and flipped[0] <= 75
    assert flipped[0] <= closed_at  # the status said so before the client read the close
    await trio.sleep(70)  # the producer is done
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        first = await next_message(ws)
        assert first["events-lost"] > 0  # type: ignore[operator]
        lost += first["events-lost"]  # type: ignore[operator]
        got += small(first)
        while True:
            with trio.move_on_after(5):
                message = await next_message(ws)
                assert "events-lost" not in message
                got += small(message)
                continue
            break
    # every event arrived or was counted as lost; the message being written at the close
    # (100 events) went back to the channel: it may come twice, or arrive and then be
    # dropped from the full buffer (counted as lost too)
    assert 2000 * 70 <= len(set(got)) + lost <= 2000 * 70 + 100
    assert len(got) - len(set(got)) <= 100


async def test_a_stalled_subscriber_holds_up_nobody_and_loses_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A's client reads nothing: its kernel buffers fill, the message being written is not
    taken within 30 s, and A's socket is closed ("disconnected" at once). B, reading, gets
    every event as soon as it is published, throughout. A reconnects and gets every event."""
    api = await start_api(nursery)
    await put_channel(api, KEY_A)
    await put_channel(api, KEY_B)
    late: list[float] = []
    got_b: list[int] = []

    async def read_b(ws: WebSocketConnection) -> None:
        while True:
            message = await next_message(ws)
            now = trio.current_time()
            late.extend(now - item["t"] for item in message["notifications"])
            got_b.extend(numbers(message))

    async with (
        websocket(api, ["wss", f"pelion_{KEY_A}"]) as stalled,
        websocket(api, ["wss", f"pelion_{KEY_B}"]) as ws_b,
        trio.open_nursery() as readers,
    ):
        readers.start_soon(read_b, ws_b)
        await trio.sleep(0.5)
        assert await status(api) == "connected"
        await produce(api, 300, 40)  # 12,000 events of ~600 bytes: A's buffers fill
        assert await status(api) == "disconnected"
        assert await status(api, KEY_B) == "connected"
        await trio.sleep(5)
        readers.cancel_scope.cancel()
        assert stalled.closed is None  # (it reads nothing: it does not know yet)
    assert got_b == list(range(12_000))
    assert max(late) < 0.5  # B was never held up by A
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        got = await read_all(ws)
    first = min(got)
    # the frames A's kernel took before the stall were handed over; all the rest comes now
    assert set(got) == set(range(first, 12_000))
    assert first > 0


async def test_a_client_that_answers_no_ping_gets_a_close_frame_with_the_reason(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A raw client that completes the handshake and then reads nothing: no pong within
    30 s of the ping; the close frame (1001, reason) is written, and it is there to read."""
    api = await start_api(nursery)
    await put_channel(api, KEY_A)
    stream = await trio.open_tcp_stream(*api.addr[:2])
    async with stream:
        head = [f"{k}: {v}" for k, v in [*UPGRADE, ("sec-websocket-protocol", f"pelion_{KEY_A}")]]
        request = "GET /v2/notification/websocket-connect HTTP/1.1\r\nHost: t\r\n"
        await stream.send_all((request + "\r\n".join(head) + "\r\n\r\n").encode())
        await trio.sleep(1)
        assert await status(api) == "connected"
        await trio.sleep(58)
        assert await status(api) == "connected"  # pinged at 30 s, answer due by 60 s
        await trio.sleep(3)
        assert await status(api) == "disconnected"
        data = b""
        with trio.move_on_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    assert data.startswith(b"HTTP/1.1 101 ")
    close = b"\x88" + bytes([2 + len(b"Too slow: no pong within 30 s.")])
    assert close + b"\x03\xe9Too slow: no pong within 30 s." in data


async def test_a_client_whose_buffer_overflowed_is_told_how_many_events_it_lost(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The channel keeps 100,000 events; 100,005 arrive while the client is away. Its next
    message says `"events-lost": 5` and starts with the sixth event; later ones say nothing."""
    api = await start_api(nursery)
    await put_channel(api, KEY_A, max_chunk_size=10_000)
    for start in range(0, 100_005, 5_000):
        for i in range(start, min(start + 5_000, 100_005)):
            api.sup.events.publish("de-registrations", f"d{i}", frozenset((OWNER_A,)))
        await trio.lowlevel.checkpoint()
    await trio.sleep(1)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws:
        first: dict[str, Any] = await next_message(ws)
        assert first["events-lost"] == 5
        assert first["de-registrations"][0] == "d5"
        second = await next_message(ws)
        assert "events-lost" not in second
        assert second["de-registrations"][0] == "d10005"
