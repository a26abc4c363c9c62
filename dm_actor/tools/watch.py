"""`dm-actor watch`: print a server's notification-channel events as they arrive.

It registers the application's WebSocket channel (`PUT /v2/notification/websocket`), connects
to `/v2/notification/websocket-connect` with `Sec-WebSocket-Protocol: wss, pelion_<key>`, and
prints one line per event: JSON (the event's item with its `kind`) or a table row. After a
close with 1001 (another socket took the channel), 1006 (the connection broke), 1011 (no
channel, e.g. after a server restart) or 1012, it registers and connects again after a short
back-off. It stops on Ctrl-C, when the channel is deleted (1000), or at `--count`/`--duration`.
It never deletes the channel: events arriving while it is away wait on the server.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, NamedTuple, TextIO

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, wrap_client_stream
from wsproto.utilities import LocalProtocolError

from dm_actor.api.auth import ENV_VAR
from dm_actor.api.webhook import HttpClient, HttpError, Target, parse_target

if TYPE_CHECKING:
    import argparse

    from trio_websocket import WebSocketConnection

CHANNEL_PATH = "/v2/notification/websocket"
CONNECT_PATH = "/v2/notification/websocket-connect"
RECONNECT_CODES = frozenset((1001, 1006, 1011, 1012))
_MAX_MESSAGE = 64 << 20  # a 10,000-event message fits
_TABLE = "{:<8}  {:<21}  {:<32}  {:<16}  {}"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `watch` command to `dm-actor`'s subcommands."""
    parser = subparsers.add_parser(
        "watch", help="print notification-channel events as they arrive (WebSocket)"
    )
    parser.add_argument(
        "--server",
        default="http://127.0.0.1:8080",
        metavar="URL",
        help="the HTTP API (default http://127.0.0.1:8080)",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help=f"the access key (default: the first of ${ENV_VAR})"
    )
    parser.add_argument("--table", action="store_true", help="a readable table, not JSON lines")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N events")
    parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")


def run(args: argparse.Namespace) -> int:
    """Run `dm-actor watch`; the exit code (0: stopped, 1: failed, 2: bad arguments)."""
    key = args.api_key or next(iter(os.environ.get(ENV_VAR, "").replace(",", " ").split()), "")
    if not key:
        print(f"dm-actor watch: error: no key: give --api-key or set {ENV_VAR}", file=sys.stderr)
        return 2
    try:
        watcher = Watcher(args.server, key, sys.stdout, sys.stderr, table=args.table)
    except ValueError as exc:
        print(f"dm-actor watch: error: --server: {exc}", file=sys.stderr)
        return 2
    return trio.run(_until_interrupted, watcher, args.count, args.duration)


async def _until_interrupted(watcher: Watcher, count: int | None, duration: float | None) -> int:
    code = 0
    async with trio.open_nursery() as nursery:

        async def main() -> None:
            nonlocal code
            code = await watcher.run(count=count, duration=duration)
            nursery.cancel_scope.cancel()

        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            nursery.start_soon(main)
            async for _ in signals:
                if watcher.stopped:  # a second Ctrl-C: do not wait for the close handshake
                    nursery.cancel_scope.cancel()
                watcher.stop()  # close the socket (1000) and return
    return code


class Closed(NamedTuple):
    """How a connection ended: the close code (None: the count was reached)."""

    code: int | None
    reason: str
    delivered: bool  # at least one message came


class Failed(Exception):
    """Watching cannot go on (refused registration or key, or an unexpected close)."""


