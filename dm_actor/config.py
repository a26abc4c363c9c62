"""Settings: one frozen tree of every tunable, read once from TOML and passed down.

The names and defaults of `[delivery]` and `[registration]` are those of delivery.md
section 11. `load_settings` rejects unknown keys and wrongly typed values with a `ConfigError`
naming the file and the offending key. Nothing here reads the environment or keeps a global.
"""

from __future__ import annotations

import os
import tomllib
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from dm_actor.coap.numbers import TransmissionParameters

if TYPE_CHECKING:
    from pathlib import Path

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
#: a browser origin for CORS: scheme://host[:port], http or https (docs/api.md, "CORS")
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5]?[0-9]{1,4})"
ORIGIN_PATTERN = rf"^(?i:https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:{_PORT})?/?)\Z"
Origin = Annotated[str, msgspec.Meta(pattern=ORIGIN_PATTERN)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class ConfigError(Exception):
    """A settings file that cannot be read, parsed or validated."""


class ServerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where the server listens and keeps its data."""

    host: str = "0.0.0.0"
    coap_port: Port = 5683
    http_port: Port = 8080
    data_dir: str = "./dm-actor-data"
    store: Literal["sqlite", "memory", "postgres"] = "sqlite"  # memory: nothing survives a restart
    # postgres: the libpq connection string (or URI) of the database; empty: the PG* environment
    # variables say (docs/operations.md, "Running on PostgreSQL"); keep the password in ~/.pgpass
    dsn: str = ""
    # SQLite: at least this long between the starts of two commits, so that one fsync serves
    # every write of the interval (0: commit back to back; more CPU under load)
    commit_interval: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.002
    # move what is alive to the GC's permanent generation this often (0: never): with a
    # million devices a full collection otherwise stalls the loop for seconds
    gc_freeze_interval: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    log_level: LogLevel = "info"
    # "json": one JSON object per line (docs/operations.md, "The log"); --log-format
    log_format: Literal["text", "json"] = "text"
    # SQLite: the bytes of undelivered events (other than AsyncIDResponses) stored in total,
    # and the free disk space below which none is stored (docs/operations.md, "Disk space")
    event_disk_budget: Annotated[int, msgspec.Meta(ge=0)] = 256 * 2**20
    disk_headroom: Annotated[int, msgspec.Meta(ge=0)] = 64 * 2**20
    # on SIGTERM/SIGINT/SIGHUP, at most this long for the store to commit what it holds and
    # for the HTTP answers in progress to go out, then everything stops (0: at once)
    graceful_timeout: Annotated[float, msgspec.Meta(ge=0)] = 5.0


class DeliverySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Command delivery (delivery.md section 11); times in seconds."""

    queue_length: Annotated[int, msgspec.Meta(ge=1)] = 20
    ack_timeout: Seconds = 2.0
    max_retransmit: Annotated[int, msgspec.Meta(ge=0, le=20)] = 5
    ack_random_factor: Annotated[float, msgspec.Meta(ge=1.0)] = 1.0
    expiry_sweep_interval: Seconds = 60.0
    awake_time: Seconds = 93.0
    resend_grace: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    default_retry: NonNegative = 0
    default_retry_queue_mode: NonNegative = 2
    default_expiry: NonNegative = 7200
    default_expiry_queue_mode: NonNegative = 259200
    # finished commands' AsyncIDResponses remembered per application for repeats (rule 1.7)
    remembered_async_ids: NonNegative = 10_000
    # a subscription PUT waits this long for the device to accept the Observe: 200 if it
    # did, else 202 and the result later as an AsyncIDResponse (docs/api.md, Subscriptions)
    subscribe_wait: Annotated[float, msgspec.Meta(ge=0)] = 3.0


class RegistrationSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """LwM2M registration defaults."""

    default_lifetime: Annotated[int, msgspec.Meta(ge=1)] = 86400
    # a Register or Update asking for a longer lifetime gets 4.00 (30 days; LwM2M allows 2^32-1
    # s, 136 years: a registration nobody can end but its device)
    max_lifetime: Annotated[int, msgspec.Meta(ge=1, le=0xFFFFFFFF)] = 2_592_000
    # a Register or Update listing more object links gets 4.13 (real clients list tens; each
    # link costs memory for as long as the device is registered)
    max_links: Annotated[int, msgspec.Meta(ge=1)] = 512
    # a Register the server cannot take now (its store is behind or failing) gets 5.03 with
    # this Max-Age, so that the client waits at least this long before it tries again
    retry_after: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 60
    # a registration ends this long after last update + lifetime (delivery.md 8.3)
    expiry_grace: Annotated[float, msgspec.Meta(ge=0)] = 15.0
    # a de-registered or expired device stays in /v3/devices (state `deregistered`) this
    # long, and at most this many such devices are kept, the oldest dropped first (0: none)
    directory_retention: Annotated[float, msgspec.Meta(ge=0)] = 86400.0
    directory_max: NonNegative = 100_000


class ApiSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The northbound API."""

    # access keys accepted on every call (with --api-key and DM_ACTOR_API_KEY); with none,
    # a key is generated on the first start and kept in the data directory
    keys: list[str] = msgspec.field(default_factory=list)
    # administrator keys (with --admin-key and DM_ACTOR_ADMIN_KEY): they manage device
    # credentials and own no channel (docs/operations.md, "Administrator keys"); none by default
    admin_keys: list[str] = msgspec.field(default_factory=list)
    # HTTP connections served at once (each costs a task and its buffers: a connection
    # flood must not grow memory unbounded); beyond, a new connection sheds the oldest one
    # that has no complete request head yet, else waits in the kernel's accept queue
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1024
    # a request head must be complete this long after the connection opened (or after its
    # first byte on a kept-alive connection), its body this long after the head: else 408
    head_timeout: Seconds = 10.0
    body_timeout: Seconds = 30.0
    # a response the client does not read within this closes the connection
    send_timeout: Seconds = 30.0
    # connections at once from one IP address (0: no limit; behind a TLS proxy every client
    # has the proxy's address)
    max_connections_per_address: NonNegative = 0
    # pre-subscriptions per application (Pelion's limit); beyond, PUT gets 400
    max_presubscriptions: NonNegative = 1024
    # GET /metrics without an administrator key (on a port only the monitoring can reach)
    metrics_public: bool = False
    # browser origins whose pages may call the API (CORS; with --cors-origin); none by default
    cors_origins: list[Origin] = msgspec.field(default_factory=list)


class TcpSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """CoAP over TCP (RFC 8323) connections (docs/operations.md, "Limits")."""

    # connections open at once; 0: derived from the descriptor limit (RLIMIT_NOFILE) less a
    # reserve for HTTP's max_connections, the store and the UDP socket, at most 10000
    max_connections: NonNegative = 0
    # a new connection must send its CSM and register within this, else Abort
    handshake_timeout: Seconds = 10.0


class SecuritySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """CoAP over DTLS 1.2 with pre-shared keys (docs/operations.md, "Device security")."""

    # the coaps:// UDP port (0: pick a free one); devices with credentials use it. Not
    # set: the CoAP port + 1 (5684 beside 5683), or 0 when the CoAP port is 0
    coaps_port: Port | None = None
    # serve coap:// (UDP and TCP) too: devices without credentials register there
    plain_coap: bool = True
    # offer RFC 9146 Connection IDs: a device keeps its session when its address changes
    connection_id: bool = True
    # half-open DTLS handshakes at once, in total and per source address
    max_handshakes: Annotated[int, msgspec.Meta(ge=1)] = 1024
    max_handshakes_per_host: Annotated[int, msgspec.Meta(ge=1)] = 8
    # a handshake must complete within this after its verified ClientHello
    handshake_timeout: Seconds = 60.0


class ClusterSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """`[cluster]`: several nodes on one PostgreSQL database (docs/operations.md, "Cluster").
    Off while `node` is empty; on, it needs `[server] store = "postgres"`."""

    # this node's name, unique in the cluster (letters, digits, '-', '_', '.')
    node: Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")] = ""
    # host:port of this node's internal UDP link (forwarded datagrams), reachable by peers
    link: str = "127.0.0.1:7683"
    # host:port where peers reach this node's HTTP API (default: [server] host:http_port)
    advertise_http: str = ""
    # slots endpoint names hash into; fixed when the cluster is created
    slots: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1024
    # a node that has not renewed its leases for this long loses its slots
    lease_ttl: Annotated[float, msgspec.Meta(ge=0.5, le=300)] = 10.0
    # the shared secret of the internal link and internal HTTP calls (or
    # DM_ACTOR_CLUSTER_SECRET); required in cluster mode
    secret: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.node)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every setting of the server, one section per TOML table."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    delivery: DeliverySettings = msgspec.field(default_factory=DeliverySettings)
    registration: RegistrationSettings = msgspec.field(default_factory=RegistrationSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    tcp: TcpSettings = msgspec.field(default_factory=TcpSettings)
    security: SecuritySettings = msgspec.field(default_factory=SecuritySettings)
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)

    def coaps_port(self) -> int:
        """The coaps:// port: `[security] coaps_port`, else the CoAP port + 1 (0 for 0)."""
        port = self.security.coaps_port
        if port is not None:
            return port
        coap = self.server.coap_port
        return coap + 1 if 0 < coap < 65535 else 0

    def transmission_parameters(self) -> TransmissionParameters:
        """The CoAP transmission parameters that `[delivery]` sets (RFC 7252 4.8)."""
        d = self.delivery
        return TransmissionParameters(
            ack_timeout=d.ack_timeout,
            ack_random_factor=d.ack_random_factor,
            max_retransmit=d.max_retransmit,
        )


def parse_settings(text: str, where: str = "settings") -> Settings:
    """Settings from TOML text (tests and embedders; files go through `load_settings`).

    Raises:
        ConfigError: not TOML, an unknown key, or a value of the wrong type or range.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_cluster(settings, where)
    return settings


def _check_cluster(settings: Settings, where: str) -> None:
    """`[cluster]` needs the PostgreSQL store, a secret and a host:port link address.

    Raises:
        ConfigError: what is missing.
    """
    c = settings.cluster
    if not c.enabled:
        return
    if settings.server.store != "postgres" or not settings.server.dsn:
        raise ConfigError(f'{where}: [cluster] needs [server] store = "postgres" and a dsn')
    if not c.secret and not os.environ.get("DM_ACTOR_CLUSTER_SECRET"):
        raise ConfigError(
            f"{where}: [cluster] needs a secret (or DM_ACTOR_CLUSTER_SECRET): the internal "
            f"link and internal HTTP calls are authenticated with it"
        )
    for key, value in (("link", c.link), ("advertise_http", c.advertise_http)):
        host, sep, port = value.rpartition(":")
        if value and (not sep or not host or not port.isdigit() or int(port) > 65535):
            raise ConfigError(f"{where}: [cluster] {key}: not host:port: {value!r}")


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Read the settings from a TOML file (or the defaults), then apply `[server]` overrides.

    Args:
        path: the TOML file, or None for the defaults.
        **overrides: `[server]` fields (host, coap_port, http_port, data_dir, log_level) that
            take precedence over the file, as command-line flags do; a None value means "not
            given" and is skipped.

    Raises:
        ConfigError: the file is unreadable or not TOML, has an unknown key, or a value of
            the wrong type or range; the message names the file and the key.
    """
    where = "settings" if path is None else f"settings file {path}"
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        server = raw.get("server", {})
        if not isinstance(server, dict):
            raise ConfigError(f"{where}: [server] must be a table")
        raw["server"] = {**server, **given}
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_cluster(settings, where)
    return settings
