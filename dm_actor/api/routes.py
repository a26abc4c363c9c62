"""The REST endpoints: Pelion Connect paths mapped onto the supervisor and the hub.

`Api.dispatch` takes a parsed, authenticated request and returns `(status, headers, body)`.
Device-server paths answer errors with Pelion's plain-string codes; `/v3` paths with Pelion's
JSON `ErrorResponse`. The long poll and the WebSocket, which need the connection, live in
`server.py`. Nothing here touches a socket.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

import msgspec
import trio

from dm_actor.actors.directory import Gone
from dm_actor.actors.subscriptions import Pending, canonical
from dm_actor.actors.supervisor import Presubscription, Rejected
from dm_actor.api import devices
from dm_actor.api.auth import is_admin
from dm_actor.api.channels import LONG_POLLING, WEB_SOCKET, iso_time
from dm_actor.api.credentials import device_credentials
from dm_actor.api.schemas import (
    CallbackChannel,
    CallbackRequest,
    ChannelRequest,
    DeliveryMechanism,
    DeviceData,
    DeviceList,
    DeviceQueueView,
    DeviceRequest,
    ErrorResponse,
    PresubscriptionEntry,
    QueuedCommand,
    Resource,
    WebsocketChannel,
)
from dm_actor.api.webhook import Webhooks, parse_target
from dm_actor.coap.numbers import content_format_for
from dm_actor.credentials import security_mode
from dm_actor.lwm2m.resource_list import listed_resources

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.api.channels import NotificationHub
    from dm_actor.api.webhook import WebhookOptions
    from dm_actor.delivery.queue import CommandStatus

Headers = list[tuple[bytes, bytes]]
Response = tuple[int, Headers, bytes]

TEXT: Headers = [(b"content-type", b"text/plain; charset=utf-8")]
JSON: Headers = [(b"content-type", b"application/json")]
URI_LIST: Headers = [(b"content-type", b"text/uri-list")]
NO_CONTENT: Response = (204, [], b"")
ACCEPTED: Response = (202, [], b"")
OK_EMPTY: Response = (200, [], b"")

MALFORMED = "MALFORMED_JSON_CONTENT"
TOO_MANY_PRESUBSCRIPTIONS = "TOO_MANY_PRESUBSCRIPTIONS"
#: distinct resource paths in one application's pre-subscriptions (Pelion's limit): each is
#: matched against every registering device's resources
MAX_PRESUBSCRIPTION_PATHS = 256
_ALL_OBSERVABLE = ("/*",)  # a pre-subscription without resource-path: every resource

_decode_device_request = msgspec.json.Decoder(DeviceRequest).decode
_decode_channel = msgspec.json.Decoder(ChannelRequest, strict=False).decode
_decode_callback = msgspec.json.Decoder(CallbackRequest, strict=False).decode
_decode_presubscriptions = msgspec.json.Decoder(list[PresubscriptionEntry]).decode
#: the errors a decoder raises for a body it refuses (msgspec raises RecursionError for
#: nesting deeper than the C stack allows: it is the client's malformed JSON, too)
_BAD_JSON = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)
_encode = msgspec.json.Encoder().encode
_b64decode = base64.b64decode


def _json_media_type(content_type: bytes | None) -> bool:
    """Whether a body of `content_type` may be read as JSON: none given (curl -d sets one,
    many clients none), `application/json` or a `+json` type, any parameters."""
    if content_type is None:
        return True
    media = content_type.partition(b";")[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


#: the /v2 routes whose writes change what the store keeps for an application
_KEPT_SETTINGS = frozenset(("notification", "subscriptions"))
_WRITES = frozenset((b"PUT", b"POST", b"DELETE"))


def text(status: int, body: str) -> Response:
    return status, TEXT, body.encode()


def json(status: int, value: object) -> Response:
    return status, JSON, _encode(value)


def error_v3(status: int, kind: str, message: str) -> Response:
    return json(status, ErrorResponse(code=status, type=kind, message=message))


def rejected(r: Rejected) -> Response:
    return text(r.status, r.code)


UNSUPPORTED_MEDIA_TYPE = text(415, "Content-Type must be application/json.")
NOT_FOUND_ROUTE = error_v3(404, "not_found", "No such resource.")
BAD_METHOD = error_v3(405, "method_not_allowed", "Method not allowed on this resource.")
#: an application key on an administrator's route (docs/api.md, "Administrator keys")
ADMIN_ONLY = error_v3(403, "forbidden", "This route needs an administrator key.")
#: an administrator key on a route of an application's own (it owns no channel)
NOT_AN_ACCESS_KEY = error_v3(
    403, "forbidden", "Forbidden. The authorization token used is not an access key."
)


class Request:
    """One parsed HTTP request: the path as percent-decoded segments after the first `/`."""

    __slots__ = ("app", "body", "content_type", "method", "query", "segments")

    def __init__(
        self,
        method: bytes,
        segments: list[str],
        query: dict[str, str],
        body: bytes,
        app: str,
        content_type: bytes | None = None,
    ) -> None:
        self.method = method
        self.segments = segments
        self.query = query
        self.body = body
        self.app = app
        self.content_type = content_type

    @property
    def admin(self) -> bool:
        """Whether an administrator key sent it (it owns no channel: `auth.is_admin`)."""
        return is_admin(self.app)

    @property
    def json_refused(self) -> bool:
        """A JSON route's body that is declared as something else (415)."""
        return bool(self.body.strip()) and not _json_media_type(self.content_type)


