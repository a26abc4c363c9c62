"""`GET /metrics` read by prometheus_client's own parser, its values checked against what the
test did (registrations, updates, de-registrations, commands and their outcomes, CoAP
retransmissions and timeouts, HTTP responses by route); `/healthz` and `/readyz`; who may
read `/metrics`. The app runs in-process on loopback sockets, in virtual time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.api.metrics import route_of
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from tests.actors.support import Device, settle

from .client import KEY_A, HttpClient

if TYPE_CHECKING:
    from pathlib import Path

ADMIN = "ak_admin_metrics"
KEYS = ApiKeys([KEY_A], admin_keys=[ADMIN])

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def serving(nursery: trio.Nursery, tmp_path: Path, extra: str = "") -> app.Listening:
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\nstore = "memory"\n'
        f'data_dir = "{tmp_path}"\n{extra}'
    )
    listening: app.Listening = await nursery.start(
        lambda task_status: app.serve(settings, api_keys=KEYS, task_status=task_status)
    )
    return listening


def parse(text: str) -> Samples:
    """Every sample of the exposition, by (name, sorted labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape(client: HttpClient) -> Samples:
    reply = await client.request("GET", "/metrics")
    assert reply.status == 200, reply.text
    assert reply.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    return parse(reply.text)


async def test_metrics_count_what_the_test_did(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    assert listening.http is not None
    coap = listening.coap_udp
    devices = {
        "d1": Device(coap, "d1"),
        "d2": Device(coap, "d2", binding="UQ"),
        "d3": Device(coap, "d3"),
        "hung": Device(coap, "hung", answer=False),  # never answers a request of ours
    }
    for dev in devices.values():
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
    assert (await devices["d3"].update()).code == Code.CHANGED
    assert (await devices["d3"].update()).code == Code.CHANGED
    assert (await devices["d3"].deregister()).code == Code.DELETED
    async with HttpClient(listening.http, KEY_A) as client:
        for device, async_id in (("d1", "a1"), ("hung", "a2")):
            reply = await client.request(
                "POST",
                f"/v2/device-requests/{device}?async-id={async_id}",
                json={"method": "GET", "uri": "/3/0/0"},
            )
            assert reply.status == 202, reply.text
        reply = await client.request(
            "POST",
            "/v2/device-requests/nobody?async-id=a3",
            json={"method": "GET", "uri": "/3/0/0"},
        )
        assert reply.status == 404
        assert (await client.request("GET", "/v3/devices/d1")).status == 200
        assert (await client.request("GET", "/no/such/thing/at/all")).status == 404
        await trio.sleep(200)  # the hung device's request: 2+4+8+16+32 s, then 64 s more
        await settle()
    async with HttpClient(listening.http, ADMIN) as admin:
        m = await scrape(admin)
        again = await scrape(admin)

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    none = "nosec"
    assert value("dm_actor_devices_registered", binding="U", queue_mode="false", security=none) == 2
    assert value("dm_actor_devices_registered", binding="U", queue_mode="true", security=none) == 1
    assert value("dm_actor_registrations_total") == 4
    assert value("dm_actor_registration_updates_total") == 2
    assert value("dm_actor_deregistrations_total") == 1
    assert value("dm_actor_registration_expirations_total") == 0
    assert value("dm_actor_commands_accepted_total") == 2
    assert value("dm_actor_commands_answered_total", status="200", error="") == 1
    assert value("dm_actor_commands_answered_total", status="504", error="TIMEOUT") == 1
    assert value("dm_actor_delivery_latency_seconds_count") == 2
    # the answered one within 5 ms of virtual time; the timed-out one after ~93 s
    assert value("dm_actor_delivery_latency_seconds_bucket", le="0.005") == 1
    assert value("dm_actor_delivery_latency_seconds_bucket", le="60.0") == 1
    assert value("dm_actor_delivery_latency_seconds_bucket", le="300.0") == 2
    assert value("dm_actor_coap_retransmissions_total") == 5  # max_retransmit
    assert value("dm_actor_coap_timeouts_total") == 1
    assert value("dm_actor_datagrams_received_total", socket="coap") >= 4 + 3 + 1  # + ACK
    assert value("dm_actor_datagrams_sent_total", socket="coap") >= 4 + 3 + 2 + 5
    assert value("dm_actor_datagrams_received_total", socket="coaps") == 0
    route = "/v2/device-requests/{device-id}"
    assert value("dm_actor_http_responses_total", route=route, status="202") == 2
    assert value("dm_actor_http_responses_total", route=route, status="404") == 1
    assert value("dm_actor_http_responses_total", route="/v3/devices/{id}", status="200") == 1
    assert value("dm_actor_http_responses_total", route="unmatched", status="404") == 1
    assert value("dm_actor_http_connections") == 1  # the scrape's own
    assert value("dm_actor_store_backlog") == 0
    assert value("dm_actor_store_healthy") == 1
    assert value("dm_actor_events_stream_dropped_total") == 0
    assert ("dm_actor_event_loop_lag_seconds_count", ()) in m
    # the first scrape is counted in the second
    assert again[("dm_actor_http_responses_total", (("route", "/metrics"), ("status", "200")))] == 1


async def test_events_waiting_per_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    assert listening.http is not None
    async with HttpClient(listening.http, KEY_A) as client:
        assert (await client.request("PUT", "/v2/notification/websocket")).status in (200, 201)
        dev = Device(listening.coap_udp, "d1")
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        await settle()
    async with HttpClient(listening.http, ADMIN) as admin:
        m = await scrape(admin)
    waiting = {k: v for k, v in m.items() if k[0] == "dm_actor_events_waiting"}
    assert list(waiting.values()) == [1.0]  # the registration, nobody connected to take it
    ((_, labels),) = waiting
    assert dict(labels)["mechanism"] == "WEB_SOCKET"


async def test_who_may_read_metrics_and_health(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    assert listening.http is not None
    async with HttpClient(listening.http, None) as anonymous:
        assert (await anonymous.request("GET", "/metrics")).status == 401
        for path in ("/healthz", "/readyz"):
            reply = await anonymous.request("GET", path)
            assert (reply.status, reply.body) == (200, b"OK")
        assert (await anonymous.request("POST", "/healthz")).status == 405
    async with HttpClient(listening.http, KEY_A) as application:
        assert (await application.request("GET", "/metrics")).status == 403
    async with HttpClient(listening.http, ADMIN) as admin:
        assert (await admin.request("GET", "/metrics")).status == 200


async def test_metrics_public(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path, "[api]\nmetrics_public = true\n")
    assert listening.http is not None
    async with HttpClient(listening.http, None) as anonymous:
        reply = await anonymous.request("GET", "/metrics")
        assert reply.status == 200
        assert ("dm_actor_registrations_total", ()) in parse(reply.text)


async def test_readyz_says_503_while_the_store_is_behind(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving(nursery, tmp_path)
    assert listening.http is not None
    registry = listening.supervisor.registry
    async with HttpClient(listening.http, None) as client:
        registry.held_limit = 0  # as if 100,000 writes waited for the disk
        assert (await client.request("GET", "/readyz")).status == 503
        assert (await client.request("GET", "/healthz")).status == 200  # alive all the same
        registry.held_limit = 100_000
        assert (await client.request("GET", "/readyz")).status == 200


def test_route_labels_are_bounded() -> None:
    """Whatever the path, the route label is one of a few patterns (never the raw path)."""
    assert route_of(["v2", "device-requests", "ep-123"]) == "/v2/device-requests/{device-id}"
    assert route_of(["v2", "endpoints", "ep", "3", "0", "0"]) == (
        "/v2/endpoints/{device-id}/{resource-path}"
    )
    assert route_of(["v2", "endpoints"]) == "/v2/endpoints"
    assert route_of(["v2", "subscriptions", "ep"]) == "/v2/subscriptions/{device-id}"
    assert route_of(["v2", "notification", "pull"]) == "/v2/notification/pull"
    assert route_of(["v2", "notification", "x" * 50]) == "unmatched"
    assert route_of(["v3", "devices", ""]) == "/v3/devices"
    assert route_of(["v3", "devices", "abc"]) == "/v3/devices/{id}"
    assert route_of(["metrics"]) == "/metrics"
    assert route_of(["a" * 100, "b"]) == "unmatched"
    assert route_of([""]) == "/"
