"""Crash-test helpers: an application reading each kind of notification channel, and a tally.

The crash tests (tests/test_crash.py) kill -9 a real daemon while an application reads its
channel. This module is that application's side, for the three channel types:

- `websocket`: `PUT /v2/notification/websocket` with `include_uid`, then a socket that
  reconnects after every crash;
- `long-poll`: `GET /v2/notification/pull` in a loop, one request after another (the first
  creates the channel; Pelion's pull takes no serialization options, so no `uid`);
- `webhook`: a small HTTP receiver on 127.0.0.1 answering 204 to every request, registered
  with `PUT /v2/notification/callback` and `include_uid`.

Every AsyncIDResponse received is noted in an `Inbox` with when it came and in which message.
`tally` then says what was promised (202), answered, missing and repeated, and which repeats
fall outside the window the channel may repeat after a crash (`Window`): a repeat must arrive
after a kill, and its first copy must have come among the last messages before that kill or
shortly before it. A repeat is recognised by its async-id (unique per application), and on
`websocket` and `webhook` it must carry the first copy's `uid` (another uid is a second
response, not a repeat).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from tests.daemon import NotSent, request

CHANNELS = ("websocket", "long-poll", "webhook")
WEBSOCKET = "/v2/notification/websocket-connect"
PULL = "/v2/notification/pull"
POLL_LIMIT = 45.0  # the daemon answers a pull within 30 s (204)
ERRORS = (ConnectionClosed, OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError)


@dataclass(frozen=True)
class Arrival:
    """One AsyncIDResponse as received: when, in which message, its uid and outcome."""

    at: float
    message: int
    uid: str | None
    outcome: str


@dataclass
class Inbox:
    """Everything one application's channel delivered."""

    channel: str
    arrivals: defaultdict[str, list[Arrival]] = field(default_factory=lambda: defaultdict(list))
    messages: int = 0  # messages that carried events
    kinds: Counter[str] = field(default_factory=Counter)  # events of each kind, events-lost
    connections: int = 0  # WebSocket connections, pulls answered, webhook connections
    log: list[str] = field(default_factory=list)

    def receive(self, message: dict[str, Any]) -> None:
        if not message:
            return  # the callback's test PUT of {}
        self.messages += 1
        now = trio.current_time()
        for kind, items in message.items():
            self.kinds[kind] += len(items) if isinstance(items, list) else int(items)
        for item in message.get("async-responses", ()):
            outcome = f"{item['status']} {item.get('error', '')}".strip()
            uid = item.get("uid")
            self.arrivals[str(item["id"])].append(
                Arrival(now, self.messages, None if uid is None else str(uid), outcome)
            )

    def note(self, line: str) -> None:
        """Log a line (the last 100 are kept; a line like the one before is counted)."""
        line = line[:160]
        if self.log and self.log[-1].partition(" ")[2].startswith(line):
            first, _, rest = self.log[-1].partition(" ")
            count = int(rest[len(line) :].strip(" ()x") or "1") + 1
            self.log[-1] = f"{first} {line} (x{count})"
            return
        self.log.append(f"{trio.current_time():.2f} {line}")
        del self.log[:-100]


@dataclass(frozen=True)
class Kill:
    """A kill -9: when, how many messages the channel had delivered by then, and when the
    next process was started (a message received before that came from the killed one)."""

    at: float
    messages: int
    restart: float


@dataclass(frozen=True)
class Window:
    """What a channel may repeat after a crash: events first received in one of the last
    `messages` messages before a kill, or within `seconds` before it."""

    messages: int
    seconds: float


# The hand-over points (docs/delivery.md section 12) as windows. What may come again after a
# crash: WebSocket: messages written within the last commit before it; long poll: the
# response its next poll did not acknowledge yet (the last one), and those acknowledged
# within the last commit; webhook: the message answered 2xx within the last commit. A commit
# takes milliseconds; 1.5 s leaves room for a loaded machine.
WINDOWS = {
    "websocket": Window(messages=1, seconds=1.5),
    "long-poll": Window(messages=1, seconds=1.5),
    "webhook": Window(messages=1, seconds=1.5),
}


@dataclass
class Tally:
    """The crash test's verdict on one channel."""

    accepted: int
    answered: int
    missing: list[str]
    repeated: int  # extra copies of an AsyncIDResponse (same async-id; same uid if any)
    second_uid: dict[str, set[str]]  # two responses to one command (different uids)
    outside: list[str]  # repeats outside the window (with why)
    strays: list[str]  # responses to commands never accepted or sent
    oldest: float  # the longest a repeated event's first copy came before its kill (s)

    def line(self, channel: str) -> str:
        return (f"{channel}: accepted {self.accepted}, answered {self.answered}, missing "
                f"{len(self.missing)}, repeated {self.repeated} (outside the window "
                f"{len(self.outside)}, first copy at most {self.oldest:.2f} s before its kill), "
                f"two uids {len(self.second_uid)}, strays {len(self.strays)}")  # fmt: skip


