"""Issue 14 items 4 and 5: a subscription exists once the device accepted its Observe.

`PUT /v2/subscriptions/{id}/{path}` answers 200 when the device accepts the Observe within
`[delivery] subscribe_wait` (3 s), else 202 `{"async-response-id"}` and exactly one
AsyncIDResponse follows on the channel (success, or the device's error: then it is neither
listed nor stored). Refusals of a re-observe (after a Register) and of a pre-subscription's
Observe are reported as AsyncIDResponses with `ep` and `path`. A leading `/` (`%2F3303%2F0`,
`//3303/0`) is accepted. Virtual time, real loopback sockets.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from dm_actor.coap.message import uint_bytes
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.store.memory import MemoryStore
from tests.actors.support import Device, Executed

from .client import KEY_B, next_message, start_api, websocket
from .test_flow import online
from .test_webhook import Receiver

if TYPE_CHECKING:
    from collections.abc import Container

    from dm_actor.coap.message import Message

    from .client import Api, HttpClient

REFUSED = "/3303/0/77"  # the device answers 4.04 to an Observe of it


def refuse(paths: Container[str]) -> Any:
    """A device handler answering 4.04 to a request on any of `paths` (as they are then)."""

    def handler(request: Message) -> tuple[int, bytes, int | None] | None:
        if "/" + "/".join(request.uri_path) in paths:
            return Code.NOT_FOUND, b"", None
        return None

    return handler


def subscriptions_stored(api: Api) -> list[str]:
    """The stored subscriptions' paths (one per application), sorted."""
    store = api.sup.store
    assert isinstance(store, MemoryStore)
    return sorted(path for path, _ in store.subscriptions.get("dev", set()))


async def polled(client: HttpClient) -> list[dict[str, Any]]:
    """Every message one long poll brings (none when it times out)."""
    reply = await client.request("GET", "/v2/notification/pull")
    assert reply.status in (200, 204), (reply.status, reply.body)
    return [reply.json()] if reply.status == 200 else []


