"""Webhook (callback) channels: registration with a test PUT, and one delivery task each.

`Webhooks.register` checks the URL (http:// only) and headers, PUTs `{}` to the URL with the
headers (200 or 204 required), then opens the application's `CALLBACK` channel, or retargets
the existing one. Its delivery task PUTs one `NotificationMessage` at a time and takes the
next batch only after a 2xx; a failed batch is put back (unread) and re-sent after a back-off
of 1, 2, 4 … `backoff_max` seconds; after `fail_timeout` seconds of continuous failure the
channel is removed. `HttpClient` is a small keep-alive HTTP/1.1 client on h11 (no TLS).
This module never serves HTTP and never reads the supervisor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

import h11
import trio

from dm_actor import __version__
from dm_actor.api.channels import CALLBACK
from dm_actor.logformat import LOG_CONTEXT

if TYPE_CHECKING:
    from collections.abc import Mapping

    from dm_actor.api.channels import Channel, NotificationHub
    from dm_actor.api.schemas import Serialization

log = logging.getLogger(__name__)

#: URL plus header names and values, at most (Pelion's limit).
MAX_TARGET_CHARS = 400
_USER_AGENT = f"dm-actor/{__version__}".encode()
#: Headers the client sets itself; a registration may not set them.
_RESERVED = frozenset(
    ("host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
     "trailer", "expect", "keep-alive", "content-type")
)  # fmt: skip
_RECEIVE_SIZE = 65536
_EMPTY_OBJECT = b"{}"


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """Timers of callback delivery (seconds)."""

    request_timeout: float = 20.0  # one request: connect, send, read the answer
    backoff_initial: float = 1.0
    backoff_max: float = 120.0
    fail_timeout: float = 24 * 3600.0  # continuous failure before the channel is removed


class HttpError(Exception):
    """A request did not get an HTTP answer (refused, reset, timed out, malformed)."""


class Target(NamedTuple):
    """Where and how to PUT: a parsed http:// URL and the registration's headers."""

    url: str
    headers: tuple[tuple[str, str], ...]
    host: str
    port: int
    authority: bytes  # the Host header
    path: bytes  # the request target (path and query)


def parse_target(url: str, headers: Mapping[str, str]) -> Target:
    """Check a callback registration and parse its URL.

    Raises:
        ValueError: with the plain-string reason (the 400 body).
    """
    if len(url) + sum(len(k) + len(v) for k, v in headers.items()) > MAX_TARGET_CHARS:
        raise ValueError(f"URL and headers exceed {MAX_TARGET_CHARS} characters.")
    if not url.isascii():
        raise ValueError("Malformed URL: only ASCII is allowed (percent-encode the rest).")
    try:
        parts = urlsplit(url)
        port = parts.port or 80
    except ValueError:
        raise ValueError("Malformed URL.") from None
    if parts.scheme.lower() == "https":
        raise ValueError("Only http:// URLs are supported.")
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError("Malformed URL: an http:// URL with a host is required.")
    if parts.username is not None or parts.password is not None:
        raise ValueError("Malformed URL: user information is not supported.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    pairs = tuple(headers.items())
    for name, _ in pairs:
        if name.lower() in _RESERVED:
            raise ValueError(f"Header {name!r} is set by the server.")
    target = Target(url, pairs, parts.hostname, port, parts.netloc.encode(), path.encode())
    try:  # h11 checks header names and values, and the target, as it would on sending
        h11.Connection(h11.CLIENT).send(_request(b"PUT", target, 0))
    except h11.LocalProtocolError as exc:
        raise ValueError(f"Invalid header or URL: {exc}") from None
    return target


def _request(method: bytes, target: Target, length: int) -> h11.Request:
    headers = [
        (b"host", target.authority),
        (b"user-agent", _USER_AGENT),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % length),
        *((k.encode(), v.encode()) for k, v in target.headers),
    ]
    return h11.Request(method=method, target=target.path, headers=headers)


