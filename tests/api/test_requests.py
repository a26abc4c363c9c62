"""Device requests, the queue view, endpoints, devices, and every kind of bad input."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import trio
import trio.testing

from dm_actor.api.server import HttpOptions
from dm_actor.config import parse_settings
from tests.actors.support import GatedStore

from .client import KEY_A, HttpClient, raw_exchange, start_api
from .test_flow import online, pull

GET_1 = {"method": "GET", "uri": "/3/0/1"}


async def test_bad_input_gets_its_documented_answer_and_the_server_keeps_serving(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=HttpOptions(max_body=1000))
    await online(api, nursery)
    post = "/v2/device-requests/dev?async-id="
    cases: list[tuple[str, object, bytes, int, str]] = [
        (post + "ok", None, b"{not json", 400, "MALFORMED_JSON_CONTENT"),
        (post + "ok", {"method": "FETCH", "uri": "/3/0/1"}, b"", 400, "MALFORMED_JSON_CONTENT"),
        (post + "ok", {"method": "GET"}, b"", 400, "MALFORMED_JSON_CONTENT"),
        (post + "ok", {"method": "GET", "uri": ""}, b"", 400, "MALFORMED_JSON_CONTENT"),
        (post + "ok", {"method": "PUT", "uri": "/3/0/1", "payload-b64": "@@"}, b"", 400,
         "MALFORMED_JSON_CONTENT"),
        (post + "ok", {"method": "PUT", "uri": "/3/0/1", "content-type": "x/y"}, b"", 400,
         "MALFORMED_JSON_CONTENT"),
        (post + "bad%20id", GET_1, b"", 400, "MALFORMED_ASYNC_ID"),
        (post + "x" * 41, GET_1, b"", 400, "MALFORMED_ASYNC_ID"),
        ("/v2/device-requests/dev", GET_1, b"", 400, "MALFORMED_ASYNC_ID"),
        (post + "ok&retry=11", GET_1, b"", 400, "MALFORMED_RETRY"),
        (post + "ok&retry=two", GET_1, b"", 400, "MALFORMED_RETRY"),
        (post + "ok&expiry-seconds=59", GET_1, b"", 400, "MALFORMED_EXPIRY_SECONDS"),
        (post + "ok&expiry-seconds=2592001", GET_1, b"", 400, "MALFORMED_EXPIRY_SECONDS"),
        ("/v2/device-requests/ghost?async-id=ok", GET_1, b"", 404, "DEVICE_NOT_FOUND"),
        (post + "ok", {"method": "GET", "uri": "/5/0/1"}, b"", 404, "URI_PATH_DOES_NOT_EXISTS"),
        (post + "ok", None, b"x" * 1001, 413, "Request body too large."),
    ]  # fmt: skip
    async with api.client() as client:
        for target, body, raw, status, text in cases:
            reply = await client.request("POST", target, json=body, body=raw)
            assert (reply.status, reply.text) == (status, text), target
            assert reply.headers[b"content-type"].startswith(b"text/plain")
        for key in (None, "ak_wrong"):
            reply = await client.request("POST", post + "ok", json=GET_1, key=key)
            assert (reply.status, reply.text) == (401, "Authentication failure.")
        reply = await client.request("GET", "/v2/nothing-here")
        assert reply.status == 404 and reply.json()["code"] == 404
        assert (await client.request("PATCH", "/v2/device-requests/dev")).status == 405
        # after all that the same connections still work
        reply = await client.request("POST", post + "fine", json={"method": "GET", "uri": "3/0/1"})
        assert reply.status == 202  # the SDK's uri without a leading "/"
    assert client.connections == 2  # the 413 closed one: its body was never read


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
        (b"POST /v2/device-requests/dev?async-id=a HTTP/1.1\r\nHost: x\r\n"
         b"Content-Length: 5000000\r\n\r\n", b"413"),
    ],
)  # fmt: skip
async def test_malformed_http(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, data: bytes, status: bytes
) -> None:
    api = await start_api(nursery)
    answer = await raw_exchange(api.addr, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    async with api.client() as client:
        assert (await client.request("GET", "/v3/devices")).status == 200


async def test_percent_encoded_device_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    ep = "urn:imei:490154203237518"
    await online(api, nursery, ep=ep)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")  # the channel, then the event
        reply = await client.request(
            "POST", f"/v2/device-requests/{quote(ep, safe='')}?async-id=i1", json=GET_1
        )
        assert reply.status == 202
        message = await pull(client)
        assert [r["id"] for r in message["async-responses"]] == ["i1"]
        reply = await client.request("GET", f"/v2/endpoints/{quote(ep, safe='')}")
        assert reply.status == 200


async def test_queue_full_is_429(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, parse_settings("[delivery]\nqueue_length = 2"))
    await online(api, nursery, answer=False)
    async with api.client() as client:
        for i, status in enumerate((202, 202, 429)):
            reply = await client.request(
                "POST", f"/v2/device-requests/dev?async-id=f{i}", json=GET_1
            )
            assert reply.status == status
        assert reply.text == "QUEUE_IS_FULL"


async def test_request_expired_in_virtual_time_and_the_queue_view(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        await online(api, nursery, binding="UQ")
        await trio.sleep(100)  # the queue-mode device is asleep
        assert "registrations" in await pull(client)
        accepted_at = trio.current_time()
        reply = await client.request(
            "POST", "/v2/device-requests/dev?async-id=e1&expiry-seconds=60&retry=3", json=GET_1
        )
        assert reply.status == 202
        reply = await client.request(
            "POST", "/v2/device-requests/dev?async-id=e2", json={"method": "POST", "uri": "/3/0/4"}
        )
        view = (await client.request("GET", "/v2/device-requests/dev")).json()
        assert view["queue_mode"] and view["queue_length"] == 2 and view["awake_until"] is None
        first, second = view["commands"]
        assert first["async-id"] == "e1" and first["attempts_left"] == 4
        assert (first["in_flight"], first["attempts"], first["waiting_for"]) == (
            False, 0, "device-wake-up")  # fmt: skip
        assert second["waiting_for"] == "earlier-commands"
        assert first["expires_at"] > first["accepted_at"]
        assert first["expires_at"].endswith("Z")
        while (reply := await client.request("GET", "/v2/notification/pull")).status == 204:
            pass  # each long poll ends with 204 after 30 s
        # expired after 60 s, found by the sweep that runs every 60 s
        assert 60 <= trio.current_time() - accepted_at <= 121
        assert reply.json()["async-responses"] == [
            {"id": "e1", "status": 429, "error": "REQUEST_EXPIRED"}
        ]
        view = (await client.request("GET", "/v2/device-requests/dev")).json()
        assert [c["async-id"] for c in view["commands"]] == ["e2"]
        reply = await client.request("GET", "/v2/device-requests/ghost")
        assert (reply.status, reply.text) == (404, "DEVICE_NOT_FOUND")


async def test_long_poll_rules(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as first, api.client() as second, api.client() as third:
        async with trio.open_nursery() as polls:
            polls.start_soon(first.request, "GET", "/v2/notification/pull")
            await trio.sleep(1)
            reply = await second.request("GET", "/v2/notification/pull")
            assert reply.status == 409
            reply = await second.request("PUT", "/v2/notification/websocket")
            assert reply.status == 400  # another channel type exists
            assert (await second.request("GET", "/v2/notification/channel")).json() == {
                "delivery_mechanism": "LONG_POLLING"
            }
        # a client that hangs up while polling frees the channel at once
        await third.request("GET", "/v2/device-requests/none")
        hung = trio.CancelScope()

        async def hang_up() -> None:
            with hung:
                await third.request("GET", "/v2/notification/pull")

        nursery.start_soon(hang_up)
        await trio.sleep(1)
        hung.cancel()
        await third.aclose()
        await trio.sleep(0.1)
        assert (await second.request("GET", "/v2/notification/pull")).status == 204
        reply = await second.request("DELETE", "/v2/notification/pull")
        assert (reply.status, reply.text) == (200, "REMOVED")
        reply = await second.request("DELETE", "/v2/notification/pull")
        assert (reply.status, reply.text) == (200, "ALREADY_DELETED")
        assert (await second.request("GET", "/v2/notification/channel")).status == 404


async def test_endpoints_and_device_directory(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    for ep in ("dev-c", "dev-a", "dev-b"):
        await online(api, nursery, ep=ep)
    async with api.client() as client:
        reply = await client.request("GET", "/v2/endpoints/dev-a")
        resources = reply.json()  # instances registered: their resources, from the models
        assert {r["uri"].rsplit("/", 1)[0] for r in resources} == {
            "/1/0", "/3/0", "/3303/0", "/3311/0"}  # fmt: skip
        assert {"uri": "/3303/0/5700", "obs": True, "type": ""} in resources
        reply = await client.request("GET", "/v2/endpoints/ghost")
        assert (reply.status, reply.text) == (404, "Endpoint not found")
        target = "/v3/devices/?limit=2&include=total_count&filter=state%3Dregistered"
        page = (await client.request("GET", target)).json()
        assert [d["id"] for d in page["data"]] == ["dev-a", "dev-b"]
        assert (page["has_more"], page["total_count"], page["object"]) == (True, 3, "list")
        page = (await client.request("GET", target + "&after=dev-b")).json()
        assert [d["id"] for d in page["data"]] == ["dev-c"] and not page["has_more"]
        page = (await client.request("GET", "/v3/devices?order=DESC&limit=2")).json()
        assert [d["id"] for d in page["data"]] == ["dev-c", "dev-b"]
        page = (await client.request("GET", "/v3/devices?order=DESC&limit=2&after=dev-b")).json()
        assert [d["id"] for d in page["data"]] == ["dev-a"] and not page["has_more"]
        page = (await client.request("GET", "/v3/devices?limit=2&after=dev-a")).json()
        assert [d["id"] for d in page["data"]] == ["dev-b", "dev-c"] and not page["has_more"]
        assert page["total_count"] == 3
        page = (await client.request("GET", "/v3/devices?limit=2&after=dev-0")).json()
        assert [d["id"] for d in page["data"]] == ["dev-a", "dev-b"] and page["has_more"]
        page = (await client.request("GET", "/v3/devices?filter=state%3Dderegistered")).json()
        assert page["data"] == []
        assert (await client.request("GET", "/v3/devices?filter=color%3Dred")).status == 400
        assert (await client.request("GET", "/v3/devices?limit=1")).status == 400
        device = (await client.request("GET", "/v3/devices/dev-b")).json()
        assert device["endpoint_name"] == "dev-b" and device["state"] == "registered"
        assert device["lifecycle_status"] == "enabled" and device["created_at"].endswith("Z")
        reply = await client.request("GET", "/v3/devices/ghost")
        assert reply.status == 404 and reply.json()["object"] == "error"


async def test_keep_alive_survives_an_idle_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=HttpOptions(idle_timeout=10))
    client = HttpClient(api.addr, KEY_A)
    async with client:
        assert (await client.request("GET", "/v3/devices")).status == 200
        await trio.sleep(11)  # the server closed the idle connection; the client reconnects
        assert (await client.request("GET", "/v3/devices")).status == 200
    assert client.connections == 2


async def test_a_stalled_store_refuses_new_commands_with_503_and_keeps_the_accepted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The disk stalls: writes pile up uncommitted. Past the limit new commands and
    subscriptions get 503 STORE_IS_BEHIND instead of growing memory; what was accepted
    before goes through once the store catches up."""
    store = GatedStore()
    store.open = True
    api = await start_api(nursery, store=store)
    dev = await online(api, nursery)
    store.open = False
    statuses: list[int] = []

    async def post(i: int) -> None:
        async with api.client() as client:
            reply = await client.request(
                "POST",
                f"/v2/device-requests/dev?async-id=s{i}",
                json={"method": "GET", "uri": f"/3/0/{i}"},
            )
            statuses.append(reply.status)

    for i in range(2):
        nursery.start_soon(post, i)
    await trio.sleep(5)
    assert statuses == []  # waiting for the store
    api.sup._held_limit = store.backlog()  # the limit is reached
    async with api.client() as client:
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=s9", json=GET_1)
        assert (reply.status, reply.text) == (503, "STORE_IS_BEHIND")
        reply = await client.request("PUT", "/v2/subscriptions/dev/3/0/9")
        assert (reply.status, reply.text) == (503, "STORE_IS_BEHIND")
    store.open = True
    store.commit()
    await trio.sleep(5)
    assert statuses == [202, 202]
    assert sorted(e.path for e in dev.executed) == ["/3/0/0", "/3/0/1"]
    async with api.client() as client:
        reply = await client.request("POST", "/v2/device-requests/dev?async-id=s9", json=GET_1)
        assert reply.status == 202