class Watcher:
    """One application's event watcher.

    Args:
        server: the HTTP API's base URL (http:// only).
        key: the access key.
        out: where event lines go.
        log: where connection notes and errors go.
        table: print table rows instead of JSON lines.
        backoff: the first reconnect delay; it doubles up to `max_backoff` while connecting
            fails, and starts over after a connection that delivered a message.

    Raises:
        ValueError: `server` is not a usable http:// URL.
    """

    def __init__(
        self,
        server: str,
        key: str,
        out: TextIO,
        log: TextIO,
        *,
        table: bool = False,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.channel: Target = parse_target(
            self.server + CHANNEL_PATH, {"Authorization": f"Bearer {key}"}
        )
        self.key = key
        self.out = out
        self.log = log
        self.table = table
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.events = 0
        self.connections = 0
        self.stopped = False
        self._connected_event = trio.Event()
        self._outer = trio.CancelScope()  # everything; cancelled by `stop()` ...
        self._reading: trio.CancelScope | None = None  # ... but this while connected

    async def wait_connected(self, connections: int = 1) -> None:
        """Until `connections` WebSocket connections have been made in all."""
        while self.connections < connections:
            await self._connected_event.wait()

    async def run(self, *, count: int | None = None, duration: float | None = None) -> int:
        """Watch (once) until a stop condition or `stop()`; the exit code (0: stopped,
        1: failed)."""
        if self.table:
            self._write(_TABLE.format("TIME", "KIND", "DEVICE / ASYNC-ID", "PATH", "DETAIL"))
        async with trio.open_nursery() as nursery:
            if duration is not None:
                nursery.start_soon(self._stop_after, duration)
            try:
                with self._outer:
                    await self._watch(count)
            except Failed as exc:
                print(f"dm-actor watch: error: {exc}", file=self.log)
                return 1
            finally:
                nursery.cancel_scope.cancel()
        return 0

    def stop(self) -> None:
        """Stop watching: a connected socket is closed normally (1000) first."""
        self.stopped = True
        (self._outer if self._reading is None else self._reading).cancel()

    async def _stop_after(self, duration: float) -> None:
        await trio.sleep(duration)
        self.stop()

    async def _watch(self, count: int | None) -> None:
        delay = self.backoff
        while count is None or self.events < count:
            try:
                await self._register()
                closed = await self._session(count)
            except (HttpError, HandshakeError, OSError) as exc:
                if self.connections == 0:  # never connected: the server is not there
                    raise Failed(f"cannot reach {self.server}: {exc}") from None
                closed = Closed(1006, str(exc), False)
            if closed.code is None:
                return  # stopped, or the count was reached
            if closed.code == 1000:
                print("the channel was deleted (1000): stopping", file=self.log)
                return
            if closed.code not in RECONNECT_CODES:
                raise Failed(f"the server closed the socket: {closed.code} {closed.reason}")
            if closed.delivered:
                delay = self.backoff
            print(f"closed with {closed.code}; reconnecting in {delay:g} s", file=self.log)
            await trio.sleep(delay)
            delay = min(delay * 2, self.max_backoff)

    async def _register(self) -> None:
        """Register the WebSocket channel (200 when it exists already)."""
        client = HttpClient(timeout=10)
        try:
            status, body = await client.request(b"PUT", self.channel, b"")
        finally:
            await client.aclose()
        if status not in (200, 201):
            text = body.decode(errors="replace")
            raise Failed(f"PUT {CHANNEL_PATH} answered {status} {text}".rstrip())

    async def _session(self, count: int | None) -> Closed:
        """One connection: print its events until it closes or `count` is reached.

        Raises:
            Failed: the server refused the key or sent something that is not JSON.
            HandshakeError: the WebSocket handshake failed.
            OSError: the TCP connection could not be made.
        """
        target = self.channel
        resource = target.path.decode().removesuffix(CHANNEL_PATH) + CONNECT_PATH
        stream = await trio.open_tcp_stream(target.host, target.port)
        closed = Closed(1006, "", False)
        failure: Exception | None = None
        try:
            async with stream, trio.open_nursery() as nursery:
                try:
                    closed = await self._connected(nursery, stream, target, resource, count)
                except (Failed, HandshakeError) as exc:  # raised here, not in a group
                    failure = exc
                nursery.cancel_scope.cancel()
        except* LocalProtocolError:
            # trio-websocket #184: a ping that came after our close frame is answered in the
            # LOCAL_CLOSING state; the socket is closing anyway.
            pass
        if failure is not None:
            raise failure
        return closed

    async def _connected(
        self,
        nursery: trio.Nursery,
        stream: trio.SocketStream,
        target: Target,
        resource: str,
        count: int | None,
    ) -> Closed:
        try:
            with trio.fail_after(10):
                ws = await wrap_client_stream(
                    nursery, stream, target.authority.decode(), resource,
                    subprotocols=["wss", f"pelion_{self.key}"], max_message_size=_MAX_MESSAGE,
                )  # fmt: skip
        except ConnectionRejected as exc:
            if exc.status_code == 401:
                raise Failed("the server refused the key (401)") from None
            raise Failed(f"the server refused the WebSocket ({exc.status_code})") from None
        except trio.TooSlowError:
            raise HandshakeError("no WebSocket handshake within 10 s") from None
        self.connections += 1
        self._connected_event.set()
        self._connected_event = trio.Event()
        print(f"connected to {self.server}", file=self.log)
        try:
            return await self._read(ws, count)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await ws.aclose()

    async def _read(self, ws: WebSocketConnection, count: int | None) -> Closed:
        delivered = False
        try:
            while True:
                with trio.CancelScope() as self._reading:
                    message = await ws.get_message()
                self._reading = None
                if self.stopped:
                    return Closed(None, "", delivered)
                delivered = True
                try:
                    parsed = json.loads(message)
                except ValueError:
                    raise Failed(f"not a JSON message: {str(message)[:80]!r}") from None
                for line in self.lines(parsed):
                    self._write(line)
                    self.events += 1
                    if count is not None and self.events >= count:
                        return Closed(None, "", delivered)
        except ConnectionClosed as exc:
            self._reading = None
            if exc.reason is None:
                return Closed(1006, "", delivered)
            return Closed(int(exc.reason.code), exc.reason.reason or "", delivered)

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def lines(self, message: dict[str, object]) -> list[str]:
        """The output lines of one `NotificationMessage`, one per event."""
        out = []
        for kind, items in message.items():
            if not isinstance(items, list):  # "events-lost": N, the server's gap marker
                lost = {"count": items}
                out.append(self._table_row(kind, lost) if self.table else _json_line(kind, lost))
                continue
            for item in items:
                event = dict(item) if isinstance(item, dict) else {"ep": item}
                out.append(self._table_row(kind, event) if self.table else _json_line(kind, event))
        return out

    def _table_row(self, kind: str, event: dict[str, object]) -> str:
        who = str(event.get("ep", event.get("id", "")))
        path = str(event.get("path", ""))
        if kind == "async-responses":
            detail = f"{event.get('status')} {event.get('error') or _payload(event)}"
        elif kind in ("registrations", "reg-updates"):
            resources = event.get("resources")
            n = len(resources) if isinstance(resources, list) else 0
            detail = f"{n} resources" + (", queue mode" if event.get("q") else "")
        else:
            detail = _payload(event)
        return _TABLE.format(time.strftime("%H:%M:%S"), kind, who, path, detail.strip())


def _json_line(kind: str, event: dict[str, object]) -> str:
    return json.dumps({"kind": kind, **event}, separators=(",", ":"))


def _payload(event: dict[str, object]) -> str:
    """A payload for reading: text when it is printable UTF-8, else hex (shortened)."""
    b64 = event.get("payload")
    if not isinstance(b64, str):
        return ""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return b64
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable():
        return text if len(text) <= 60 else text[:57] + "..."
    return f"0x{raw[:24].hex()}" + ("..." if len(raw) > 24 else "") + f" ({len(raw)} bytes)"
