"""Reusing an async-id (issue 14 item 3; docs/delivery.md rule 1.7), over the HTTP API.

An async-id is unique per application across its devices. While it is remembered (its
command unfinished, or finished within `expiry-seconds`), the same request again gets 202 and
is never executed again: one AsyncIDResponse per acceptance, the stored one (same body, same
`uid`) when the previous one was handed over already; another device or another request gets
409; after the window a repeat is a new command. Virtual time, real loopback sockets; the
restart tests on a real SQLite file.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from dm_actor.actors.commands import Accepted
from dm_actor.coap.numbers import Code
from dm_actor.config import DeliverySettings, Settings
from dm_actor.delivery.answers import AnswerMemory, Repeat
from tests.actors.support import Device
from tests.adversarial.test_attack_durability import READ, WRITE, drain, run_daemon
from tests.api.client import KEY_A, KEY_B, HttpClient, start_api, websocket
from tests.api.test_flow import online
from tests.api.test_webhook import Receiver
from tests.daemon import free_ports

if TYPE_CHECKING:
    from pathlib import Path

    from trio_websocket import WebSocketConnection

    from tests.api.client import Api

WITH_UID = {"serialization": {"cfg": {"include_uid": True}}}


def post(client: HttpClient, async_id: str, body: dict[str, Any], dev: str = "dev",
         query: str = "") -> Any:  # fmt: skip
    return client.request(
        "POST", f"/v2/device-requests/{dev}?async-id={async_id}{query}", json=body
    )


def writes(dev: Device) -> int:
    return sum(1 for e in dev.executed if e.method == Code.PUT)


async def answers(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """The AsyncIDResponses of the next WebSocket message that has some."""
    with trio.fail_after(30):
        while "async-responses" not in (message := json.loads(await ws.get_message())):
            pass
    out: list[dict[str, Any]] = message["async-responses"]
    return out


async def ws_channel(api: Api) -> None:
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/notification/websocket", json=WITH_UID)
        assert reply.status in (200, 201), reply.text


async def test_a_repeat_after_the_answer_was_handed_over_gets_the_same_answer_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The issue's hang: the second 202 was followed by nothing for 2 hours."""
    api = await start_api(nursery)
    await ws_channel(api)
    dev = await online(api, nursery)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws, api.client() as client:
        assert (await post(client, "w1", WRITE)).status == 202
        [first] = await answers(ws)
        assert (first["id"], first["status"], len(first["uid"])) == ("w1", 200, 36)
        for _ in range(2):  # each acceptance gets its AsyncIDResponse, the same one
            reply = await post(client, "w1", WRITE)
            assert (reply.status, reply.body) == (202, b"")
            assert await answers(ws) == [first]
        await trio.sleep(10)
    assert writes(dev) == 1  # executed once


