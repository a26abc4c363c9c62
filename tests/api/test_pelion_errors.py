"""Issue 14 item 8: Pelion's JSON 401 on `/v3`, a request id per request, 400 for an upgrade
without `Connection: Upgrade`, and 410 `CHANNEL_DELETED` for a long poll whose channel was
deleted while it waited. Real HTTP over loopback, virtual time; each answer is checked
against docs/openapi.json (`Checked`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.api.server import HttpServer
from dm_actor.logformat import JsonFormatter
from tests.actors.support import start_server

from .client import KEY_A, KEYS, WEBSOCKET_PATH, HttpClient, start_api
from .test_openapi import Checked

if TYPE_CHECKING:
    import pytest

    from dm_actor.api.routes import Request, Response

REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


async def test_v3_401_is_pelions_error_body_with_a_request_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client(None) as client:
        call = Checked(client)
        ids = []
        for target in ("/v3/devices", "/v3/devices/dev?x=1", "/v3", "/v3/"):
            if target.startswith("/v3/devices"):  # (documented: the answer is checked)
                reply = await call("GET", target, 401)
            else:
                reply = await client.request("GET", target)
            assert reply.status == 401
            assert reply.headers[b"content-type"] == b"application/json"
            body = reply.json()
            assert {k: v for k, v in body.items() if k not in ("request_id", "fields")} == {
                "object": "error", "code": 401, "type": "invalid_auth",
                "message": "Authentication failure."}  # fmt: skip
            assert REQUEST_ID.match(body["request_id"]), body
            ids.append(body["request_id"])
        assert len(set(ids)) == len(ids)  # one per request ...
        assert len({i[:16] for i in ids}) == 1  # ... the process's prefix and a count
        # /v2 keeps Pelion's plain string (its clients branch on the status)
        reply = await client.request("GET", "/v2/endpoints/dev")
        assert (reply.status, reply.text) == (401, "Authentication failure.")
        # a body announced with Expect: 100-continue is refused before it is sent
        reply = await client.request(
            "GET", "/v3/devices", headers=[("expect", "100-continue")], body=b"x"
        )
        assert reply.status == 401 and reply.json()["type"] == "invalid_auth"


async def test_every_error_body_has_its_own_request_id_and_the_log_line_says_it(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await start_server(nursery)
    http = HttpServer(server.sup, KEYS)
    addr = await nursery.start(http.run, "127.0.0.1", 0)
    dispatch = http.api.dispatch

    async def failing(req: Request) -> Response:
        if req.segments[-1] == "boom":
            raise RuntimeError("a handler's bug")
        return await dispatch(req)

    http.api.dispatch = failing  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="dm_actor.api.server")
    async with HttpClient(addr, KEY_A) as client:
        seen = []
        for method, target, status in [
            ("GET", "/v3/devices/ghost", 404),
            ("GET", "/v3/devices?limit=1", 400),
            ("DELETE", "/v3/devices", 405),
            ("GET", "/v2/nowhere", 404),  # an unknown path's ErrorResponse, on /v2 too
            ("GET", "/v3/devices/boom", 500),
        ]:
            reply = await client.request(method, target)
            assert reply.status == status
            request_id = reply.json()["request_id"]
            assert REQUEST_ID.match(request_id)
            lines = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
            assert lines[0] == f"HTTP request {request_id} from {_me(client)}: {method} {target}"
            seen.append(request_id)
        assert len(set(seen)) == len(seen)
        [failure] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert failure.getMessage() == f"HTTP request {seen[-1]} failed: GET /v3/devices/boom"
        assert failure.exc_info is not None
        # plain-string answers are left as they are
        reply = await client.request("GET", "/v2/endpoints/ghost")
        assert (reply.status, reply.text) == (404, "Endpoint not found")


def _me(client: HttpClient) -> object:
    assert client._stream is not None
    return client._stream.socket.getsockname()


async def test_an_upgrade_without_connection_upgrade_is_documented(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        call = Checked(client)
        upgrade = [("upgrade", "websocket"), ("sec-websocket-version", "13"),
                   ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]  # fmt: skip
        reply = await call("GET", WEBSOCKET_PATH, 400, headers=upgrade)
        assert reply.text == "Connection: Upgrade is required."
        # still 401 first without a key, 426 without Upgrade
        await call("GET", WEBSOCKET_PATH, 401, headers=upgrade, key=None)
        await call("GET", WEBSOCKET_PATH, 426, headers=[("connection", "Upgrade")])


async def test_a_poll_waiting_when_its_channel_is_deleted_gets_410(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as poller, api.client() as other:
        call = Checked(poller)
        replies = []

        async def poll() -> None:
            replies.append(await call("GET", "/v2/notification/pull", 410))

        async with trio.open_nursery() as polling:
            polling.start_soon(poll)
            await trio.sleep(5)  # waiting (it would answer 204 at 30 s)
            reply = await other.request("DELETE", "/v2/notification/pull")
            assert (reply.status, reply.text) == (200, "REMOVED")
        assert replies[0].text == "CHANNEL_DELETED"
        assert trio.current_time() < 6  # at once, not at the poll's timeout
        # the next poll makes a new channel (the SDK's stop-then-start)
        assert (await other.request("GET", "/v2/notification/channel")).status == 404
        async with trio.open_nursery() as polling:
            polling.start_soon(poll)
            await trio.sleep(1)
            reply = await other.request("GET", "/v2/notification/channel")
            assert reply.json() == {"delivery_mechanism": "LONG_POLLING"}
            await other.request("DELETE", "/v2/notification/pull")
        assert [r.text for r in replies] == ["CHANNEL_DELETED", "CHANNEL_DELETED"]


class JsonLines(logging.Handler):
    """The records of a logger as `--log-format json` writes them, formatted when emitted
    (in the task that logs, where the request's log context is set)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_json_log_lines_carry_the_request_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    handler = JsonLines()
    logger = logging.getLogger("dm_actor.api.server")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async with api.client() as client:
            reply = await client.request("GET", "/v3/devices/ghost")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    request_id = reply.json()["request_id"]
    [line] = [x for x in handler.lines if x["message"].startswith("HTTP request ")]
    assert line["request_id"] == request_id
    assert line["endpoint"] == "ghost"
