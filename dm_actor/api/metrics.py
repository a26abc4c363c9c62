"""What an operator's tools read: `GET /metrics` (Prometheus), `GET /healthz`, `GET /readyz`.

Nothing is counted here on a hot path. The server already keeps its counters (the
supervisor's `statistics`, its command outcomes and delivery-latency histogram, the UDP and
TCP transports' `statistics()`, the store's backlog and commit-latency histogram, the hub's
channels, the HTTP port's `statistics()`); a custom collector reads them when Prometheus
scrapes, and `prometheus_client` writes the text exposition format. What this module adds:
the HTTP requests by route and status (one dict increment per response; the route is the
pattern, never the raw path, so the label's values are bounded), and the event loop's lag
(a task that measures how late its sleeps wake).

docs/operations.md, "Metrics", names every metric.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dm_actor.api.auth import is_admin
from dm_actor.api.routes import text
from dm_actor.api.tap import EventTap
from dm_actor.credentials import security_mode
from dm_actor.histogram import LAG_BOUNDS, Histogram

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from dm_actor.api.channels import NotificationHub
    from dm_actor.api.routes import Api, Response
    from dm_actor.transport.tcp import TcpListener
    from dm_actor.transport.udp import UdpEndpoint

#: the route of the request being answered on this connection (each connection is a task)
ROUTE: ContextVar[str] = ContextVar("dm_actor_http_route", default="-")

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
#: the routes served without an application key, and in the connection reserve
OPERATIONS = frozenset((HEALTHZ, READYZ, METRICS))
#: Prometheus's text format 0.0.4 (what every Prometheus version reads)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: how often the lag probe sleeps, seconds
LAG_INTERVAL = 0.25
#: /readyz is 503 while a write has waited this long to be committed (`watch_store`)
STORE_STALL = 10.0
#: registered devices a scrape counts in one scheduler pass (about 3 ms on a loaded machine)
DEVICES_PER_PASS = 2048
UNMATCHED = "unmatched"
OK = text(200, "OK")
NOT_READY = text(503, "Not ready.")
NOT_ALLOWED = (405, [(b"allow", b"GET"), (b"content-type", b"text/plain")], b"Method not allowed.")
UNAUTHORIZED = text(401, "Authentication failure.")
ADMIN_ONLY = text(403, "An administrator key is needed (or [api] metrics_public = true).")

_V2 = {
    "device-requests": ("/v2/device-requests", "/{device-id}"),
    "endpoints": ("/v2/endpoints", "/{device-id}", "/{resource-path}"),
    "subscriptions": ("/v2/subscriptions", "/{device-id}", "/{resource-path}"),
}
_NOTIFICATION = frozenset(("pull", "websocket-connect", "websocket", "callback"))
_ADMIN = frozenset(
    ("overview", "devices", "device-requests", "async-responses", "subscriptions", "events")
)


def route_of(segments: list[str]) -> str:
    """The route pattern of a request path's segments (`/v2/device-requests/{device-id}`):
    a bounded set of values, whatever the paths clients send."""
    n = len(segments)
    if n == 1 and "/" + segments[0] in OPERATIONS:
        return "/" + segments[0]
    if n < 2:
        return "/" if n == 1 and not segments[0] else UNMATCHED
    head, kind = segments[0], segments[1]
    if head == "v2":
        if kind == "notification":
            if n == 3 and segments[2] in _NOTIFICATION:
                return f"/v2/notification/{segments[2]}"
            return UNMATCHED
        parts = _V2.get(kind)
        if parts is None:
            return UNMATCHED
        return "".join(parts[: min(n - 1, len(parts))])
    if head == "v3" and kind in ("devices", "device-credentials"):
        rest = [s for s in segments[2:] if s]
        if not rest:
            return f"/v3/{kind}"
        return f"/v3/{kind}/{{id}}" if len(rest) == 1 else UNMATCHED
    if head == "console":
        return "/console/"
    if head == "admin" and kind in _ADMIN:  # (console.py)
        return f"/admin/{kind}"
    return UNMATCHED


class _Statistics(Protocol):
    """The HTTP port's counters (`server.HttpStatistics`)."""

    @property
    def served(self) -> int: ...

    @property
    def connections(self) -> int: ...