async def test_a_repeat_in_flight_is_one_command_and_one_answer(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    dev = await online(api, nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        dev.mute = True  # it executes, its answers are lost: the attempt is in flight
        assert (await post(client, "w1", WRITE)).status == 202
        await trio.sleep(1)
        queue = (await client.request("GET", "/v2/device-requests/dev")).json()
        assert [(c["async-id"], c["in_flight"]) for c in queue["commands"]] == [("w1", True)]
        assert (await post(client, "w1", WRITE)).status == 202
        dev.mute = False  # the retransmission is answered from the device's dedup cache
        await trio.sleep(10)
        assert [r["id"] for r in await drain(client)] == ["w1"]
    assert writes(dev) == 1


async def test_a_repeat_whose_answer_still_waits_gets_that_one(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Finished, its AsyncIDResponse not handed over yet (no poll since): the repeat's 202
    is served by the one waiting, which is handed over after it."""
    api = await start_api(nursery)
    dev = await online(api, nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        assert (await post(client, "w1", WRITE)).status == 202
        await trio.sleep(5)
        assert (await post(client, "w1", WRITE)).status == 202
        assert [r["id"] for r in await drain(client)] == ["w1"]
        assert (await post(client, "w1", WRITE)).status == 202  # handed over: sent again
        assert [r["id"] for r in await drain(client)] == ["w1"]
    assert writes(dev) == 1


async def test_the_same_id_for_another_device_is_409(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    dev = await online(api, nursery)
    other = await online(api, nursery, ep="other")
    async with api.client() as client, api.client(KEY_B) as b:
        for c in (client, b):
            assert (await c.request("GET", "/v2/notification/pull")).status == 204
        dev.mute = True
        assert (await post(client, "w1", WRITE)).status == 202
        await trio.sleep(1)
        reply = await post(client, "w1", WRITE, dev="other")  # in flight on dev
        assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE")
        dev.mute = False
        await trio.sleep(10)
        assert [r["id"] for r in await drain(client)] == ["w1"]
        reply = await post(client, "w1", WRITE, dev="other")  # finished, remembered
        assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE")
        # another application's w1 is its own
        assert (await post(b, "w1", WRITE, dev="other")).status == 202
        assert [r["id"] for r in await drain(b)] == ["w1"]
        assert await drain(client) == []
    assert (writes(dev), writes(other)) == (1, 1)


async def test_a_different_request_with_a_remembered_id_is_409(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    dev = await online(api, nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        assert (await post(client, "w1", WRITE)).status == 202
        await trio.sleep(5)
        [first] = await drain(client)
        different = [
            {**WRITE, "payload-b64": "KzAz"},
            {**WRITE, "method": "POST"},
            {**WRITE, "uri": "/3/0/15"},
            {**WRITE, "content-type": "text/plain"},
            READ,
        ]
        for body in different:
            reply = await post(client, "w1", body)
            assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE"), body
        # the same request: the uri without its leading slash, other delivery parameters
        assert (await post(client, "w1", {**WRITE, "uri": "3/0/14"}, query="&retry=3")).status == (
            202
        )
        assert await drain(client) == [first]
        assert (await post(client, "w1", WRITE, query="&expiry-seconds=600")).status == 202
        assert await drain(client) == [first]
    assert writes(dev) == 1


async def test_after_the_window_a_repeat_is_a_new_command(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    await ws_channel(api)
    dev = await online(api, nursery)
    async with websocket(api, ["wss", f"pelion_{KEY_A}"]) as ws, api.client() as client:
        assert (await post(client, "w1", WRITE, query="&expiry-seconds=60")).status == 202
        [first] = await answers(ws)
        await trio.sleep(59)  # (finished about a second after its acceptance)
        assert (await post(client, "w1", WRITE, query="&expiry-seconds=60")).status == 202
        assert await answers(ws) == [first]
        await trio.sleep(2)  # 61 s after it finished: forgotten
        assert (await post(client, "w1", {**WRITE, "payload-b64": "KzAz"})).status == 202
        [second] = await answers(ws)
        assert second["id"] == "w1" and second["uid"] != first["uid"]
    assert writes(dev) == 2


async def test_the_oldest_answers_beyond_the_bound_are_forgotten(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """`[delivery] remembered_async_ids` per application: a repeat of an id pushed out is a
    new command (documented)."""
    api = await start_api(nursery, Settings(delivery=DeliverySettings(remembered_async_ids=2)))
    dev = await online(api, nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        for async_id in ("w1", "w2", "w3"):
            assert (await post(client, async_id, WRITE)).status == 202
            await trio.sleep(2)
        assert [r["id"] for r in await drain(client)] == ["w1", "w2", "w3"]
        assert len(api.sup.commands.answers) == 2
        for async_id in ("w3", "w2", "w1"):
            assert (await post(client, async_id, WRITE)).status == 202
            await trio.sleep(2)
        assert [r["id"] for r in await drain(client)] == ["w3", "w2", "w1"]
    assert writes(dev) == 4  # w1 again


async def test_every_channel_type_gets_one_answer_per_acceptance_webhook(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    receiver = Receiver()
    url = await receiver.start(nursery)
    dev = await online(api, nursery)
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/notification/callback", json={"url": url})
        assert reply.status == 204, reply.text
        for _ in range(3):
            assert (await post(client, "w1", WRITE)).status == 202
            await trio.sleep(5)
    got = [
        r["id"]
        for d in receiver.deliveries()
        for r in json.loads(d.body).get("async-responses", [])
    ]
    assert (got, writes(dev)) == (["w1", "w1", "w1"], 1)


async def test_a_repeat_after_a_restart_is_answered_from_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The application lost a 202 to a restart and retries: the write was done and its
    answer handed over; the retry gets 202 and the same AsyncIDResponse, and is not executed
    again; a different request with the id is still 409 (a real SQLite file)."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    [port] = free_ports(1)
    scope, first = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert first.http is not None
    dev = Device(first.coap_udp, "dev", lifetime=3600)
    await dev.start(nursery)
    await dev.register()
    async with HttpClient(first.http, KEY_A) as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        assert (await post(client, "w1", WRITE)).status == 202
        assert (await post(client, "w2", WRITE)).status == 202  # its answer stays owed
        [before] = [r for r in await drain(client) if r["id"] == "w1"]
    scope.cancel()
    await trio.sleep(1)
    scope, second = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert second.http is not None
    async with HttpClient(second.http, KEY_A) as client:
        assert (await post(client, "w1", WRITE)).status == 202
        reply = await post(client, "w1", {**WRITE, "payload-b64": "KzAz"})
        assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE")
        again = await drain(client)
    scope.cancel()
    assert again == [before]
    assert writes(dev) == 2  # w1 and w2, once each


async def test_a_window_that_ends_during_the_check_makes_a_new_command(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    """The clock moves between the look-up and the comparison (real time does): a repeat
    whose window ended just then is a new command, never a 202 with nothing after it."""
    api = await start_api(nursery)
    dev = await online(api, nursery)
    submit = api.sup.submit
    assert await submit("dev", "PUT", "/3/0/14", async_id="w1", payload=b"+02") == Accepted()
    await trio.sleep(5)
    monkeypatch.setattr(AnswerMemory, "check", lambda *_: Repeat.NEW)
    assert await submit("dev", "PUT", "/3/0/14", async_id="w1", payload=b"+02") == Accepted()
    await trio.sleep(5)
    assert writes(dev) == 2


async def test_an_unfinished_commands_id_stays_its_own_across_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A command still unfinished when the server stops keeps its id after the restart:
    another device with it gets 409, the same request 202 and still one command."""
    autojump_clock.autojump_threshold = 0.05  # SQLite commits run in a worker thread
    [port] = free_ports(1)
    scope, first = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert first.http is not None
    hung = Device(first.coap_udp, "dev", lifetime=3600, answer=False)
    other = Device(first.coap_udp, "other", lifetime=3600)
    for dev in (hung, other):
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
    async with HttpClient(first.http, KEY_A) as client:
        assert (await post(client, "w1", WRITE)).status == 202
    await trio.sleep(1)
    scope.cancel()
    await trio.sleep(1)
    scope, second = await run_daemon(nursery, tmp_path, autojump_clock, port)
    assert second.http is not None
    async with HttpClient(second.http, KEY_A) as client:
        reply = await post(client, "w1", WRITE, dev="other")
        assert (reply.status, reply.text) == (409, "ASYNC_ID_IN_USE")
        assert (await post(client, "w1", WRITE)).status == 202
        queue = (await client.request("GET", "/v2/device-requests/dev")).json()
        assert [c["async-id"] for c in queue["commands"]] == ["w1"]
    scope.cancel()
    assert writes(other) == 0
