"""docs/openapi.json is true for the administrators' console routes: each operation answers,
with an administrator key, as documented (status, media type, body), against `app.serve`;
the event tap's messages match `x-tap-message`. The rest of the document is checked by
tests/api/test_openapi.py (its checks are reused here)."""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
import trio.testing
from trio_websocket import wrap_client_stream

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.config import ServerSettings, Settings
from tests.api.client import HttpClient
from tests.api.test_openapi import DOC, Checked, errors, http, online, operations

if TYPE_CHECKING:
    from pathlib import Path

KEY = "ak_console_openapi"
ADMIN = "adm_console_openapi"


async def test_admin_answers_match_the_documented_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    keys = ApiKeys([KEY], admin_keys=[ADMIN])
    listening: app.Listening = await nursery.start(partial(app.serve, settings, api_keys=keys))
    dev = await online(listening, nursery, "dev")
    async with HttpClient(http(listening), ADMIN) as client:
        call = Checked(client)
        async with _tap(listening) as tap:
            overview = (await call("GET", "/admin/overview", 200)).json()
            assert overview["devices_registered"] == 1
            await call("GET", "/admin/overview", 403, key=KEY)
            await call("GET", "/admin/overview", 401, key=None)
            await call("GET", "/admin/devices/dev", 200)
            await call("GET", "/admin/devices/ghost", 404)
            reply = await call(
                "POST", "/admin/device-requests/dev?async-id=c-1", 202,
                json={"method": "GET", "uri": "/3303/0/5700"},
            )  # fmt: skip
            assert reply.json() == {"async-response-id": "c-1"}
            await call(
                "POST", "/admin/device-requests/ghost", 404, json={"method": "GET", "uri": "/3/0"}
            )
            await call("POST", "/admin/device-requests/dev", 400, json={"method": "GET"})
            await call("GET", "/admin/device-requests/dev", 200)
            await call("GET", "/admin/device-requests/ghost", 404)
            done = False
            while not done:  # (the console polls so too)
                await trio.sleep(0.1)
                done = (await call("GET", "/admin/async-responses/c-1", 200)).json()[
                    "state"
                ] == "done"
            await call("GET", "/admin/async-responses/never", 404)
            await call("PUT", "/admin/subscriptions/dev/3303/0/5700", 200)
            await call("PUT", "/admin/subscriptions/dev/9/0", 404)
            assert (await call("GET", "/admin/subscriptions/dev", 200)).json() == ["/3303/0/5700"]
            await call("GET", "/admin/subscriptions/ghost", 404)
            await dev.notify("/3303/0/5700", b"20.5")
            schema = DOC["paths"]["/admin/events"]["get"]["x-tap-message"]
            kinds: set[str] = set()
            with trio.fail_after(10):
                while not {"async-responses", "notifications"} <= kinds:
                    message = json.loads(await tap.get_message())
                    assert errors(message, schema) == [], message
                    kinds |= {e["kind"] for e in message["events"]}
            call.succeeded.add(("GET", "/admin/events"))
            await call("DELETE", "/admin/subscriptions/dev/3303/0/5700", 204)
            await call("DELETE", "/admin/subscriptions/ghost/3303/0/5700", 404)
    documented = {(m, t) for m, t, _ in operations() if t.startswith("/admin/")}
    assert len(documented) == 9
    assert call.succeeded >= documented


def _tap(listening: app.Listening) -> Any:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def connect() -> Any:
        stream = await trio.open_tcp_stream(*http(listening)[:2])
        async with stream, trio.open_nursery() as nursery:
            auth = [(b"authorization", f"Bearer {ADMIN}".encode())]
            ws = await wrap_client_stream(
                nursery, stream, "127.0.0.1", "/admin/events", extra_headers=auth
            )
            yield ws
            with trio.move_on_after(5):
                await ws.aclose()
            nursery.cancel_scope.cancel()

    return connect()
