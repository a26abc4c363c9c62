"""Pelion's SDK (`mbed-cloud-sdk==2.2.0`) across a deleted long-poll channel (issue 14 item 8).

`stop_notifications()` sends `DELETE /v2/notification/pull` while its thread's poll waits:
that poll gets 410 `CHANNEL_DELETED` (the SDK expects it: "An HTTP 410 can be raised when
stopping"), the thread ends, and `start_notifications()` polls a new channel. A channel
deleted by someone else is the same 410 to the thread, which polls again after its back-off.
Real time: the SDK is threaded.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from mbed_cloud import ConnectAPI

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device

from .client import HttpClient
from .test_sdk import KEY, TIMEOUT, call

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)


async def test_stop_then_start_notifications_recovers(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    with trio.fail_after(60):
        listening = await nursery.start(partial(app.serve, settings, api_keys=ApiKeys([KEY])))
        assert listening.http is not None
        host = f"http://127.0.0.1:{listening.http[1]}"
        dev = Device(listening.coap_udp, "sdk-dev")
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        api = await call(ConnectAPI, {"host": host, "api_key": KEY})
        async with HttpClient(listening.http, KEY) as other:
            try:
                await call(api.start_notifications)
                await trio.sleep(0.5)  # its thread's poll waits now
                started = time.monotonic()
                await call(api.stop_notifications)  # DELETE: the waiting poll gets 410
                assert time.monotonic() - started < 2  # the thread ended at once
                assert not api.has_active_notification_thread
                reply = await other.request("GET", "/v2/notification/channel")
                assert reply.status == 404
                await call(api.start_notifications)  # a new channel
                read = partial(api.get_resource_value, timeout=TIMEOUT)
                assert await call(read, "sdk-dev", "/3/0/1") == "42"
                # deleted by another client while the thread polls: it polls again
                await trio.sleep(0.5)
                reply = await other.request("DELETE", "/v2/notification/pull")
                assert (reply.status, reply.text) == (200, "REMOVED")
                with trio.fail_after(TIMEOUT):  # the SDK's back-off: 1 s
                    for _ in range(10 * TIMEOUT):
                        await trio.sleep(0.1)
                        reply = await other.request("GET", "/v2/notification/channel")
                        if reply.status == 200:
                            break
                assert await call(read, "sdk-dev", "/3/0/0") == "42"
            finally:
                await call(api.stop_notifications)
    # the SDK logged the 410 it got while not stopping (once), and went on
    failed = [r for r in caplog.records if "long poll failed" in r.getMessage()]
    assert len(failed) == 1 and "410" in failed[0].getMessage()
