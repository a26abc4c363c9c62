"""One clock: the API and the notification hub date what they report with the wall clock
injected into `app.serve` (through the supervisor's `wall_offset`), never with their own
`time.time()`.

The injected clock here starts on 2001-09-09T01:46:40Z and follows virtual time: a date
of today in any answer is a second clock.
"""

from __future__ import annotations

import json
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from tests.actors.support import Device

from .client import KEY_A, HttpClient, websocket

if TYPE_CHECKING:
    from pathlib import Path

EPOCH = 1_000_000_000.0
DAY = "2001-09-09T01:"


async def test_the_api_and_the_hub_date_with_the_injected_wall_clock(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\nstore = "memory"\n'
        f'data_dir = "{tmp_path}"\n'
    )
    listening: app.Listening = await nursery.start(
        partial(
            app.serve,
            settings,
            api_keys=ApiKeys([KEY_A]),
            wall_clock=lambda: EPOCH + autojump_clock.current_time(),
        )
    )
    assert listening.http is not None
    async with HttpClient(listening.http, KEY_A) as client:
        reply = await client.request(
            "PUT", "/v2/notification/websocket",
            json={"serialization": {"type": "v2", "cfg": {"include_timestamp": True}}},
        )  # fmt: skip
        assert reply.status == 201
        async with websocket(listening.http, ["wss", f"pelion_{KEY_A}"]) as ws:
            dev = Device(listening.coap_udp, "dev", binding="UQ")
            await dev.start(nursery)
            assert (await dev.register()).code == Code.CREATED
            message = json.loads(await ws.get_message())
            [registration] = message["registrations"]
            assert registration["timestamp"].startswith(DAY)  # the hub's clock
        [device] = (await client.request("GET", "/v3/devices")).json()["data"]
        assert device["created_at"].startswith(DAY)
        await trio.sleep(100)  # the queue-mode device is asleep: the command waits
        reply = await client.request(
            "POST", "/v2/device-requests/dev?async-id=a1", json={"method": "GET", "uri": "/3/0/1"}
        )
        assert reply.status == 202
        view = (await client.request("GET", "/v2/device-requests/dev")).json()
        [command] = view["commands"]
        assert command["accepted_at"].startswith(DAY)  # the API's clock
        assert command["expires_at"].startswith("2001-09-12T01:")  # the default 3 days later
