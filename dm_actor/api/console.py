"""The operator's web console: its static page, and the administrators' routes it calls.

`GET /console/` and its assets (`console_static/`: plain HTML, CSS and JavaScript, no build
step, nothing fetched from elsewhere) are served without a key: a browser's navigation sends
none. Everything the page shows comes from the API with an administrator key (kept in the
browser's session storage), through the routes under `/admin/` (docs/api.md,
"Administrators' console routes"):

- `GET /admin/overview`: the server at a glance;
- `GET /admin/devices/{id}`: one device with its resources named from the bundled models;
- `POST /admin/device-requests/{id}`: a device request in the administrator's own name: its
  AsyncIDResponse never goes to an application's channel, but to `GET
  /admin/async-responses/{async-id}` (decoded) and the event tap;
- `PUT|DELETE /admin/subscriptions/{id}/{path}`, `GET /admin/subscriptions/{id}`: the
  administrator's own observations (shared with applications' on the device, as theirs are
  with each other);
- `GET /admin/events`: the event tap, a WebSocket (`tap.py`: every event of the server,
  bounded per subscriber and dropped beyond, never holding back an application's channel).

Values are decoded here (TLV, SenML JSON/CBOR, LwM2M JSON/CBOR, CBOR, text, opaque), the
untyped ones (TLV) by the data type the bundled models give their resource.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
from collections import OrderedDict, deque
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import trio
from trio_websocket import ConnectionClosed

from dm_actor.actors.subscriptions import Pending
from dm_actor.actors.supervisor import Rejected
from dm_actor.address import is_session
from dm_actor.api.auth import is_admin
from dm_actor.api.channels import iso_time
from dm_actor.api.routes import (
    ADMIN_ONLY,
    BAD_METHOD,
    NO_CONTENT,
    NOT_FOUND_ROUTE,
    OK_EMPTY,
    Request,
    Response,
    error_v3,
    json,
    rejected,
    text,
)
from dm_actor.api.tap import AdminResults, EventTap
from dm_actor.coap.numbers import content_format_for
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import (
    ContentDecodeError,
    ObjLink,
    UnsupportedContentFormat,
    tlv_bool,
    tlv_float,
    tlv_int,
    tlv_objlnk,
    tlv_str,
)
from dm_actor.lwm2m.content.values import path_ids
from dm_actor.lwm2m.models import object_model, resource_model
from dm_actor.lwm2m.resource_list import listed_resources

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_websocket import WebSocketConnection

    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.directory import Gone
    from dm_actor.actors.events import ChannelEvent
    from dm_actor.api.channels import NotificationHub
    from dm_actor.api.routes import Api
    from dm_actor.api.tap import TapSubscriber

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "console_static"
_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".txt": b"text/plain; charset=utf-8",
}
#: every asset's answer: no other origin's code, no framing, no referrer
_SECURITY = [
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
]  # fmt: skip
MOVED = (301, [(b"location", b"/console/"), (b"content-length", b"0")], b"")
NOT_ALLOWED = (405, [(b"allow", b"GET"), (b"content-type", b"text/plain")], b"Method not allowed.")
#: events in one tap message, at most (the sender takes what waits, up to this)
TAP_BATCH = 200
#: payload bytes decoded for a tap event, at most (bigger ones are shown undecoded)
DECODE_LIMIT = 4096
#: administrators' device requests remembered (their path, to decode the answer)
REQUESTS_REMEMBERED = 1000
_EVENTS_PER_SECOND_WINDOW = 10.0  # s: the rate in the overview is over about this long
_encode = msgspec.json.Encoder().encode
_ASYNC = "async-responses"


class Console:
    """The console's assets, the `/admin/` routes and the event tap, over one `Api`.

    `install(hub)` hooks the tap and the administrators' results into the notification hub.
    """

    def __init__(
        self,
        api: Api,
        *,
        ping_interval: float = 30.0,
        tap: EventTap | None = None,
        results: AdminResults | None = None,
    ) -> None:
        self.api = api
        self.tap = tap or EventTap()
        self.results = results or AdminResults()
        self.ping_interval = ping_interval  # a tap not taking a message this long is closed
        self.too_slow = 0  # taps closed for not taking a message in time
        # administrators' device requests: (owner, async-id) -> (device, method, uri)
        self.requests: OrderedDict[tuple[str, str], tuple[str, str, str]] = OrderedDict()
        self._rates: deque[tuple[float, int]] = deque()  # (time, events published)
        self._assets: dict[str, tuple[bytes, bytes, bytes]] | None = None
        # each event shown once for every tap: id -> (the event, kept alive so that its id
        # is not reused while here; its JSON), the latest `_SHOWN_CACHE`
        self._shown_json: OrderedDict[int, tuple[ChannelEvent, bytes]] = OrderedDict()

    def install(self, hub: NotificationHub) -> None:
        hub.tap = self.tap
        hub.admin_sink = self.results

    # -- the static page --------------------------------------------------------------------

    def assets(self) -> dict[str, tuple[bytes, bytes, bytes]]:
        """name -> (content type, ETag, body) of every file of `console_static` (read once)."""
        if self._assets is None:
            found = {}
            for path in sorted(STATIC.iterdir()):
                kind = _TYPES.get(path.suffix)
                if kind is not None and path.is_file():
                    body = path.read_bytes()
                    etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:16].encode()
                    found[path.name] = (kind, etag, body)
            self._assets = found
        return self._assets

    def static(self, method: bytes, segments: list[str], if_none_match: bytes | None) -> Response:
        """`GET /console/` (the page) and `/console/{asset}`; `/console` moves to `/console/`."""
        if method not in (b"GET", b"HEAD"):
            return NOT_ALLOWED
        if segments == ["console"]:
            return MOVED
        name = "/".join(segments[1:]) or "index.html"
        found = self.assets().get(name)
        if found is None:
            return text(404, "Not found.")
        kind, etag, body = found
        headers = [(b"content-type", kind), (b"etag", etag), *_SECURITY]
        if if_none_match == etag:
            return 304, headers, b""
        return 200, headers, body if method == b"GET" else b""

    # -- the administrators' routes ---------------------------------------------------------

    async def dispatch(self, req: Request) -> Response:
        """A request under `/admin/` (an administrator key only; an unknown route or method
        is answered as any other, 404 / 405)."""
        seg, method = req.segments, req.method
        allowed = _allowed(seg)
        if allowed is None:
            return NOT_FOUND_ROUTE
        if method not in allowed:
            return BAD_METHOD
        if not req.admin:
            return ADMIN_ONLY
        what = seg[1]
        if what == "overview":
            return json(200, self.overview())
        if what == "devices":
            return self.device(seg[2], req.app)
        if what == "device-requests":
            if method == b"POST":
                return await self._submit(req, seg[2])
            return self.api._queue_view(seg[2])
        if what == "async-responses":
            return self.result(req.app, seg[2])
        return await self._subscriptions(req)

    def overview(self) -> dict[str, object]:
        """The server at a glance (what `/metrics` reads, in one small JSON object)."""
        sup = self.api.sup
        registry = sup.registry
        store = sup.store
        hub = self.api.hub
        published = sup.events.published
        now = trio.current_time()
        rates = self._rates
        if not rates or now - rates[-1][0] >= 1.0:
            rates.append((now, published))
        while len(rates) > 2 and now - rates[1][0] >= _EVENTS_PER_SECOND_WINDOW:
            rates.popleft()
        since, then = rates[0]
        rate = (published - then) / (now - since) if now - since >= 0.5 else 0.0
        tap = self.tap
        return {
            "time": iso_time(now + sup.wall_offset),
            "devices_registered": len(sup.by_endpoint),
            "devices_deregistered": len(registry.directory),
            "commands_in_flight": sum(len(c) for c in sup.commands.unfinished.values()),
            "commands_accepted": sup.statistics.get("commands_accepted", 0),
            "events_published": published,
            "events_per_second": round(rate, 2),
            "channels": len(hub.channels),
            "events_waiting": sum(len(c) for c in hub.channels.values()),
            "store_backlog": store.backlog(),
            "answers_waiting": registry.awaiting,
            "store_healthy": store.healthy(),
            "taps": len(tap.subscribers),
            "taps_dropped": sum(s.dropped for s in tap.subscribers),
        }

    def device(self, device_id: str, owner: str) -> Response:
        """One device: its directory entry, transport, resources by name, the paths observed
        (for anyone) and those `owner` (an administrator) subscribed to."""
        sup = self.api.sup
        actor = sup.by_endpoint.get(device_id)
        found: DeviceActor | Gone | None = actor or sup.registry.directory.get(device_id)
        if found is None:
            return error_v3(404, "not_found", "Device not found.")
        data: dict[str, object] = msgspec.to_builtins(self.api._device_data(found))
        resources: list[dict[str, object]] = []
        objects: dict[str, str] = {}
        if actor is not None:
            # (`security_mode` says what the device must use; this, what it uses now)
            if actor.conn is not None:
                data["transport"] = "tcp"
            else:
                secure = actor.addr is not None and is_session(actor.addr)
                data["transport"] = "dtls" if secure else "udp"
            for entry in listed_resources(actor.reg.objects):
                ids = path_ids(entry.uri)
                model = object_model(ids[0])
                if model is not None:
                    objects[str(ids[0])] = model.name
                r = resource_model(ids[0], ids[2]) if len(ids) >= 3 else None
                resources.append({
                    "path": entry.uri,
                    "name": "" if r is None else r.name,
                    "operations": "" if r is None else r.operations,
                    "type": "" if r is None else r.type,
                    "units": "" if r is None else r.units,
                    "multiple": False if r is None else r.multiple,
                    "observable": entry.obs,
                })  # fmt: skip
        data["objects"] = objects
        data["resources"] = resources
        data["observed"] = sup.subscriptions_of(device_id) or []
        data["subscribed"] = sup.subscriptions_of(device_id, owner) or []
        return json(200, data)

    async def _submit(self, req: Request, device_id: str) -> Response:
        """A device request in the administrator's name (`POST /v2/device-requests`'s body and
        query; `async-id` optional: one is made): 202 `{"async-response-id": ...}`."""
        query = dict(req.query)
        async_id = query.setdefault("async-id", "console-" + secrets.token_hex(8))
        own = Request(req.method, req.segments, query, req.body, req.app, req.content_type)
        status, headers, body = await self.api._submit(own, device_id)
        if status != 202:
            return status, headers, body
        method = _request_method(req.body)
        self._remember(req.app, async_id, (device_id, method, _request_uri(req.body)))
        return json(202, {"async-response-id": async_id})

    def _remember(self, owner: str, async_id: str, request: tuple[str, str, str]) -> None:
        """Keep an administrator's request (its device and path decode its answer)."""
        requests = self.requests
        requests[owner, async_id] = request
        requests.move_to_end((owner, async_id))
        while len(requests) > REQUESTS_REMEMBERED:
            requests.popitem(last=False)

    def result(self, owner: str, async_id: str) -> Response:
        """`GET /admin/async-responses/{id}`: `done` with the AsyncIDResponse and its decoded
        values, `pending` while the command is unfinished, else 404."""
        request = self.requests.get((owner, async_id))
        item = self.results.get(owner, async_id)
        if item is not None:
            base = None if request is None else request[2]
            if base is None and isinstance(item.get("path"), str):
                base = str(item["path"])
            out: dict[str, object] = {"state": "done", "response": item}
            out.update(decoded(item, base))
            return json(200, out)
        device = self.api.sup.commands.unfinished.get(owner, {}).get(async_id)
        if device is not None or request is not None:
            return json(200, {"state": "pending", "device": device or (request and request[0])})
        return error_v3(404, "not_found", "No such request of this administrator.")

    async def _subscriptions(self, req: Request) -> Response:
        seg, method, sup = req.segments, req.method, self.api.sup
        device_id = seg[2]
        if len(seg) == 3:
            paths = sup.subscriptions_of(device_id, req.app)
            return text(404, "DEVICE_NOT_FOUND") if paths is None else json(200, paths)
        path = "/" + "/".join(seg[3:]).lstrip("/")
        if method == b"PUT":
            if sup.store_behind():
                return text(503, "STORE_IS_BEHIND")
            wait = sup.settings.delivery.subscribe_wait
            result = await sup.subscriptions.subscribe_waiting(device_id, path, req.app, wait)
            if isinstance(result, Rejected):
                return rejected(result)
            await sup.store.durable()
            if isinstance(result, Pending):
                self._remember(req.app, result.async_response_id, (device_id, "OBSERVE", path))
                return json(202, {"async-response-id": result.async_response_id})
            return OK_EMPTY
        if device_id not in sup.by_endpoint:
            return text(404, "DEVICE_NOT_FOUND")
        sup.unsubscribe(device_id, path, req.app)
        await sup.store.durable()
        return NO_CONTENT

    # -- the event tap ----------------------------------------------------------------------

    async def serve_tap(self, ws: WebSocketConnection) -> None:
        """Send the tap's events to an administrator's WebSocket until it closes: messages
        `{"events": [...], "dropped": N}` (`dropped`: this socket's events dropped so far).
        A socket that does not take a message within `ping_interval`, or answer a ping
        within it, is closed."""
        subscriber = self.tap.subscribe()
        if subscriber is None:
            with trio.move_on_after(5):
                await ws.aclose(1013, "Too many event taps open.")
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, ws, nursery.cancel_scope)
                nursery.start_soon(_ping, ws, self.ping_interval, nursery.cancel_scope)
                with contextlib.suppress(ConnectionClosed):
                    await self._send_tap(ws, subscriber)
                nursery.cancel_scope.cancel()
        finally:
            self.tap.unsubscribe(subscriber)

    async def _send_tap(self, ws: WebSocketConnection, subscriber: TapSubscriber) -> None:
        limit = self.ping_interval
        await ws.send_message(_encode({"events": [], "dropped": 0}).decode())
        while True:
            await subscriber.wait()
            batch = subscriber.take(TAP_BATCH)
            events = []
            for n, event in enumerate(batch, 1):
                events.append(self._shown_once(event))  # (decoding may cost ms: once)
                if n % _SHOWN_PER_PASS == 0:
                    await trio.lowlevel.checkpoint()  # (other tasks run in between)
            dropped = str(subscriber.dropped).encode()
            message = b'{"events":[' + b",".join(events) + b'],"dropped":' + dropped + b"}"
            await trio.lowlevel.checkpoint()
            try:
                with trio.fail_after(limit):
                    await ws.send_message(message.decode())
            except trio.TooSlowError:
                self.too_slow += 1
                log.info("event tap closed: a message not taken within %g s", limit)
                return

    def _shown_once(self, event: ChannelEvent) -> bytes:
        """`_shown(event)` as JSON, made once for all the taps that send it."""
        cache = self._shown_json
        found = cache.get(id(event))
        if found is not None and found[0] is event:
            return found[1]
        shown = _encode(self._shown(event))
        cache[id(event)] = (event, shown)
        if len(cache) > _SHOWN_CACHE:
            cache.popitem(last=False)
        return shown

    def _shown(self, event: ChannelEvent) -> dict[str, object]:
        """One event as the tap sends it: kind, item, to whom, and the decoded values."""
        kind, item, owners = event.kind, event.item, event.owners
        out: dict[str, object] = {"kind": kind, "item": item}
        if owners is None:
            out["to"] = "all"
        else:
            out["to"] = sorted("admin" if is_admin(o) else o[:8] for o in owners)
        if not isinstance(item, dict):
            return out
        base = item.get("path")
        if kind == _ASYNC and owners is not None and len(owners) == 1:
            request = self.requests.get((next(iter(owners)), str(item.get("id"))))
            if request is not None:  # (an administrator's: its device and path)
                out["ep"], out["path"] = request[0], request[2]
                base = request[2]
        payload = item.get("payload")
        if isinstance(payload, str) and len(payload) <= DECODE_LIMIT * 4 // 3 + 4:
            out.update(decoded(item, base if isinstance(base, str) else None))
        return out


