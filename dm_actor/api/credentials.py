"""`/v3/device-credentials`: devices' DTLS PSK credentials, for administrator keys only.

    PUT    /v3/device-credentials/{endpoint}   {"psk_identity": "...", "psk_key": "<hex>"}
    GET    /v3/device-credentials/{endpoint}   identity and creation time, never the key
    GET    /v3/device-credentials              the list (paged by endpoint name)
    DELETE /v3/device-credentials/{endpoint}

`Api.dispatch` sends an application key 403 before this module is reached. The key is
write-only: no answer carries it and nothing here logs it. A PUT or DELETE answers once the
store holds the change (`store.durable()`), and ends the device's registration if the
change touches it (`dm_actor.actors.provisioning`). Errors are Pelion's `/v3` JSON error
body (with `fields` for a 400).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Protocol

import msgspec

from dm_actor.credentials import CredentialError, IdentityTaken, validate

if TYPE_CHECKING:
    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.credentials import Credential

#: `routes.Response` (not imported: routes imports this module)
Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class Request(Protocol):
    """What this module reads of a `routes.Request`."""

    method: bytes
    segments: list[str]
    query: dict[str, str]
    body: bytes

    @property
    def json_refused(self) -> bool: ...


_JSON = [(b"content-type", b"application/json")]
_encode = msgspec.json.Encoder().encode


class FieldError(msgspec.Struct, frozen=True):
    name: str
    message: str


class CredentialsError(msgspec.Struct, frozen=True, kw_only=True):
    """Pelion's `/v3` error body, with the offending fields of a 400."""

    object: str = "error"
    code: int
    type: str
    message: str
    fields: list[FieldError] = []
    request_id: str = ""


class CredentialView(msgspec.Struct, frozen=True, kw_only=True):
    """What an administrator sees of a device's credentials: never the key."""

    object: str = "device-credential"
    endpoint_name: str
    psk_identity: str
    created_at: str  # RFC 3339, UTC


class CredentialList(msgspec.Struct, frozen=True, kw_only=True):
    object: str = "list"
    limit: int
    has_more: bool
    after: str | None
    total_count: int
    data: list[CredentialView]


class CredentialBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    psk_identity: object = None
    psk_key: object = None


_decode_body = msgspec.json.Decoder(CredentialBody).decode


def _error(
    status: int, kind: str, message: str, fields: list[FieldError] | None = None
) -> Response:
    body = CredentialsError(code=status, type=kind, message=message, fields=fields or [])
    return status, _JSON, _encode(body)


def _ok(status: int, value: object) -> Response:
    return status, _JSON, _encode(value)


def _iso(wall: float) -> str:
    t = datetime.datetime.fromtimestamp(wall, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _view(c: Credential) -> CredentialView:
    return CredentialView(endpoint_name=c.endpoint, psk_identity=c.identity,
                          created_at=_iso(c.created_at))  # fmt: skip


NOT_FOUND = _error(404, "not_found", "The device has no credentials.")
BAD_METHOD = _error(405, "method_not_allowed", "Method not allowed on this resource.")


async def device_credentials(sup: Supervisor, req: Request) -> Response:
    """Answer one `/v3/device-credentials` request of an administrator."""
    seg = req.segments[2:]
    if seg and not seg[-1]:
        seg = seg[:-1]  # a trailing slash
    if not seg:
        if req.method != b"GET":
            return BAD_METHOD
        return _list(sup, req.query)
    if len(seg) != 1:
        return _error(404, "not_found", "No such resource.")
    endpoint = seg[0]
    creds = sup.credentials
    if req.method == b"GET":
        found = creds.of_endpoint(endpoint)
        return NOT_FOUND if found is None else _ok(200, _view(found))
    if req.method == b"PUT":
        return await _put(sup, req, endpoint)
    if req.method == b"DELETE":
        if creds.of_endpoint(endpoint) is None:
            return NOT_FOUND
        if sup.store_behind():
            return _error(503, "service_unavailable", "STORE_IS_BEHIND")
        sup.provisioning.remove(endpoint)
        await sup.store.durable()
        return 204, [], b""
    return BAD_METHOD


async def _put(sup: Supervisor, req: Request, endpoint: str) -> Response:
    if req.json_refused:
        return _error(415, "unsupported_media_type", "Content-Type must be application/json.")
    try:
        body = _decode_body(req.body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        return _error(400, "validation_error", f"Malformed JSON body: {exc}")
    try:
        identity, key = validate(endpoint, body.psk_identity, body.psk_key)
    except CredentialError as exc:
        return _error(400, "validation_error", exc.message, [FieldError(exc.field, exc.message)])
    try:
        sup.credentials.check(endpoint, identity)
    except IdentityTaken as exc:
        return _error(409, "conflict", f"{exc}.")
    if sup.store_behind():
        return _error(503, "service_unavailable", "STORE_IS_BEHIND")
    existed = sup.credentials.of_endpoint(endpoint) is not None
    record, _changed = sup.provisioning.set(endpoint, identity, key)
    await sup.store.durable()
    return _ok(200 if existed else 201, _view(record))


def _list(sup: Supervisor, query: dict[str, str]) -> Response:
    try:
        limit = int(query.get("limit", "50"))
        if not 2 <= limit <= 1000:
            raise ValueError
    except ValueError:
        message = "limit must be an integer in 2..1000."
        return _error(400, "validation_error", message, [FieldError("limit", message)])
    after = query.get("after")
    records = sup.credentials.records()  # by endpoint name
    start = 0
    if after is not None:
        start = next((i for i, r in enumerate(records) if r.endpoint > after), len(records))
    page = records[start : start + limit]
    return _ok(
        200,
        CredentialList(
            limit=limit,
            has_more=start + limit < len(records),
            after=after,
            total_count=len(records),
            data=[_view(r) for r in page],
        ),
    )
