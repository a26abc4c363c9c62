"""The console's HTTP side: its assets without a key, the administrators' `/admin/` routes,
and the event tap (bounded, drops counted, never holding back an application's channel).

Real loopback HTTP and WebSockets, scripted CoAP devices, virtual time.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Any

import hypothesis
import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed

from dm_actor.api.auth import ApiKeys, admin_id
from dm_actor.api.console import STATIC, decoded
from dm_actor.api.server import HttpServer
from dm_actor.api.tap import AdminResults, EventTap
from dm_actor.store.memory import MemoryStore
from tests.actors.support import start_server
from tests.api.client import (
    KEY_A,
    KEY_B,
    Api,
    HttpClient,
    next_message,
    raw_exchange,
    start_api,
    websocket,
)
from tests.api.test_flow import online
from tests.api.test_websocket import UPGRADE

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

ADMIN = "adm_console_test_key"
KEYS = ApiKeys([KEY_A, KEY_B], admin_keys=[ADMIN])
OWNER_A = KEYS.owner(KEY_A) or ""
ADMIN_ID = admin_id(ADMIN)
TAP = "/admin/events"


async def start(nursery: trio.Nursery, tap: EventTap | None = None) -> tuple[Api, HttpServer]:
    """A server with the HTTP API; the `HttpServer` too (its console), with `tap` if given."""
    server = await start_server(nursery, store=MemoryStore())
    http = HttpServer(server.sup, KEYS)
    if tap is not None:
        http.console.tap = tap
        http.console.install(http.hub)
    addr = await nursery.start(http.run, "127.0.0.1", 0)
    return Api(server, addr), http


async def wait_result(admin: HttpClient, async_id: str) -> dict[str, Any]:
    while True:
        reply = await admin.request("GET", f"/admin/async-responses/{async_id}")
        assert reply.status == 200, reply.text
        body: dict[str, Any] = reply.json()
        if body["state"] == "done":
            return body
        await trio.sleep(0.1)


async def tap_until(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    """Read the tap until an event of `kind`; that event."""
    while True:
        message: dict[str, Any] = json.loads(await ws.get_message())
        for event in message["events"]:
            if event["kind"] == kind:
                found: dict[str, Any] = event
                return found


# -- the page -------------------------------------------------------------------------------


async def test_assets_are_served_without_a_key_and_reference_nothing_elsewhere(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    async with api.client(key=None) as anonymous:
        page = await anonymous.request("GET", "/console/")
        assert page.status == 200
        assert page.headers[b"content-type"] == b"text/html; charset=utf-8"
        csp = page.headers[b"content-security-policy"].decode()
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        html = page.text
        # every asset the page names is served, from here
        assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
        assert sorted(assets) == ["console.css", "console.js"]
        for name in assets:
            reply = await anonymous.request("GET", f"/console/{name}")
            assert reply.status == 200, name
            assert not re.search(rb"https?://", reply.body), name  # no CDN, nothing remote
        etag = page.headers[b"etag"].decode()
        again = await anonymous.request("GET", "/console/", headers=[("if-none-match", etag)])
        assert (again.status, again.body) == (304, b"")
        moved = await anonymous.request("GET", "/console")
        assert (moved.status, moved.headers[b"location"]) == (301, b"/console/")
        assert (await anonymous.request("GET", "/console/../auth.py")).status == 404
        assert (await anonymous.request("GET", "/console/nothing.js")).status == 404
        assert (await anonymous.request("POST", "/console/")).status == 405
        # the data is not: the API needs the key
        assert (await anonymous.request("GET", "/admin/overview")).status == 401
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "console.js", "console.css"}


async def test_admin_routes_need_an_administrator_key(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    await online(api, nursery)
    async with api.client(KEY_A) as app, api.client(ADMIN) as admin:
        for method, path in [
            ("GET", "/admin/overview"),
            ("GET", "/admin/devices/dev"),
            ("POST", "/admin/device-requests/dev"),
            ("GET", "/admin/async-responses/x"),
            ("PUT", "/admin/subscriptions/dev/3/0/0"),
        ]:
            reply = await app.request(method, path, json={"method": "GET", "uri": "/3/0/0"})
            assert reply.status == 403, (method, path)
            assert reply.json()["type"] == "forbidden"
        reply = await app.request("GET", TAP, headers=UPGRADE)
        assert reply.status == 403
        assert (await app.request("GET", TAP, headers=UPGRADE, key=None)).status == 401
        overview = (await admin.request("GET", "/admin/overview")).json()
        assert overview["devices_registered"] == 1
        assert overview["commands_in_flight"] == 0
        assert overview["store_healthy"] is True
        assert (await admin.request("GET", "/admin/nothing/x")).status == 404
        assert (await admin.request("DELETE", "/admin/overview")).status == 405


# -- one device ---------------------------------------------------------------------------------


async def test_device_view_names_resources_from_the_models(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    await online(api, nursery)
    async with api.client(ADMIN) as admin:
        view = (await admin.request("GET", "/admin/devices/dev")).json()
        assert (view["state"], view["binding"], view["transport"]) == ("registered", "U", "udp")
        assert view["security_mode"] == "nosec"
        assert view["objects"]["3303"] == "Temperature"
        by_path = {r["path"]: r for r in view["resources"]}
        assert by_path["/3303/0/5700"]["name"] == "Sensor Value"
        assert by_path["/3/0/4"]["operations"] == "E"
        assert by_path["/3311/0/5851"]["units"] == "%"
        assert (await admin.request("GET", "/admin/devices/ghost")).status == 404


async def test_admin_device_request_answers_reach_the_admin_only(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An administrator's read is a 202 whose AsyncIDResponse, decoded, is at
    /admin/async-responses/{id} and on the tap; never on an application's channel, never
    kept as owed to a channel, and its stored copy is forgotten."""
    api, _ = await start(nursery)
    store = api.sup.store
    assert isinstance(store, MemoryStore)
    await online(api, nursery)
    async with api.client(KEY_A) as app, api.client(ADMIN) as admin:
        assert (await app.request("PUT", "/v2/notification/websocket")).status == 201
    async with (
        api.client(KEY_A) as app,
        api.client(ADMIN) as admin,
        websocket(api, [f"pelion_{KEY_A}"]) as channel,
    ):
        async with _tap(api) as tap:
            reply = await admin.request(
                "POST", "/admin/device-requests/dev", json={"method": "GET", "uri": "/3303/0/5700"}
            )
            assert reply.status == 202, reply.text
            async_id = reply.json()["async-response-id"]
            result = await wait_result(admin, async_id)
            assert result["response"]["status"] == 200
            assert result["values"] == [
                {"path": "/3303/0/5700", "name": "Sensor Value", "value": "42", "units": "Cel"}
            ]
            event = await tap_until(tap, "async-responses")
            assert event["item"]["id"] == async_id and event["to"] == ["admin"]
            assert event["ep"] == "dev" and event["values"][0]["value"] == "42"
        # the application's own request is answered on its channel, and only it
        reply = await app.request(
            "POST",
            "/v2/device-requests/dev?async-id=app-1",
            json={"method": "GET", "uri": "/3/0/0"},
        )
        assert reply.status == 202
        with trio.fail_after(10):
            message = await next_message(channel)
        assert [r["id"] for r in message["async-responses"]] == ["app-1"]
        # a repeat of the administrator's async-id is its own (no clash with applications')
        assert (await admin.request("GET", f"/admin/async-responses/{async_id}")).status == 200
        assert (await app.request("GET", f"/admin/async-responses/{async_id}")).status == 403
    hub = _hub(api)
    assert ADMIN_ID not in hub.owed and ADMIN_ID not in hub.orphans
    assert ADMIN_ID not in store.events