#: events a tap shows (decodes) per scheduler pass: a burst of large notifications, times
#: the taps open, must not hold the event loop
_SHOWN_PER_PASS = 8
#: events kept shown (as JSON) for the other taps: a burst reaches every tap within moments
_SHOWN_CACHE = 256

_GET = frozenset((b"GET",))
_ROUTES = {  # /admin/{what}/{device-id or async-id}: the methods each takes
    "devices": _GET,
    "device-requests": frozenset((b"GET", b"POST")),
    "async-responses": _GET,
    "subscriptions": _GET,
}


def _allowed(seg: list[str]) -> frozenset[bytes] | None:
    """The methods the `/admin/` route of `seg` takes; None for no such route."""
    n, what = len(seg), seg[1] if len(seg) > 1 else ""
    if n == 2:
        return _GET if what in ("overview", "events") else None
    if not seg[2]:
        return None
    if n == 3:
        return _ROUTES.get(what)
    return frozenset((b"PUT", b"DELETE")) if what == "subscriptions" else None


async def _drain(ws: WebSocketConnection, scope: trio.CancelScope) -> None:
    """Read (and ignore) what the client sends, to notice when it closes."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed:
        scope.cancel()


async def _ping(ws: WebSocketConnection, interval: float, scope: trio.CancelScope) -> None:
    """Ping every `interval`; no pong within it ends the tap."""
    try:
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as ping:
                await ws.ping()
            if ping.cancelled_caught:
                break
    except ConnectionClosed:
        pass
    scope.cancel()


_decode_body = msgspec.json.Decoder(dict[str, object]).decode


def _request_field(body: bytes, name: str) -> str:
    try:
        value = _decode_body(body).get(name)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


def _request_uri(body: bytes) -> str:
    uri = _request_field(body, "uri").partition("?")[0]
    return uri if uri.startswith("/") else "/" + uri


def _request_method(body: bytes) -> str:
    return _request_field(body, "method")


# -- values ----------------------------------------------------------------------------------


def decoded(item: dict[str, object], base: str | None) -> dict[str, object]:
    """`{"values": [{path, name, value, units}, ...]}` of an AsyncIDResponse or notification
    `item` (its base64 `payload` in its `ct`), or `{"decode_error": why}`; `{}` without a
    payload. `base` is the request's path (TLV, text and opaque need it)."""
    payload_b64 = item.get("payload")
    if not isinstance(payload_b64, str) or not payload_b64:
        return {}
    ct = item.get("ct")
    content_format = content_format_for(ct) if isinstance(ct, str) else 0
    try:
        payload = base64.b64decode(payload_b64, validate=True)
        if content_format is None:
            raise UnsupportedContentFormat(-1)
        values = content.decode(content_format, payload, base)
    except (binascii.Error, ContentDecodeError, UnsupportedContentFormat) as exc:
        return {"decode_error": str(exc)}
    shown = []
    for v in values[:1000]:
        name, units, data_type = "", "", ""
        try:
            ids = path_ids(v.path)
        except ContentDecodeError:
            ids = ()
        model = resource_model(ids[0], ids[2]) if len(ids) >= 3 else None
        if model is not None:
            name, units, data_type = model.name, model.units, model.type
        value = _json_value(v.value, data_type)
        shown.append({"path": v.path, "name": name, "value": value, "units": units})
    return {"values": shown}


_TLV_READERS: dict[str, Callable[[bytes], object]] = {
    "String": tlv_str,
    "Integer": tlv_int,
    "Time": tlv_int,
    "Unsigned Integer": lambda raw: tlv_int(raw, signed=False),
    "Float": tlv_float,
    "Boolean": tlv_bool,
    "Objlnk": lambda raw: str(tlv_objlnk(raw)),
}


#: integers at least this large are shown as hex text
_BIG = 2**64


def _json_value(value: object, data_type: str | None) -> object:
    """A decoded value as JSON: untyped bytes read by the model's data type, else shown as
    `0x...` hex (at most 64 bytes)."""
    if isinstance(value, ObjLink):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -_BIG < value < _BIG:
        # (a CBOR bignum: JSON numbers this large lose precision in every browser, and over
        # 4,300 digits Python refuses to write one; hex has no such limit)
        text = hex(value)
        return text[:130] + ("..." if len(text) > 130 else "")
    if not isinstance(value, bytes):
        return value
    reader = _TLV_READERS.get(data_type or "")
    if reader is not None:
        try:
            return reader(value)
        except ContentDecodeError:
            pass
    return "0x" + value[:64].hex() + ("..." if len(value) > 64 else "")