class Served(Protocol):
    """What the metrics read of the HTTP server (`server.HttpServer`; a protocol, so that
    the two modules do not import each other)."""

    api: Api
    hub: NotificationHub
    stopping: bool
    reserve_refused: int

    def statistics(self) -> _Statistics: ...


class Observability:
    """The counters `/metrics` adds to the server's own, the readiness flag and the scrape.

    `app.serve` sets `udp`, `tcp` and `listening` once every listener is bound.
    """

    def __init__(self, server: Served, *, public: bool = False) -> None:
        self.server = server
        self.public = public  # `[api] metrics_public`: /metrics without an administrator key
        self.udp: UdpEndpoint | None = None  # plain CoAP (None when it is off)
        self.tcp: TcpListener | None = None
        self.coaps: UdpEndpoint | None = None  # CoAP over DTLS
        self.listening = False
        self.http: dict[tuple[str, int], int] = {}  # responses by (route, status)
        self.lag = Histogram(LAG_BOUNDS)
        self.lag_max = 0.0  # the largest lag since the last scrape
        # the scrape under way (`scrape`): every scrape that arrives meanwhile waits for it
        self._walk: _Walk | None = None
        self.devices: dict[tuple[str, str, str], int] = {}  # counted by the last walk
        # a write the store had not committed when the lag probe looked, and since when
        self._waiting_write: tuple[int, float] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def count(self, status: int) -> None:
        """One response with `status` to the current request (its route from `ROUTE`)."""
        key = (ROUTE.get(), status)
        http = self.http
        http[key] = http.get(key, 0) + 1

    def attach(
        self, udp: UdpEndpoint, tcp: TcpListener, coaps: UdpEndpoint, *, plain: bool = True
    ) -> None:
        """The transports, once every listener is bound (`app.serve`); `plain`: whether plain
        CoAP (UDP and TCP) listens too."""
        self.udp, self.tcp = (udp, tcp) if plain else (None, None)
        self.coaps = coaps
        self.listening = True

    async def answer(self, method: bytes, route: str, app: str | None) -> Response:
        """The answer to `GET /healthz`, `/readyz` (status only, no key needed) or `/metrics`
        (an administrator key, unless `[api] metrics_public`)."""
        if method != b"GET":
            return NOT_ALLOWED
        if route == HEALTHZ:
            return OK
        if route == READYZ:
            return OK if self.ready() else NOT_READY
        if not self.public:
            if app is None:
                return UNAUTHORIZED
            if not is_admin(app):
                return ADMIN_ONLY
        return 200, [(b"content-type", CONTENT_TYPE)], await self.scrape()

    def ready(self) -> bool:
        """Listeners bound, the store open and caught up (not refusing work, no write
        waiting `STORE_STALL` for its commit), not stopping."""
        server = self.server
        if not self.listening or server.stopping or server.api.sup.store_behind():
            return False
        waiting = self._waiting_write  # (a disk that hangs fails nothing: it commits nothing)
        return waiting is None or trio.current_time() - waiting[1] < STORE_STALL

    def watch_store(self) -> None:
        """Note a write the store has not committed yet (its mark, now), or forget the one
        noted once it is committed: `ready` is False while one waits `STORE_STALL`."""
        store = self.server.api.sup.store
        waiting = self._waiting_write
        if waiting is not None and store.is_durable(waiting[0]):
            waiting = None
        if waiting is None and store.backlog() > 0:
            waiting = (store.mark(), trio.current_time())
        self._waiting_write = waiting

    async def scrape(self) -> bytes:
        """The metrics in Prometheus's text format.

        Scrapes are coalesced: one that arrives while another is under way waits for that
        one's text. The registered devices are counted `DEVICES_PER_PASS` a scheduler pass
        (`count_devices`), so a scrape at 100k devices never holds the loop for the walk,
        however many scrapes arrive together."""
        while True:
            walk = self._walk
            if walk is None:
                walk = self._walk = _Walk()
                try:
                    self.devices = await self.count_devices()
                    walk.text = self.text()
                finally:  # (cancelled: a waiting scrape takes the walk over)
                    self._walk = None
                    walk.done.set()
            else:
                await walk.done.wait()
            if walk.text is not None:
                return walk.text

    def text(self) -> bytes:
        """The metrics' text now, with the devices as `count_devices` last counted them."""
        out = generate_latest(self.registry)
        self.lag_max = 0.0
        return out

    async def count_devices(self) -> dict[tuple[str, str, str], int]:
        """The registered devices by (binding, queue mode, security mode), counted
        `DEVICES_PER_PASS` at a time with a checkpoint between (a device that registers or
        leaves meanwhile may be counted or not, as in any scrape taken a moment earlier)."""
        sup = self.server.api.sup
        credentials = sup.credentials
        counts: dict[tuple[str, str, str], int] = {}
        # a snapshot (the dict may change between passes; no new object per device)
        endpoints, actors = list(sup.by_endpoint), list(sup.by_endpoint.values())
        for start in range(0, len(endpoints), DEVICES_PER_PASS):
            if start:
                await trio.lowlevel.checkpoint()
            end = start + DEVICES_PER_PASS
            for endpoint, actor in zip(endpoints[start:end], actors[start:end], strict=True):
                reg = actor.reg
                mode = security_mode(credentials, endpoint)
                key = (reg.transports, "true" if reg.queue_mode else "false", mode)
                counts[key] = counts.get(key, 0) + 1
        return counts

    async def measure_lag(self, interval: float = LAG_INTERVAL) -> None:
        """Forever: sleep `interval` and record how much later than asked it woke (the time
        the event loop was busy with other tasks); and look at the store (`watch_store`)."""
        lag = self.lag
        while True:
            asked = trio.current_time() + interval
            await trio.sleep_until(asked)
            late = max(trio.current_time() - asked, 0.0)
            lag.observe(late)
            self.lag_max = max(self.lag_max, late)
            self.watch_store()


