"""The JSON bodies of the northbound API as msgspec Structs, with Pelion's field names.

Requests decode straight into these Structs (with `strict=False`, so `"100"` and `"true"`
are accepted where Pelion's own examples send strings); responses encode from them. No I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

ChunkSize = Annotated[int, msgspec.Meta(ge=100, le=10_000)]


class DeviceRequest(msgspec.Struct, frozen=True):
    """The body of `POST /v2/device-requests/{device-id}`."""

    method: str
    uri: str
    accept: str | None = None
    content_type: str | None = msgspec.field(default=None, name="content-type")
    payload_b64: str | None = msgspec.field(default=None, name="payload-b64")


class SerializationConfig(msgspec.Struct, frozen=True, kw_only=True):
    """`serialization.cfg`: every flag defaults to false."""

    deregistrations_as_object: bool = False
    include_uid: bool = False
    include_timestamp: bool = False
    include_original_ep: bool = False


class Serialization(msgspec.Struct, frozen=True, kw_only=True):
    """A channel's serialization options (`SerializationConfigObjectV2`)."""

    type: Literal["v2"] = "v2"
    max_chunk_size: ChunkSize = 10_000
    cfg: SerializationConfig = SerializationConfig()


DEFAULT_SERIALIZATION = Serialization()


class ChannelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The optional body of `PUT /v2/notification/websocket`."""

    serialization: Serialization = DEFAULT_SERIALIZATION


class CallbackRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The body of `PUT /v2/notification/callback`."""

    url: str
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    serialization: Serialization = DEFAULT_SERIALIZATION


class CallbackChannel(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /v2/notification/callback`."""

    url: str
    headers: dict[str, str]
    serialization: Serialization


class WebsocketChannel(msgspec.Struct, frozen=True, kw_only=True):
    """`GET /v2/notification/websocket` (and the `PUT` answers)."""

    status: Literal["connected", "disconnected"]
    queue_size: int
    serialization: Serialization


class DeliveryMechanism(msgspec.Struct, frozen=True):
    """`GET /v2/notification/channel`."""

    delivery_mechanism: str


class PresubscriptionEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One pre-subscription of `PUT/GET /v2/subscriptions`."""

    endpoint_name: str | None = msgspec.field(default=None, name="endpoint-name")
    endpoint_type: str | None = msgspec.field(default=None, name="endpoint-type")
    resource_path: list[str] | None = msgspec.field(default=None, name="resource-path")


class Resource(msgspec.Struct, frozen=True, omit_defaults=True):
    """One entry of `GET /v2/endpoints/{device-id}`."""

    uri: str
    obs: bool
    type: str
    rt: str | None = None


class DeviceData(msgspec.Struct, frozen=True, kw_only=True):
    """A device of the Device Directory (`/v3/devices`), the fields dm_actor knows."""

    id: str
    endpoint_name: str
    object: str = "device"
    state: str = "registered"
    lifecycle_status: str = "enabled"
    created_at: str
    updated_at: str
    endpoint_type: str = ""
    lwm2m_version: str
    binding: str
    queue_mode: bool
    lifetime: int
    # how it connects (dm_actor's, not Pelion's): "psk" (DTLS with a pre-shared key: it has
    # device credentials) or "nosec" (plain CoAP), as LwM2M's Security Mode names them
    security_mode: str = "nosec"


class DeviceList(msgspec.Struct, frozen=True, kw_only=True):
    """A page of `GET /v3/devices` (`total_count` always: it is cheap here)."""

    object: str = "list"
    limit: int
    order: str
    has_more: bool
    total_count: int
    after: str | None
    data: list[DeviceData]


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The `/v3` error body (Pelion's `ErrorResponse`)."""

    object: str = "error"
    code: int
    type: str
    message: str
    # the request's parameters or fields that failed validation, `{"name", "message"}` each
    fields: list[dict[str, str]] = msgspec.field(default_factory=list)
    request_id: str = ""


class QueuedCommand(msgspec.Struct, frozen=True, kw_only=True):
    """One unfinished command in `GET /v2/device-requests/{device-id}` (beyond Pelion)."""

    async_id: str = msgspec.field(name="async-id")
    method: str
    uri: str
    subscription: bool
    in_flight: bool
    attempts: int
    attempts_left: int
    accepted_at: str
    expires_at: str
    last_attempt_at: str | None
    next_attempt_not_before: str | None
    waiting_for: str


class DeviceQueueView(msgspec.Struct, frozen=True, kw_only=True):
    """The body of `GET /v2/device-requests/{device-id}`."""

    endpoint_name: str
    queue_mode: bool
    reachable: bool
    awake_until: str | None
    queue_length: int
    commands: list[QueuedCommand]