class HttpClient:
    """One keep-alive HTTP/1.1 connection at a time, reopened when the origin changes.

    Args:
        timeout: seconds for one request (connect, send, answer), else `HttpError`.
        max_body: answer bytes kept (the rest is read and dropped).
    """

    __slots__ = ("_conn", "_origin", "_stream", "max_body", "timeout")

    def __init__(self, timeout: float, max_body: int = 65536) -> None:
        self.timeout = timeout
        self.max_body = max_body
        self._stream: trio.SocketStream | None = None
        self._conn = h11.Connection(h11.CLIENT)
        self._origin: tuple[str, int] | None = None

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    async def request(self, method: bytes, target: Target, body: bytes) -> tuple[int, bytes]:
        """Send one request; its status and (the start of) its body.

        A kept-alive connection the peer closed meanwhile is reopened once.

        Raises:
            HttpError: no HTTP answer within `timeout`.
        """
        try:
            with trio.fail_after(self.timeout):
                for _ in range(2):
                    origin = (target.host, target.port)
                    reused = self._stream is not None and self._origin == origin
                    if not reused:
                        await self.aclose()
                        self._stream = await trio.open_tcp_stream(target.host, target.port)
                        self._conn = h11.Connection(h11.CLIENT)
                        self._origin = origin
                    answer = await self._exchange(method, target, body)
                    if answer is not None:
                        return answer
                    await self.aclose()
                    if not reused:
                        break
                raise HttpError("connection closed without an answer")
        except HttpError:
            await self.aclose()
            raise
        except trio.TooSlowError:
            await self.aclose()
            raise HttpError(f"no answer within {self.timeout:g} s") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            await self.aclose()
            raise HttpError(str(exc) or type(exc).__name__) from None

    async def _exchange(
        self, method: bytes, target: Target, body: bytes
    ) -> tuple[int, bytes] | None:
        """One request on the open connection; None if it closed before an answer started."""
        conn, stream = self._conn, self._stream
        assert stream is not None
        data = conn.send(_request(method, target, len(body)))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            return None
        status = 0
        kept = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if not status:
                    return None
                raise
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive_some(_RECEIVE_SIZE))
                except trio.BrokenResourceError:
                    conn.receive_data(b"")
            elif type(event) is h11.Response:
                status = event.status_code
            elif type(event) is h11.Data:
                kept += event.data[: self.max_body - len(kept)]
            elif type(event) is h11.EndOfMessage:
                break
            elif type(event) is h11.ConnectionClosed:
                return None
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return status, bytes(kept)


class Webhook:
    """A callback channel's target and delivery state (kept in `Channel.extra`)."""

    __slots__ = ("_changed", "attempts", "failing_since", "last_error", "scope", "target")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.failing_since: float | None = None
        self.attempts = 0  # deliveries tried, for statistics
        self.last_error: str | None = None
        self.scope = trio.CancelScope()
        self._changed = trio.Event()

    def retarget(self, target: Target) -> None:
        """Deliver to `target` from now on; a pending back-off ends now."""
        self.target = target
        self.failing_since = None
        self._changed.set()
        self._changed = trio.Event()

    async def back_off(self, delay: float) -> bool:
        """Sleep `delay` seconds, or less when `retarget` is called meanwhile (then True)."""
        with trio.move_on_after(delay):
            await self._changed.wait()
            return True
        return False