class _Walk:
    """One scrape under way, and the text it wrote (None until then, or if it was
    cancelled): the scrapes waiting for it take that text."""

    __slots__ = ("done", "text")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.text: bytes | None = None


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.total)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    family: CounterMetricFamily | GaugeMetricFamily, rows: Iterable[tuple[list[str], float]]
) -> CounterMetricFamily | GaugeMetricFamily:
    for labels, value in rows:
        family.add_metric(labels, value)
    return family


class _Collector(Collector):
    """Reads the server's counters at scrape time."""

    def __init__(self, obs: Observability) -> None:
        self.obs = obs

    def collect(self) -> Iterator[Metric]:
        obs = self.obs
        server = obs.server
        sup = server.api.sup
        yield from self._devices(obs)
        stats = dict(sup.statistics)
        p = "dm_actor_"
        for key, name, doc in _SUPERVISOR_COUNTERS:
            yield _counter(p + name, doc, stats.get(key, 0))
        refusals = CounterMetricFamily(
            p + "coap_refusals",
            "CoAP messages refused or dropped by the device layer, by kind",
            labels=["kind"],
        )
        yield _labelled(refusals, (([k], stats.get(k, 0)) for k in _DEVICE_REFUSALS))
        yield from self._commands(obs)
        yield from self._transports(obs)
        yield from self._store(obs)
        yield from self._events(obs)
        yield from self._http(obs)
        yield _histogram(
            p + "event_loop_lag_seconds",
            "How late the event loop woke a task that slept (sampled every 0.25 s)",
            obs.lag,
        )
        yield _gauge(
            p + "event_loop_lag_max_seconds",
            "The largest event-loop lag since the previous scrape",
            obs.lag_max,
        )

    @staticmethod
    def _devices(obs: Observability) -> Iterator[Metric]:
        counts = obs.devices  # (`Observability.count_devices`, before the text is written)
        family = GaugeMetricFamily(
            "dm_actor_devices_registered",
            "Devices registered now, by binding (transport letters), queue mode and security"
            " mode (psk over DTLS, nosec)",
            labels=["binding", "queue_mode", "security"],
        )
        yield _labelled(family, ((list(k), n) for k, n in sorted(counts.items())))

    @staticmethod
    def _commands(obs: Observability) -> Iterator[Metric]:
        sup = obs.server.api.sup
        registry = sup.registry
        answered = CounterMetricFamily(
            "dm_actor_commands_answered",
            "Device requests finished (AsyncIDResponses), by status and error",
            labels=["status", "error"],
        )
        rows = sorted(registry.outcomes.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        yield _labelled(answered, (([str(s), e or ""], n) for (s, e), n in rows))
        yield _histogram(
            "dm_actor_delivery_latency_seconds",
            "From a device request's 202 Accepted to its AsyncIDResponse",
            registry.delivery_latency,
        )

    @staticmethod
    def _transports(obs: Observability) -> Iterator[Metric]:
        p = "dm_actor_"
        sockets = [("coap", obs.udp), ("coaps", obs.coaps)]
        udp = [(name, ep.statistics()) for name, ep in sockets if ep is not None]
        counters = (
            ("datagrams_received", "UDP datagrams received", "received"),
            ("datagrams_sent", "UDP datagrams the kernel took to send", "sent"),
            ("datagrams_send_dropped",
             "UDP datagrams not sent: the socket's send buffer was full, or an error", "dropped"),
            ("udp_kernel_drops",
             "UDP datagrams the kernel dropped for a full receive buffer (Linux)", "kernel_drops"),
            ("udp_unreachable", "ICMP unreachable reports received", "unreachable"),
        )  # fmt: skip
        for name, doc, field in counters:
            family = CounterMetricFamily(p + name, doc + ", by socket", labels=["socket"])
            yield _labelled(family, (([sock], getattr(u, field)) for sock, u in udp))
        if obs.tcp is not None:
            t = obs.tcp.statistics()
            yield _gauge(p + "coap_tcp_connections", "CoAP/TCP connections open now", t.open)
            yield _counter(p + "coap_tcp_accepted", "CoAP/TCP connections accepted", t.accepted)
            family = CounterMetricFamily(
                p + "coap_tcp_refusals",
                "CoAP/TCP connections refused or closed by a limit, by kind",
                labels=["kind"],
            )
            rows = [
                (["refused"], t.refused),
                (["shed"], t.shed),
                (["handshake_timeouts"], t.handshake_timeouts),
                (["accept_errors"], t.accept_errors),
                (["errors"], t.errors),
                (["receiver_waits"], t.receiver_waits),
            ]
            yield _labelled(family, rows)

    @staticmethod
    def _store(obs: Observability) -> Iterator[Metric]:
        sup = obs.server.api.sup
        store = sup.store
        p = "dm_actor_store_"
        yield _gauge(p + "backlog", "Writes recorded, not yet committed", store.backlog())
        yield _gauge(
            p + "answers_waiting",
            "Answers (2.01, 202, ...) held until the store commits what they promise",
            sup.registry.awaiting,
        )
        healthy = int(store.healthy())
        yield _gauge(p + "healthy", "1 while the store writes, 0 while it retries", healthy)
        latency = getattr(store, "commit_latency", None)
        if isinstance(latency, Histogram):  # the SQLite store's (the memory one has none)
            yield _histogram(p + "commit_seconds", "One store transaction, with its fsync", latency)

    @staticmethod
    def _events(obs: Observability) -> Iterator[Metric]:
        hub = obs.server.hub
        sup = obs.server.api.sup
        p = "dm_actor_events_"
        waiting = GaugeMetricFamily(
            p + "waiting",
            "Events in a notification channel's buffer, not taken yet",
            labels=["application", "mechanism"],
        )
        dropped = CounterMetricFamily(
            p + "dropped",
            "Events a notification channel's bound dropped",
            labels=["application", "mechanism"],
        )
        delivered = CounterMetricFamily(
            p + "delivered",
            "Events a notification channel's consumer took",
            labels=["application", "mechanism"],
        )
        for app, channel in sorted(hub.channels.items()):
            labels = [app, channel.mechanism]
            waiting.add_metric(labels, len(channel))
            dropped.add_metric(labels, channel.dropped)
            delivered.add_metric(labels, channel.delivered)
        yield waiting
        yield dropped
        yield delivered
        events = sup.events
        yield _gauge(
            p + "stream_waiting", "Events published, not yet fanned out to channels", len(events)
        )
        yield _counter(
            p + "stream_dropped",
            "Events dropped before the channels (the stream's bound: its reader fell behind)",
            events.dropped,
        )
        yield _counter(
            p + "unrouted", "Events for applications without a channel, dropped", hub.unrouted
        )
        tap = hub.tap
        if isinstance(tap, EventTap):  # the administrators' event tap (console.py)
            yield _gauge(p + "taps", "Administrators' event taps open", len(tap.subscribers))
            yield _counter(p + "tap_dropped", "Events the event taps' bounds dropped", tap.dropped)

    @staticmethod
    def _http(obs: Observability) -> Iterator[Metric]:
        server = obs.server
        p = "dm_actor_http_"
        requests = CounterMetricFamily(
            p + "responses",
            "HTTP responses sent, by route pattern and status",
            labels=["route", "status"],
        )
        rows = sorted(obs.http.items())
        yield _labelled(requests, (([r, str(s)], n) for (r, s), n in rows))
        s = server.statistics()
        yield _gauge(p + "connections", "HTTP connections served now", s.served)
        yield _counter(p + "connections_accepted", "HTTP connections served, in all", s.connections)
        refusals = CounterMetricFamily(
            p + "refusals",
            "HTTP connections or requests refused by a limit, by kind",
            labels=["kind"],
        )
        kinds = ("bad_requests", "connections_shed", "head_timeouts", "body_timeouts",
                 "send_timeouts", "refused_per_address", "server_errors", "accept_errors",
                 "websockets_too_slow")  # fmt: skip
        yield _labelled(refusals, (([k], getattr(s, k)) for k in kinds))
        yield _counter(
            p + "reserve_refused",
            "Connections taken in the reserve at the connection limit whose request was not a"
            " health check or /metrics (answered 503)",
            server.reserve_refused,
        )
        router = getattr(server, "router", None)  # cluster mode (proxy.py)
        if router is not None:
            cluster = CounterMetricFamily(
                p + "cluster", "Cluster mode: requests routed between nodes, by kind",
                labels=["kind"],
            )  # fmt: skip
            yield _labelled(cluster, (([k], n) for k, n in router.statistics.items()))
            yield from _cluster_node("dm_actor_", router.view, getattr(server, "relay", None))


def _cluster_node(p: str, node: Any, relay: Any) -> Iterator[Metric]:
    """Cluster mode: this node's leases, its lease rounds, the datagrams its link forwarded
    and the events its relay sent (`dm_actor.node`, `transport/link.py`, `api/relay.py`)."""
    book = getattr(node, "book", None)
    if book is not None:
        yield _gauge(p + "cluster_slots", "Cluster mode: slots this node holds", len(book.held))
    stats = getattr(node, "statistics", None)
    if isinstance(stats, dict):
        rounds = CounterMetricFamily(
            p + "cluster_node", "Cluster mode: lease rounds and slot moves, by kind",
            labels=["kind"],
        )  # fmt: skip
        yield _labelled(rounds, (([k], n) for k, n in stats.items()))
    link = getattr(node, "link", None)
    if link is not None:
        frames = CounterMetricFamily(
            p + "cluster_link", "Cluster mode: datagrams through the internal link, by kind",
            labels=["kind"],
        )  # fmt: skip
        yield _labelled(frames, (([k], n) for k, n in link.statistics.items()))
    if relay is not None:
        counts = dataclasses.asdict(relay.statistics())
        waiting = counts.pop("waiting", 0)
        events = CounterMetricFamily(
            p + "cluster_relay", "Cluster mode: events relayed between nodes, by kind",
            labels=["kind"],
        )  # fmt: skip
        yield _labelled(events, (([k], n) for k, n in counts.items()))
        yield _gauge(p + "cluster_relay_waiting", "Cluster mode: events waiting to be relayed",
                     waiting)  # fmt: skip


#: supervisor counters exposed one metric each: (statistics key, metric name, meaning)
_SUPERVISOR_COUNTERS = (
    ("registrations", "registrations", "Registers accepted (2.01 Created)"),
    ("updates", "registration_updates", "Registration Updates accepted (2.04 Changed)"),
    ("deregistrations", "deregistrations", "De-registers accepted (2.02 Deleted)"),
    ("expirations", "registration_expirations", "Registrations ended by their lifetime"),
    ("registrations_shed", "registrations_shed",
     "Registers, Updates and De-registers answered 5.03 while the store was behind"),
    ("commands_accepted", "commands_accepted", "Device requests accepted (202)"),
    ("retransmissions", "coap_retransmissions", "CoAP requests to devices sent again"),
    ("coap_timeouts", "coap_timeouts",
     "CoAP requests to devices given up after the last retransmission"),
    ("decode_errors", "decode_errors", "CoAP messages that could not be decoded"),
)  # fmt: skip
#: the device layer's refusals and drops (`coap_refusals{kind}`)
_DEVICE_REFUSALS = (
    "messages_refused",
    "mailbox_overloaded",
    "frames_dropped",
    "datagrams_too_large",
    "blockwise_failures",
    "peer_errors",
)
