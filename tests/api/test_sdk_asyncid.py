"""Pelion's Python SDK (`mbed-cloud-sdk==2.2.0`, unmodified) reusing an async-id (issue 14
item 3; docs/delivery.md rule 1.7).

The SDK's public calls make a fresh async-id for every request (`utils.new_async_id`); its
request path, `ConnectAPI._mds_rpc_post(device_id, async_id=...)` (what every one of them
calls, over the generated `DeviceRequestsApi.create_async_request`), takes an application's
own id, as an application that builds ids from session, device and path does. An Execute
retried with its id gets the answer again through the SDK's long-poll thread and runs once
on the device; another request with the id is refused with 409; a new call (a new id) runs
again. Real time: the SDK is synchronous and threaded (see tests/api/test_sdk.py).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from mbed_cloud import ConnectAPI
from mbed_cloud._backends.mds.rest import ApiException

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device
from tests.api.test_sdk import TIMEOUT, call

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)

KEY = "ak_sdk_asyncid"


async def test_an_execute_retried_with_its_async_id_runs_once(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    with trio.fail_after(60):
        listening = await nursery.start(partial(app.serve, settings, api_keys=ApiKeys([KEY])))
        assert listening.http is not None
        dev = Device(listening.coap_udp, "sdk-dev")
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        host = f"http://127.0.0.1:{listening.http[1]}"
        api: Any = await call(ConnectAPI, {"host": host, "api_key": KEY})
        try:
            execute = partial(api._mds_rpc_post, "sdk-dev", async_id="reboot-1", method="POST",
                              uri="/3/0/4")  # fmt: skip
            consumer = await call(execute)
            await call(consumer.wait, TIMEOUT)
            assert not consumer.error
            # the application lost track of it (say it restarted) and retries with its id
            del api._db["reboot-1"]
            consumer = await call(execute)
            await call(consumer.wait, TIMEOUT)  # answered again: the SDK does not hang
            assert not consumer.error
            assert [(e.method, e.path) for e in dev.executed] == [(Code.POST, "/3/0/4")]
            with pytest.raises(ApiException) as refused:  # another request with the id
                await call(api._mds_rpc_post, "sdk-dev", async_id="reboot-1", method="GET",
                           uri="/3/0/4")  # fmt: skip
            assert (refused.value.status, refused.value.body) == (409, "ASYNC_ID_IN_USE")
            await call(api.execute_resource, "sdk-dev", "/3/0/4", timeout=TIMEOUT)  # a new id
            assert [(e.method, e.path) for e in dev.executed] == [(Code.POST, "/3/0/4")] * 2
        finally:
            await call(api.stop_notifications)