class Webhooks:
    """The callback channels of a hub: registration, lookup, deletion, delivery tasks.

    Args:
        hub: the notification hub; its `nursery` hosts the delivery tasks.
        options: timers of delivery.
    """

    def __init__(self, hub: NotificationHub, options: WebhookOptions | None = None) -> None:
        self.hub = hub
        self.options = options or WebhookOptions()

    def get(self, app: str) -> Webhook | None:
        channel = self.hub.channels.get(app)
        if channel is None or channel.mechanism != CALLBACK:
            return None
        assert isinstance(channel.extra, Webhook)
        return channel.extra

    async def register(
        self, app: str, target: Target, serialization: Serialization
    ) -> tuple[int, str] | None:
        """Test `target` with a PUT of `{}`, then make it `app`'s callback channel.

        Returns:
            None on success, else the refusal's status and plain-string reason.
        """
        if self._other_channel(app):
            return 400, "Another type of notification channel already exists."
        client = HttpClient(self.options.request_timeout)
        try:
            status, _ = await client.request(b"PUT", target, _EMPTY_OBJECT)
        except HttpError as exc:
            return 400, f"Given URL is not accessible: {exc}."
        finally:
            await client.aclose()
        if status not in (200, 204):
            return 400, f"Given URL is not accessible: the test PUT got {status}."
        if self._other_channel(app):  # opened while the test ran
            return 400, "Another type of notification channel already exists."
        hub = self.hub
        hook = self.get(app)
        if hook is not None:
            hub.reconfigure(hub.channels[app], serialization)
            hook.retarget(target)
            hub.persist(hub.channels[app], target.url, dict(target.headers))
            return None
        self.start(app, target, serialization)
        return None

    def start(self, app: str, target: Target, serialization: Serialization) -> None:
        """Open `app`'s callback channel to `target` and its delivery task (no test PUT: a
        registration that passed it, or one restored from the store)."""
        hub = self.hub
        channel = hub.open(app, CALLBACK, serialization)
        hub.persist(channel, target.url, dict(target.headers))
        channel.extra = hook = Webhook(target)
        assert hub.nursery is not None, "the hub is not running"
        hub.nursery.start_soon(self.deliver, channel, hook)

    def delete(self, app: str) -> bool:
        """Remove `app`'s callback channel, its queue and its delivery task."""
        hook = self.get(app)
        if hook is None:
            return False
        hook.scope.cancel()
        self.hub.delete(app)
        return True

    def _other_channel(self, app: str) -> bool:
        channel = self.hub.channels.get(app)
        return channel is not None and channel.mechanism != CALLBACK

    async def deliver(self, channel: Channel, hook: Webhook) -> None:
        """Deliver `channel`'s messages to `hook.target` until the channel is removed."""
        # (started from the request that set the callback up, it inherited that request's
        # log context: its lines are the channel's, not that request's)
        LOG_CONTEXT.set(None)
        options = self.options
        client = HttpClient(options.request_timeout)
        delay = options.backoff_initial
        with hook.scope:
            try:
                while True:
                    await channel.wait()
                    if channel.closed:
                        return
                    message, batch = channel.take()
                    hook.attempts += 1
                    started = trio.current_time()
                    try:
                        status, _ = await client.request(b"PUT", hook.target, message)
                        error = None if 200 <= status < 300 else f"answered {status}"
                    except HttpError as exc:
                        error = str(exc)
                    if error is None:
                        self.hub.delivered(channel, batch)
                        hook.failing_since = hook.last_error = None
                        delay = options.backoff_initial
                        continue
                    channel.unread(batch)
                    hook.last_error = error
                    if hook.failing_since is None:
                        hook.failing_since = started
                        delay = options.backoff_initial
                    if trio.current_time() - hook.failing_since >= options.fail_timeout:
                        log.warning(
                            "callback %s of %s failed for %.0f s (%s): channel removed",
                            hook.target.url, channel.app, options.fail_timeout, error,
                        )  # fmt: skip
                        if self.hub.channels.get(channel.app) is channel:
                            self.hub.delete(channel.app)
                        return
                    log.info("callback %s: %s; retry in %g s", hook.target.url, error, delay)
                    retargeted = await hook.back_off(delay)
                    delay = (
                        options.backoff_initial
                        if retargeted
                        else min(delay * 2, options.backoff_max)
                    )
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