async def test_admin_observation_shows_notifications_on_the_tap_not_on_channels(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api, _ = await start(nursery)
    dev = await online(api, nursery)
    async with api.client(ADMIN) as admin, _tap(api) as tap:
        path = "/admin/subscriptions/dev/3303/0/5700"
        assert (await admin.request("PUT", path)).status == 200
        assert (await admin.request("GET", "/admin/subscriptions/dev")).json() == ["/3303/0/5700"]
        view = (await admin.request("GET", "/admin/devices/dev")).json()
        assert view["subscribed"] == ["/3303/0/5700"]
        first = await tap_until(tap, "notifications")  # (the Observe's first value)
        assert first["to"] == ["admin"]
        await dev.notify("/3303/0/5700", b"21.5")
        event = await tap_until(tap, "notifications")
        assert event["values"] == [
            {"path": "/3303/0/5700", "name": "Sensor Value", "value": "21.5", "units": "Cel"}
        ]
        hub = _hub(api)
        assert ADMIN_ID not in hub.orphans
        assert (await admin.request("DELETE", path)).status == 204
        assert (await admin.request("GET", "/admin/subscriptions/dev")).json() == []
        assert "/3303/0/5700" not in dev.observers or api.sup.subscriptions_of("dev") == []
        assert (await admin.request("PUT", "/admin/subscriptions/dev/9/9/9")).status == 404


# -- the tap --------------------------------------------------------------------------------


def test_tap_buffers_are_bounded_and_count_what_they_drop() -> None:
    from dm_actor.actors.events import ChannelEvent

    tap = EventTap(capacity=5, max_subscribers=2)
    one, two = tap.subscribe(), tap.subscribe()
    assert one is not None and two is not None and tap.subscribe() is None
    assert tap.refused == 1
    events = [ChannelEvent("registrations", {"ep": str(i)}, None, None) for i in range(12)]
    tap(events[:3])
    assert (len(one.events), one.dropped) == (3, 0)
    assert [e.item for e in one.take(2)] == [{"ep": "0"}, {"ep": "1"}]
    tap(events[3:12])  # 1 waiting + 9: 5 kept, 5 dropped
    assert (len(one.events), one.dropped) == (5, 5)
    assert [e.item for e in one.take(10)] == [{"ep": str(i)} for i in range(7, 12)]
    assert (len(two.events), two.dropped) == (5, 7)
    tap.unsubscribe(one)
    assert tap.subscribe() is not None
    results = AdminResults(capacity=2)
    for i in range(3):
        results(ADMIN_ID, ChannelEvent("async-responses", {"id": str(i)}, None, None))
    assert results.get(ADMIN_ID, "0") is None and results.get(ADMIN_ID, "2") == {"id": "2"}


async def test_a_stalled_tap_never_holds_back_an_application_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A hostile administrator's socket that upgrades and then reads nothing: the
    application's WebSocket gets every event before the tap is closed, the tap's buffer stays
    at its bound and counts what it drops, and the tap is closed after `ping_interval`."""
    tap = EventTap(capacity=100)
    api, http = await start(nursery, tap)
    total = 20_000
    payload = "x" * 600
    async with api.client(KEY_A) as app:
        options = {"serialization": {"max_chunk_size": 500}}
        assert (await app.request("PUT", "/v2/notification/websocket", json=options)).status == 201
    async with websocket(api, [f"pelion_{KEY_A}"]) as channel:
        stalled = await trio.open_tcp_stream(*api.addr[:2])
        async with stalled:
            request = (
                f"GET {TAP} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in UPGRADE)
                + "\r\n"
            )
            await stalled.send_all(request.encode())
            while not tap.subscribers:  # noqa: ASYNC110 (the upgrade served: no event to wait on)
                await trio.sleep(0.01)
            started = trio.current_time()
            for i in range(total):
                api.sup.events.publish(
                    "notifications", {"ep": "dev", "path": "/1/0/0", "payload": payload, "n": i},
                    frozenset((OWNER_A,)),
                )  # fmt: skip
                if i % 1000 == 999:
                    await trio.lowlevel.checkpoint()
            received = 0
            with trio.fail_after(5):
                while received < total:
                    message = await next_message(channel)
                    assert "events-lost" not in message
                    received += len(message["notifications"])
            took = trio.current_time() - started
            [subscriber] = tap.subscribers
            assert len(subscriber.events) <= 100
            assert subscriber.dropped + subscriber.taken + len(subscriber.events) == total
            assert subscriber.dropped > total // 2
            overview = await _admin_get(api, "/admin/overview")
            assert overview["taps"] == 1 and overview["taps_dropped"] == subscriber.dropped
            # closed once it took no message for ping_interval (30 s)
            await trio.sleep(http.options.ping_interval * 2 + 1)
            assert tap.subscribers == [] and http.console.too_slow == 1
            # /metrics, read by Prometheus's parser: the drops outlive the tap
            samples = {
                sample.name: sample.value
                for family in text_string_to_metric_families(await _metrics(api))
                for sample in family.samples
            }
            assert samples["dm_actor_events_taps"] == 0
            assert samples["dm_actor_events_tap_dropped_total"] == subscriber.dropped
    # (before the tap was closed for its slowness: nothing waited for it)
    assert took < http.options.ping_interval, took


async def test_tap_counts_every_event_it_does_not_deliver(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A slow reader: every event is delivered or counted in `dropped` (nothing lost
    unannounced), and a registration reaches the tap like any event."""
    tap = EventTap(capacity=50)
    api, _ = await start(nursery, tap)
    async with _tap(api) as ws:
        total = 1000
        for i in range(total):
            api.sup.events.publish("notifications", {"ep": "d", "path": "/3/0/0", "n": i},
                                   frozenset(("someone",)))  # fmt: skip
        seen: list[int] = []
        dropped = 0
        with trio.fail_after(10):
            while len(seen) + dropped < total:
                message = json.loads(await ws.get_message())
                seen += [e["item"]["n"] for e in message["events"]]
                dropped = message["dropped"]
        assert seen == sorted(seen) and dropped > 0 and len(seen) >= 50
        await online(api, nursery, "late")
        event = await tap_until(ws, "registrations")
        assert event["item"]["ep"] == "late" and event["to"] == "all"


async def test_too_many_taps_are_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api, _ = await start(nursery, EventTap(max_subscribers=1))
    async with _tap(api), _tap(api) as second:
        with pytest.raises(ConnectionClosed) as closed:
            await second.get_message()
        reason = closed.value.reason
        assert reason is not None and reason.code == 1013


# -- helpers ---------------------------------------------------------------------------------


def _hub(api: Api) -> Any:
    """The hub of the server serving `api` (found through the supervisor's event stream's
    reader: the only `NotificationHub` of the test)."""
    import gc

    from dm_actor.api.channels import NotificationHub

    hubs = [o for o in gc.get_objects() if isinstance(o, NotificationHub)
            and o.events is api.sup.events]  # fmt: skip
    assert len(hubs) == 1
    return hubs[0]


async def _metrics(api: Api) -> str:
    async with api.client(ADMIN) as admin:
        reply = await admin.request("GET", "/metrics")
        assert reply.status == 200
        return reply.text


async def _admin_get(api: Api, path: str) -> Any:
    async with api.client(ADMIN) as admin:
        reply = await admin.request("GET", path)
        assert reply.status == 200, reply.text
        return reply.json()


def _tap(api: Api) -> Any:
    """The administrators' event tap, authenticated by the `pelion_<key>` subprotocol (as a
    browser does); its first message is empty."""
    from contextlib import asynccontextmanager

    from trio_websocket import wrap_client_stream

    @asynccontextmanager
    async def connect() -> Any:
        stream = await trio.open_tcp_stream(*api.addr[:2])
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", TAP,
                                          subprotocols=[f"pelion_{ADMIN}"])  # fmt: skip
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    return connect()


__all__ = ["raw_exchange"]


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(
    payload=st.binary(max_size=64)
    | st.sampled_from([b'[{"bn":"/3/0/","n":"0","vs":"x"}]', b'[{"n":"1e999","v":1e999}]']),
    ct=st.sampled_from(
        [
            "text/plain",
            "application/octet-stream",
            "application/cbor",
            "application/senml+json",
            "application/senml+cbor",
            "application/vnd.oma.lwm2m+tlv",
            "application/vnd.oma.lwm2m+json",
            "application/vnd.oma.lwm2m+cbor",
            "weird/x",
            "11542",
            "99999999999",
        ]
    ),
    base=st.sampled_from([None, "/3", "/3/0", "/3/0/0", "/3/0/11/0", "/3303/0/5700"]),
)
def test_any_payload_a_device_sends_is_shown_or_said_undecodable(
    payload: bytes, ct: str, base: str | None
) -> None:
    """What the tap and the results view show of a device's payload never raises: values
    (JSON-encodable) or a `decode_error`."""
    out = decoded({"payload": base64.b64encode(payload).decode(), "ct": ct}, base)
    assert set(out) <= {"values", "decode_error"}
    msgspec.json.encode(out)