def tally(inbox: Inbox, status: dict[str, int | None], kills: list[Kill], window: Window) -> Tally:
    """Compare what the client was promised (`status`: async-id -> POST status, None when the
    connection broke after sending) with what the channel delivered."""
    promised = [a for a, s in status.items() if s == 202]
    missing = [a for a in promised if not inbox.arrivals.get(a)]
    repeated = 0
    oldest = 0.0
    outside: list[str] = []
    second_uid: dict[str, set[str]] = {}
    for async_id, copies in inbox.arrivals.items():
        uids = {c.uid for c in copies}
        if len(uids) > 1:
            second_uid[async_id] = {str(u) for u in uids}
        first = copies[0]
        for again in copies[1:]:
            repeated += 1
            # the kill between the two copies: the first came from the killed process
            kill = next((k for k in kills if first.at <= k.restart <= again.at), None)
            if kill is None:
                outside.append(f"{async_id}: again at {again.at:.2f} with no restart since "
                               f"{first.at:.2f}")  # fmt: skip
                continue
            oldest = max(oldest, kill.at - first.at)
            if (kill.messages - first.message >= window.messages
                    and kill.at - first.at > window.seconds):  # fmt: skip
                outside.append(f"{async_id}: first in message {first.message} at "
                               f"{first.at:.2f}, kill after message {kill.messages} at "
                               f"{kill.at:.2f}, again at {again.at:.2f}")  # fmt: skip
    strays = [a for a in inbox.arrivals if a not in status]
    return Tally(len(promised), len(promised) - len(missing), missing, repeated, second_uid,
                 outside, strays, oldest)  # fmt: skip


def blocks(ids: list[str]) -> str:
    """`d900..d999, d1204` for a list of numbered async-ids (the report of missing ones)."""
    numbered = sorted((int(a.lstrip("abcdefghijklmnopqrstuvwxyz")), a) for a in ids)
    out: list[str] = []
    start = prev = None
    for n, a in numbered:
        if prev is not None and n == prev[0] + 1:
            prev = (n, a)
            continue
        if start is not None and prev is not None:
            out.append(start[1] if start == prev else f"{start[1]}..{prev[1]}")
        start = prev = (n, a)
    if start is not None and prev is not None:
        out.append(start[1] if start == prev else f"{start[1]}..{prev[1]}")
    return ", ".join(out)


# -- the application's side of each channel ----------------------------------------------


async def start_consumer(
    nursery: trio.Nursery, http: tuple[str, int], key: str, channel: str, inbox: Inbox
) -> None:
    """Open the application's channel of type `channel` and read it in `nursery`."""
    if channel == "websocket":
        status, body = await request(http, "PUT", "/v2/notification/websocket", key,
                                     {"serialization": {"cfg": {"include_uid": True}}})  # fmt: skip
        assert status == 201, (status, body)
        nursery.start_soon(read_websocket, http, key, inbox)
    elif channel == "webhook":
        port = await nursery.start(receive_webhook, inbox)
        hook = {"url": f"http://127.0.0.1:{port}/hook",
                "serialization": {"cfg": {"include_uid": True}}}  # fmt: skip
        status, body = await request(http, "PUT", "/v2/notification/callback", key, hook)
        assert status == 204, (status, body)
    else:
        assert channel == "long-poll", channel
        nursery.start_soon(long_poll, http, key, inbox)
        with trio.fail_after(10):  # the first pull creates the channel
            while (await request(http, "GET", "/v2/notification/channel", key))[0] != 200:  # noqa: ASYNC110
                await trio.sleep(0.02)


async def read_websocket(http: tuple[str, int], key: str, inbox: Inbox) -> None:
    """Connect, read messages, reconnect after every crash (until cancelled).

    It owns its TCP stream (trio-websocket's client leaves it open when the server goes first)
    and bounds the opening handshake (trio-websocket 0.12 waits for ever when the connection
    breaks before the server accepted the upgrade: a daemon killed at that moment).
    """
    while True:
        try:
            stream = await trio.open_tcp_stream(*http)
            async with stream, trio.open_nursery() as nursery:
                with trio.fail_after(3):
                    ws = await wrap_client_stream(
                        nursery, stream, http[0], WEBSOCKET, subprotocols=["wss", f"pelion_{key}"]
                    )
                inbox.connections += 1
                inbox.note("connected")
                try:
                    while True:
                        inbox.receive(json.loads(await ws.get_message()))
                finally:
                    nursery.cancel_scope.cancel()
        except* ERRORS as group:
            inbox.note(repr(group.exceptions))
        await trio.sleep(0.05)


async def long_poll(http: tuple[str, int], key: str, inbox: Inbox) -> None:
    """`GET /v2/notification/pull`, one after another (until cancelled), as Pelion's SDK."""
    while True:
        try:
            with trio.fail_after(POLL_LIMIT):
                status, body = await request(http, "GET", PULL, key)
        except NotSent:
            await trio.sleep(0.05)  # the daemon is down
            continue
        except ERRORS as exc:
            inbox.note(f"pull broke: {exc!r}")  # killed while the pull waited or answered
            await trio.sleep(0.05)
            continue
        if status == 200:
            inbox.connections += 1
            inbox.receive(json.loads(body))
        elif status != 204:
            inbox.note(f"pull: {status} {body[:100]!r}")
            await trio.sleep(0.05)


async def receive_webhook(
    inbox: Inbox, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """The callback URL's server on 127.0.0.1 (a free port, given to `task_status`)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(int(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(partial(_hook_connection, inbox), listeners)


async def _hook_connection(inbox: Inbox, stream: trio.SocketStream) -> None:
    """One kept-alive connection from the daemon: every request is noted, then answered 204."""
    inbox.connections += 1
    conn = h11.Connection(h11.SERVER)
    body: list[bytes] = []
    try:
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Data):
                    body.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    data = b"".join(body)
                    body.clear()
                    inbox.receive(json.loads(data) if data else {})
                    out = conn.send(h11.Response(status_code=204, headers=[]))
                    await stream.send_all(out + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
    except ERRORS as exc:
        inbox.note(f"webhook connection broke: {exc!r}")