class Api:
    """The REST handlers over one supervisor and one notification hub.

    Args:
        sup: the running supervisor.
        hub: the notification hub (channels).
        webhooks: the callback channels (default: over `hub` with default timers).

    Times are dated with the supervisor's injected wall clock (`sup.wall_offset`), never
    with a clock of the API's own.
    """

    def __init__(
        self,
        sup: Supervisor,
        hub: NotificationHub,
        webhooks: Webhooks | None = None,
    ) -> None:
        self.sup = sup
        self.hub = hub
        self.webhooks = webhooks or Webhooks(hub)
        self.max_presubscriptions = 1024  # entries per application (Pelion's limit)
        #: the administrators' routes under `/admin/` (`console.Console.dispatch`)
        self.admin: Callable[[Request], Awaitable[Response]] | None = None
        self._v2: dict[str, Callable[[Request], Awaitable[Response]]] = {
            "device-requests": self._device_requests,
            "notification": self._notification,
            "subscriptions": self._subscriptions,
            "endpoints": self._endpoints,
        }

    @classmethod
    def create(
        cls, sup: Supervisor, hub: NotificationHub, webhook_options: WebhookOptions | None = None
    ) -> Api:
        return cls(sup, hub, Webhooks(hub, webhook_options))

    def wall(self, t: float) -> str:
        """The wall-clock time (ISO 8601) of `t`, a Trio time."""
        return iso_time(t + self.sup.wall_offset)

    async def dispatch(self, req: Request) -> Response:
        seg = req.segments
        if len(seg) >= 2 and seg[0] == "v2":
            handler = self._v2.get(seg[1])
            if handler is None:
                return NOT_FOUND_ROUTE
            if req.admin and _application_only(seg[1], req.method):
                return NOT_AN_ACCESS_KEY
            if seg[1] in _KEPT_SETTINGS and req.method in _WRITES:
                # a channel or (pre-)subscription change is answered once it is stored, and
                # refused while the store cannot keep it (a full disk): a 2xx is a promise
                if self.sup.store_behind():
                    return text(503, "STORE_IS_BEHIND")
                response = await handler(req)
                if response[0] < 300:
                    await self.sup.store.durable()
                return response
            return await handler(req)
        elif len(seg) >= 2 and seg[0] == "v3" and seg[1] == "devices":
            return await self._devices(req)
        elif len(seg) >= 2 and seg[0] == "v3" and seg[1] == "device-credentials":
            if not req.admin:
                return ADMIN_ONLY
            return await device_credentials(self.sup, req)
        elif seg and seg[0] == "admin" and self.admin is not None:
            return await self.admin(req)
        return NOT_FOUND_ROUTE

    # -- device requests ------------------------------------------------------------------

    async def _device_requests(self, req: Request) -> Response:
        seg = req.segments
        if len(seg) != 3 or not seg[2]:
            return NOT_FOUND_ROUTE
        if req.method == b"POST":
            return await self._submit(req, seg[2])
        if req.method == b"GET":  # (an application sees its own commands; an admin, all)
            return self._queue_view(seg[2], None if req.admin else req.app)
        return BAD_METHOD

    async def _submit(self, req: Request, device_id: str) -> Response:
        q = req.query
        async_id = q.get("async-id")
        if async_id is None:
            return text(400, "MALFORMED_ASYNC_ID")
        retry = expiry = None
        try:
            if q.get("retry"):  # (blank: not given, as before blank values were kept)
                retry = int(q["retry"])
        except ValueError:
            return text(400, "MALFORMED_RETRY")
        try:
            if q.get("expiry-seconds"):
                expiry = int(q["expiry-seconds"])
        except ValueError:
            return text(400, "MALFORMED_EXPIRY_SECONDS")
        if req.json_refused:
            return UNSUPPORTED_MEDIA_TYPE
        try:
            body = _decode_device_request(req.body)
            payload = _b64decode(body.payload_b64, validate=True) if body.payload_b64 else b""
        except (*_BAD_JSON, binascii.Error, ValueError):
            return text(400, MALFORMED)
        content_format = accept = None
        if body.content_type:
            content_format = content_format_for(body.content_type.partition(";")[0])
            if content_format is None:
                return text(400, MALFORMED)
        if body.accept:
            accept = content_format_for(body.accept.partition(";")[0])
            if accept is None:
                return text(400, MALFORMED)
        if not body.uri:
            return text(400, MALFORMED)
        result = await self.sup.submit(
            device_id,
            body.method,
            body.uri,
            async_id=async_id,
            payload=payload,
            content_format=content_format,
            accept=accept,
            retry=retry,
            expiry=expiry,
            owner=req.app,
        )
        if isinstance(result, Rejected):
            return rejected(result)
        return ACCEPTED

    def _queue_view(self, device_id: str, owner: str | None = None) -> Response:
        actor = self.sup.by_endpoint.get(device_id)
        if actor is None:
            return text(404, "DEVICE_NOT_FOUND")
        return json(200, self.queue_view(actor, owner))

    def queue_view(self, actor: DeviceActor, owner: str | None = None) -> DeviceQueueView:
        """The device's unfinished commands (`owner`'s only, when given) and when each may
        be attempted next."""
        q = actor.queue
        now = trio.current_time()
        return DeviceQueueView(
            endpoint_name=actor.endpoint,
            queue_mode=q.queue_mode,
            reachable=q.reachable,
            awake_until=self.wall(q.awake_until) if q.queue_mode and q.awake(now) else None,
            queue_length=len(q),
            commands=[self._command_view(status) for status in q.describe(now, owner)],
        )

    def _command_view(self, status: CommandStatus) -> QueuedCommand:
        last, not_before = status.last_attempt_at, status.next_attempt_not_before
        return QueuedCommand(
            async_id=status.async_id,
            method=status.method,
            uri=status.uri,
            subscription=status.subscription,
            in_flight=status.in_flight,
            attempts=status.attempts,
            attempts_left=status.attempts_left,
            accepted_at=self.wall(status.accepted_at),
            expires_at=self.wall(status.expires_at),
            last_attempt_at=None if last is None else self.wall(last),
            next_attempt_not_before=None if not_before is None else self.wall(not_before),
            waiting_for=status.waiting_for,
        )

    # -- notification channels ------------------------------------------------------------

    async def _notification(self, req: Request) -> Response:
        seg = req.segments
        if len(seg) != 3:
            return NOT_FOUND_ROUTE
        what, method = seg[2], req.method
        if what == "websocket":
            if method == b"PUT":
                return self._put_websocket(req)
            if method == b"GET":
                return self._get_websocket(req.app)
            if method == b"DELETE":
                channel = self.hub.channels.get(req.app)
                if channel is None or channel.mechanism != WEB_SOCKET:
                    return text(404, "Channel not found.")
                self.hub.delete(req.app, 1000)
                return NO_CONTENT
            return BAD_METHOD
        if what == "callback":
            if method == b"PUT":
                return await self._put_callback(req)
            if method == b"GET":
                return self._get_callback(req.app)
            if method == b"DELETE":
                if not self.webhooks.delete(req.app):
                    return text(404, "Channel not found.")
                return NO_CONTENT
            return BAD_METHOD
        if what == "pull" and method == b"DELETE":
            channel = self.hub.channels.get(req.app)
            if channel is not None and channel.mechanism == LONG_POLLING:
                self.hub.delete(req.app)
                return text(200, "REMOVED")
            return text(200, "ALREADY_DELETED")
        if what == "channel":
            if method != b"GET":
                return BAD_METHOD
            channel = self.hub.channels.get(req.app)
            if channel is None:
                return text(404, "Channel not found.")
            return json(200, DeliveryMechanism(channel.mechanism))
        return NOT_FOUND_ROUTE

    def _put_websocket(self, req: Request) -> Response:
        if req.json_refused:
            return UNSUPPORTED_MEDIA_TYPE
        try:
            body = _decode_channel(req.body) if req.body.strip() else ChannelRequest()
        except RecursionError:
            return text(400, MALFORMED)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return text(400, f"Invalid serialization options: {exc}")
        channel = self.hub.channels.get(req.app)
        if channel is not None:
            if channel.mechanism != WEB_SOCKET:
                return text(400, "Another type of notification channel already exists.")
            return json(200, self._websocket_view(req.app))
        self.hub.open(req.app, WEB_SOCKET, body.serialization)
        return json(201, self._websocket_view(req.app))

    async def _put_callback(self, req: Request) -> Response:
        if req.json_refused:
            return UNSUPPORTED_MEDIA_TYPE
        try:
            body = _decode_callback(req.body)
        except _BAD_JSON:
            return text(400, MALFORMED)
        try:
            target = parse_target(body.url, body.headers)
        except ValueError as exc:
            return text(400, str(exc))
        refusal = await self.webhooks.register(req.app, target, body.serialization)
        return NO_CONTENT if refusal is None else text(*refusal)

    def _get_callback(self, app: str) -> Response:
        hook = self.webhooks.get(app)
        if hook is None:
            return text(404, "Channel not found.")
        target = hook.target
        return json(
            200,
            CallbackChannel(
                url=target.url,
                headers=dict(target.headers),
                serialization=self.hub.channels[app].serialization,
            ),
        )

    def _get_websocket(self, app: str) -> Response:
        channel = self.hub.channels.get(app)
        if channel is None or channel.mechanism != WEB_SOCKET:
            return text(404, "Channel not found.")
        return json(200, self._websocket_view(app))

    def _websocket_view(self, app: str) -> WebsocketChannel:
        channel = self.hub.channels[app]
        return WebsocketChannel(
            status="connected" if channel.session is not None else "disconnected",
            queue_size=len(channel),
            serialization=channel.serialization,
        )

    # -- subscriptions --------------------------------------------------------------------

    async def _subscriptions(self, req: Request) -> Response:
        seg, method = req.segments, req.method
        if len(seg) == 2 or (len(seg) == 3 and not seg[2]):
            return self._presubscriptions(req)
        device_id = seg[2]
        sup = self.sup
        if len(seg) == 3:  # the device's subscriptions
            if method == b"GET":
                paths = sup.subscriptions_of(device_id, req.app)
                if not paths:
                    return text(404, "DEVICE_NOT_FOUND" if paths is None else "NO_SUBSCRIPTIONS")
                # no final newline: Pelion's SDK splits the body on "\n"
                return 200, URI_LIST, "\n".join(paths).encode()
            if method == b"DELETE":
                sup.subscriptions.unsubscribe_all(device_id, req.app)  # (pending ones too)
                return NO_CONTENT
            return BAD_METHOD
        # (`%2F3303%2F0`, what the SDK's ResourceValues sends, and `//3303/0` name `/3303/0`)
        path = "/" + "/".join(seg[3:]).lstrip("/")
        if method == b"PUT":
            # 200 once the device accepted the Observe (within [delivery] subscribe_wait),
            # else 202 and the result as an AsyncIDResponse (docs/api.md, "Subscriptions")
            wait = sup.settings.delivery.subscribe_wait
            result = await sup.subscriptions.subscribe_waiting(device_id, path, req.app, wait)
            if isinstance(result, Rejected):
                return rejected(result)
            if isinstance(result, Pending):
                return json(202, {"async-response-id": result.async_response_id})
            return OK_EMPTY
        if method == b"GET":
            paths = sup.subscriptions_of(device_id, req.app)
            if paths is None:
                return text(404, "DEVICE_NOT_FOUND")
            return OK_EMPTY if canonical(path) in paths else text(404, "NOT_SUBSCRIBED")
        if method == b"DELETE":
            if device_id not in sup.by_endpoint:
                return text(404, "DEVICE_NOT_FOUND")
            sup.unsubscribe(device_id, path, req.app)
            return NO_CONTENT
        return BAD_METHOD

    def _presubscriptions(self, req: Request) -> Response:
        method, sup = req.method, self.sup
        if method == b"GET":
            entries = [
                PresubscriptionEntry(
                    p.endpoint_name,
                    p.endpoint_type,
                    None if p.resource_paths == _ALL_OBSERVABLE else list(p.resource_paths),
                )
                for p in sup.presubscriptions.get(req.app, ())
            ]
            return json(200, entries)
        if method == b"DELETE":
            sup.set_presubscriptions(req.app, [])
            return NO_CONTENT
        if method != b"PUT":
            return BAD_METHOD
        if req.json_refused:
            return UNSUPPORTED_MEDIA_TYPE
        try:
            entries = _decode_presubscriptions(req.body)
        except _BAD_JSON:
            return text(400, MALFORMED)
        distinct = {p for e in entries for p in e.resource_path or ()}
        if len(entries) > self.max_presubscriptions or len(distinct) > MAX_PRESUBSCRIPTION_PATHS:
            return text(400, TOO_MANY_PRESUBSCRIPTIONS)
        presubscriptions = []
        for e in entries:
            if e.resource_path is not None and not e.resource_path:
                return text(400, MALFORMED)
            paths = _ALL_OBSERVABLE if e.resource_path is None else tuple(e.resource_path)
            presubscriptions.append(Presubscription(e.endpoint_name, e.endpoint_type, paths))
        sup.set_presubscriptions(req.app, presubscriptions)
        return NO_CONTENT

    # -- endpoints and the device directory -----------------------------------------------

    async def _endpoints(self, req: Request) -> Response:
        seg = req.segments
        if len(seg) != 3:
            return NOT_FOUND_ROUTE
        if req.method != b"GET":
            return BAD_METHOD
        actor = self.sup.by_endpoint.get(seg[2])
        if actor is None:
            return text(404, "Endpoint not found")
        resources = listed_resources(actor.reg.objects)  # (shared by devices of one kind)
        return json(200, [Resource(r.uri, r.obs, r.type, r.rt) for r in resources])

    async def _devices(self, req: Request) -> Response:
        seg = [s for s in req.segments[2:] if s]  # `/v3/devices/` and `/v3/devices` alike
        if req.method != b"GET":
            return BAD_METHOD
        directory = self.sup.registry.directory
        directory.purge(self.sup.now())
        if len(seg) == 1:
            found = self.sup.by_endpoint.get(seg[0]) or directory.get(seg[0])
            if found is None:
                return error_v3(404, "not_found", "Device not found.")
            return json(200, self._device_data(found))
        if seg:
            return NOT_FOUND_ROUTE
        q = req.query
        try:
            limit = int(q.get("limit") or "50")  # (blank: the default)
            if not 2 <= limit <= 1000:
                raise ValueError
        except ValueError:
            return _invalid("limit", "limit must be an integer in 2..1000.")
        order = (q.get("order") or "ASC").upper()
        if order not in ("ASC", "DESC"):
            return _invalid("order", "order must be ASC or DESC.")
        try:
            clauses = devices.parse_filters(q)
        except devices.FilterError as exc:
            return _invalid(exc.name, exc.message)
        offset = self.sup.wall_offset
        sources: list[devices.Source[DeviceActor | Gone]] = [
            devices.registered_source(self.sup, clauses, offset),  # type: ignore[list-item]
            devices.gone_source(directory, clauses, offset),  # type: ignore[list-item]
        ]
        only = devices.candidates(clauses, ("id", "endpoint_name"))
        after = q.get("after") or None  # (a blank `after`, as some clients send: none)
        # a filter on a field that differs between devices reads them all: in chunks, with
        # other tasks running in between (api/devices.py); without one, O(log n + limit)
        page, more = await _steps(
            devices.paging(sources, after=after, descending=order == "DESC", limit=limit, only=only)
        )
        total = await _steps(devices.counting(sources, only))
        return json(
            200,
            DeviceList(
                limit=limit,
                order=order,
                has_more=more,
                data=[self._device_data(d) for d in page],
                after=after,
                total_count=total,
            ),
        )

    def _device_data(self, device: DeviceActor | Gone) -> DeviceData:
        if isinstance(device, Gone):
            return DeviceData(
                id=device.endpoint,
                endpoint_name=device.endpoint,
                state="deregistered",
                endpoint_type=device.endpoint_type or "",
                created_at=self.wall(device.created_at),
                updated_at=self.wall(device.updated_at),
                lwm2m_version=device.lwm2m_version,
                binding=device.binding,
                queue_mode=device.queue_mode,
                lifetime=device.lifetime,
                security_mode=security_mode(self.sup.credentials, device.endpoint),
            )
        reg = device.reg
        return DeviceData(
            id=reg.endpoint,
            endpoint_name=reg.endpoint,
            endpoint_type=reg.endpoint_type or "",
            created_at=self.wall(reg.registered_at),
            updated_at=self.wall(reg.updated_at),
            lwm2m_version=reg.lwm2m_version,
            binding=reg.binding,
            queue_mode=reg.queue_mode,
            lifetime=reg.lifetime,
            security_mode=security_mode(self.sup.credentials, reg.endpoint),
        )


def _application_only(route: str, method: bytes) -> bool:
    """A /v2 route an administrator key may not use: channels and subscriptions (it owns
    none) and new device requests (their AsyncIDResponses go to the owner's channel)."""
    return route in _KEPT_SETTINGS or (route == "device-requests" and method == b"POST")


async def _steps(steps: devices.Steps[devices.R]) -> devices.R:
    """Run a directory scan, letting other tasks run between its chunks."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        await trio.lowlevel.checkpoint()


def _invalid(name: str, message: str) -> Response:
    """400 `validation_error` naming the query parameter refused (Pelion's `fields`)."""
    return json(
        400,
        ErrorResponse(
            code=400,
            type="validation_error",
            message=message,
            fields=[{"name": name, "message": message}],
        ),
    )