async def test_at_the_connection_limit_the_oldest_idle_connection_makes_room(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """At `max_connections` a new connection sheds the oldest idle keep-alive one (it has no
    request under way), so idle sockets cannot lock others out; its client reconnects."""
    options = HttpOptions(max_connections=2)
    api = await start_api(nursery, options=options)
    first, second = api.client(), api.client()
    for client in (first, second):
        await client.__aenter__()
        assert (await client.request("GET", "/v3/devices")).status == 200
    async with api.client() as third:
        with trio.fail_after(0.1):
            assert (await third.request("GET", "/v3/devices")).status == 200
    assert (await second.request("GET", "/v3/devices")).status == 200
    assert second.connections == 1  # the newer idle one was kept
    assert (await first.request("GET", "/v3/devices")).status == 200
    assert first.connections == 2  # the oldest was closed: its client reconnected
    await first.aclose()
    await second.aclose()


async def test_without_crowding_an_idle_connection_stays_open(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=HttpOptions(max_connections=2))
    async with api.client() as client:
        assert (await client.request("GET", "/v3/devices")).status == 200
        await trio.sleep(500)  # under the 600 s idle timeout
        assert (await client.request("GET", "/v3/devices")).status == 200
        assert client.connections == 1  # the same connection both times


async def test_channel_and_presubscription_changes_are_answered_once_stored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: PUT /v2/notification/websocket (201) and PUT /v2/subscriptions
    (204) were answered before they were stored, and while the disk was full: after the
    restart the channel and the pre-subscriptions were gone. Now the answer waits for the
    store, and a store that is behind refuses with 503."""
    store = GatedStore()
    api = await start_api(nursery, store=store)
    done: list[int] = []

    async def put(path: str, body: object) -> None:
        async with api.client() as client:
            done.append((await client.request("PUT", path, json=body)).status)

    nursery.start_soon(put, "/v2/subscriptions", [{"endpoint-name": "x*"}])
    nursery.start_soon(put, "/v2/notification/websocket", {})
    await trio.sleep(5)
    assert done == []  # written, not yet durable
    store.commit()
    await trio.sleep(1)
    assert sorted(done) == [201, 204]
    api.sup._held_limit = 1
    store.delete_channel("nobody")  # a write the disk has not taken
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/subscriptions", json=[{"endpoint-name": "y"}])
        assert (reply.status, reply.text) == (503, "STORE_IS_BEHIND")