def async_responses(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [item for m in messages for item in m.get("async-responses", [])]


async def test_accepted_within_the_wait_is_200_listed_and_owes_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        await online(api, nursery)
        await polled(client)  # the registration
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert (reply.status, reply.body) == (200, b"")
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 200
        assert subscriptions_stored(api) == ["/3303/0/5700"]
        messages = await polled(client) + await polled(client)
        assert async_responses(messages) == []  # a 200 owes no AsyncIDResponse
        assert [n["payload"] for m in messages for n in m.get("notifications", [])] == ["NDI="]


async def test_a_refused_observe_is_202_then_the_error_and_not_listed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        dev = await online(api, nursery, handler=refuse({REFUSED}))
        await polled(client)
        started = trio.current_time()
        reply = await client.request("PUT", f"/v2/subscriptions/dev{REFUSED}")
        assert reply.status == 202
        assert trio.current_time() - started < 1  # refused at once: no need to wait 3 s
        response_id = reply.json()["async-response-id"]
        [item] = async_responses(await polled(client))
        assert item == {"id": response_id, "status": 404, "error": "NOT_FOUND",
                        "ep": "dev", "path": REFUSED}  # fmt: skip
        assert (await client.request("GET", f"/v2/subscriptions/dev{REFUSED}")).status == 404
        reply = await client.request("GET", "/v2/subscriptions/dev")
        assert (reply.status, reply.text) == (404, "NO_SUBSCRIPTIONS")
        assert subscriptions_stored(api) == []
        assert REFUSED not in dev.observers
        assert async_responses(await polled(client)) == []  # one, not two


async def test_a_sleeping_device_gets_202_and_the_result_when_it_wakes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        dev = await online(api, nursery, binding="UQ")
        await polled(client)
        await trio.sleep(100)  # asleep (awake_time 93 s)
        started = trio.current_time()
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 202
        assert 3 <= trio.current_time() - started < 4  # [delivery] subscribe_wait
        response_id = reply.json()["async-response-id"]
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 404
        assert subscriptions_stored(api) == []
        # the same PUT again: the same pending subscription, the same id
        again = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert (again.status, again.json()) == (202, {"async-response-id": response_id})
        await trio.sleep(600)
        assert dev.executed == []
        await dev.update()  # it wakes: the Observe goes now
        messages = await polled(client)
        messages += await polled(client)
        [item] = async_responses(messages)
        assert item == {"id": response_id, "status": 200, "payload": "NDI=", "ct": "text/plain",
                        "max-age": 60, "ep": "dev", "path": "/3303/0/5700"}  # fmt: skip
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 200
        assert subscriptions_stored(api) == ["/3303/0/5700"]


async def test_a_device_that_never_answers_gets_202_then_a_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        await online(api, nursery, answer=False)
        await polled(client)
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 202
        response_id = reply.json()["async-response-id"]
        seen: list[dict[str, Any]] = []
        with trio.move_on_after(300):
            while not seen:
                seen += async_responses(await polled(client))
        assert seen == [{"id": response_id, "status": 504, "error": "TIMEOUT", "ep": "dev",
                         "path": "/3303/0/5700"}]  # fmt: skip
        assert (await client.request("GET", "/v2/subscriptions/dev/3303/0/5700")).status == 404


async def test_a_refused_re_observe_after_a_register_is_reported_and_removed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client, api.client(KEY_B) as other:
        await client.request("GET", "/v2/notification/pull")
        await other.request("GET", "/v2/notification/pull")
        paths: list[str] = []
        dev = await online(api, nursery, handler=refuse(paths))
        await polled(client)
        await polled(other)
        for c in (client, other):
            assert (await c.request("PUT", "/v2/subscriptions/dev/3303/0/5700")).status == 200
        assert (await client.request("PUT", "/v2/subscriptions/dev/3/0/1")).status == 200
        await polled(client)  # the first values
        await polled(other)
        paths.append("/3303/0/5700")  # the device now refuses it (a new firmware, say)
        assert (await dev.register()).code == Code.CREATED
        reports: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        with trio.move_on_after(300):
            while len(reports["a"]) < 1 or len(reports["b"]) < 1:
                reports["a"] += async_responses(await polled(client))
                reports["b"] += async_responses(await polled(other))
        for [item] in reports.values():
            assert item.pop("id")
            assert item == {"status": 404, "error": "NOT_FOUND", "ep": "dev",
                            "path": "/3303/0/5700"}  # fmt: skip
        assert (await client.request("GET", "/v2/subscriptions/dev")).text == "/3/0/1"
        assert (await other.request("GET", "/v2/subscriptions/dev")).status == 404
        assert subscriptions_stored(api) == ["/3/0/1"]
        assert api.sup.by_endpoint["dev"].observed_paths() == {"/3/0/1"}


async def test_a_refused_presubscription_observe_is_reported_and_not_kept(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        body = [{"endpoint-name": "dev", "resource-path": ["/3303/0/5700", REFUSED]}]
        assert (await client.request("PUT", "/v2/subscriptions", json=body)).status == 204
        dev = await online(api, nursery, handler=refuse({REFUSED}))
        items: list[dict[str, Any]] = []
        with trio.move_on_after(30):
            while not items:
                items += async_responses(await polled(client))
        [item] = items
        assert item.pop("id")
        assert item == {"status": 404, "error": "NOT_FOUND", "ep": "dev", "path": REFUSED}
        assert (await client.request("GET", "/v2/subscriptions/dev")).text == "/3303/0/5700"
        assert sorted(dev.observers) == ["/3303/0/5700"]
        assert subscriptions_stored(api) == ["/3303/0/5700"]


@pytest.mark.parametrize("channel", ["long-poll", "websocket", "webhook"])
async def test_exactly_one_async_response_per_202_on_each_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, channel: str
) -> None:
    api = await start_api(nursery)
    received: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(api.client())
        receive = await _open(channel, api, client, nursery, stack, received)
        dev = await online(api, nursery, handler=refuse({REFUSED}), binding="UQ")
        promised = []
        for path in (REFUSED, "/3303/0/5700"):  # refused at once; accepted on waking
            reply = await client.request("PUT", f"/v2/subscriptions/dev{path}")
            assert reply.status == (202 if path == REFUSED else 200)
            if reply.status == 202:
                promised.append(reply.json()["async-response-id"])
        await trio.sleep(100)  # asleep
        for path in ("/3/0/1", "/3311/0"):
            reply = await client.request("PUT", f"/v2/subscriptions/dev{path}")
            assert reply.status == 202
            promised.append(reply.json()["async-response-id"])
        await dev.update()
        deadline = trio.current_time() + 120
        while trio.current_time() < deadline:
            await receive()
    counts = Counter(item["id"] for item in async_responses(received))
    assert counts == Counter(promised)  # each once, and nothing else
    statuses = {item["id"]: item["status"] for item in async_responses(received)}
    assert [statuses[i] for i in promised] == [404, 200, 200]


async def _open(
    channel: str,
    api: Api,
    client: HttpClient,
    nursery: trio.Nursery,
    stack: AsyncExitStack,
    into: list[dict[str, Any]],
) -> Any:
    """Open `channel` for KEY_A; returns a coroutine function that receives for a while."""
    if channel == "long-poll":
        poller = await stack.enter_async_context(api.client())
        await poller.request("GET", "/v2/notification/pull")

        async def receive() -> None:
            into.extend(await polled(poller))

        return receive
    if channel == "websocket":
        assert (await client.request("PUT", "/v2/notification/websocket")).status == 201
        ws = await stack.enter_async_context(websocket(api, ["wss", "pelion_ak_test_a"]))
        readers = await stack.enter_async_context(trio.open_nursery())
        stack.callback(readers.cancel_scope.cancel)

        async def read() -> None:  # (always reading: a client that reads answers pings)
            while True:
                into.append(await next_message(ws))

        readers.start_soon(read)

        async def receive_ws() -> None:
            await trio.sleep(5)

        return receive_ws
    receiver = Receiver()
    url = await receiver.start(nursery)
    reply = await client.request("PUT", "/v2/notification/callback", json={"url": url})
    assert reply.status == 204

    async def receive_hook() -> None:
        await trio.sleep(5)
        into[:] = [json.loads(r.body) for r in receiver.deliveries()]  # (each answered 200)

    return receive_hook


async def test_a_leading_slash_in_the_path_is_accepted(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await online(api, nursery)
        # what the SDK's subscribe(ResourceValues(...)) sends, and a doubled slash
        for target in ("/v2/subscriptions/dev/%2F3303%2F0", "/v2/subscriptions/dev//3/0"):
            reply = await client.request("PUT", target)
            assert reply.status == 200, (target, reply.status, reply.body)
            assert (await client.request("GET", target)).status == 200
        assert (await client.request("GET", "/v2/subscriptions/dev")).text == "/3/0\n/3303/0"
        assert (await client.request("DELETE", "/v2/subscriptions/dev/%2F3303%2F0")).status == 204
        assert (await client.request("DELETE", "/v2/subscriptions/dev//3/0")).status == 204
        assert (await client.request("GET", "/v2/subscriptions/dev")).status == 404
        reply = await client.request("PUT", "/v2/subscriptions/dev/%2F3303%2F0%2F5700")
        assert reply.status == 200
        assert subscriptions_stored(api) == ["/3303/0/5700"]


async def test_a_flood_of_subscriptions_to_a_sleeping_device_stays_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Each path pending for a sleeping device holds one Observe in its queue: the 21st
    distinct path gets 429 (the queue of 20); a repeat joins its path's Observe."""
    api = await start_api(nursery)
    async with api.client() as client, api.client(KEY_B) as other:
        await online(api, nursery, binding="UQ")
        await trio.sleep(100)
        statuses: Counter[int] = Counter()
        for i in range(60):
            reply = await client.request("PUT", f"/v2/subscriptions/dev/3303/0/{i}")
            statuses[reply.status] += 1
        assert statuses == {202: 20, 429: 40}
        for c in (client, other):  # the same paths again: no new Observe, no new place
            for i in range(20):
                assert (await c.request("PUT", f"/v2/subscriptions/dev/3303/0/{i}")).status == 202
        assert len(api.sup.by_endpoint["dev"].queue) == 20
        subscriptions = api.sup.subscriptions
        assert len(subscriptions._observes) == len(subscriptions._by_path) == 20
        assert all(len(o.waiters) == 2 for o in subscriptions._observes.values())


@pytest.mark.parametrize("target", ["/v2/subscriptions/dev/3303/0/5700", "/v2/subscriptions/dev"])
async def test_a_pending_subscription_deleted_is_reported_and_never_recorded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, target: str
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        dev = await online(api, nursery, binding="UQ")
        await polled(client)
        await trio.sleep(100)  # asleep
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 202
        assert (await client.request("DELETE", target)).status == 204
        await dev.update()
        items: list[dict[str, Any]] = []
        with trio.move_on_after(30):
            while not items:
                items += async_responses(await polled(client))
        # the 202's promise is kept; nothing is subscribed, and nothing stays observed
        assert [(i["id"], i["status"]) for i in items] == [(reply.json()["async-response-id"], 200)]
        assert (await client.request("GET", "/v2/subscriptions/dev")).status == 404
        assert subscriptions_stored(api) == []
        assert api.sup.by_endpoint["dev"].observed_paths() == set()


@dataclass
class NotObservable(Device):
    """A device that answers an Observe with a plain 2.05: it adds no observer (RFC 7641)."""

    def _answer(self, req: Message, now: float) -> None:
        self.executed.append(Executed(req.code, "/" + "/".join(req.uri_path), req.mid, b""))
        options = ((OptionNumber.CONTENT_FORMAT, uint_bytes(0)),)
        self.coap.respond(req, Code.CONTENT, options, b"42", now)


async def test_a_2_05_without_observe_is_a_refusal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        await client.request("GET", "/v2/notification/pull")
        dev = NotObservable(api.server.addr, "dev")
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        await polled(client)
        reply = await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")
        assert reply.status == 202
        [item] = async_responses(await polled(client))
        assert item.pop("id") == reply.json()["async-response-id"]
        assert item == {"status": 412, "error": "OBSERVE_NOT_ACCEPTED", "ep": "dev",
                        "path": "/3303/0/5700"}  # fmt: skip
        assert (await client.request("GET", "/v2/subscriptions/dev")).status == 404
        assert subscriptions_stored(api) == []
