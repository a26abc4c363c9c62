"""Pelion's published Python SDK (`mbed-cloud-sdk==2.2.0`), unmodified, against dm_actor.

The SDK is synchronous and threaded (requests, plus a long-poll thread), so it runs in worker
threads while the server and a scripted CoAP device run in the Trio nursery, in real time.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio
from mbed_cloud import ConnectAPI

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device

from .test_webhook import Received, Receiver

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from dm_actor.coap.message import Message

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)

KEY = "ak_sdk_test"
T = TypeVar("T")
TIMEOUT = 10  # seconds an SDK call may wait for its async response


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking SDK call in a worker thread."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


class Observed:
    """A device `handler` that notes each path the server starts observing (and lets the
    device answer as usual)."""

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}

    def _event(self, path: str) -> trio.Event:
        return self._events.setdefault(path, trio.Event())

    def __call__(self, request: Message) -> None:
        if request.observe == 0:
            self._event("/" + "/".join(request.uri_path)).set()

    async def wait(self, path: str) -> None:
        await self._event(path).wait()


async def test_the_pelion_sdk_works_unmodified(nursery: trio.Nursery, tmp_path: Path) -> None:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    with trio.fail_after(60):
        listening = await nursery.start(partial(app.serve, settings, api_keys=ApiKeys([KEY])))
        assert listening.http is not None
        host = f"http://127.0.0.1:{listening.http[1]}"
        dev = Device(listening.coap_udp, "sdk-dev", handler=Observed())
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        api = await call(ConnectAPI, {"host": host, "api_key": KEY})
        try:
            await _long_poll_mode(api, dev)
            await _presubscriptions(api, listening.coap_udp, nursery)
        finally:
            await call(api.stop_notifications)  # DELETE /v2/notification/pull
        await _webhook_mode(host, dev, nursery)


async def _long_poll_mode(api: Any, dev: Device) -> None:
    resources = await call(api.list_resources, "sdk-dev")
    instances = {"/1/0", "/3/0", "/3303/0", "/3311/0"}  # (instances: their resources)
    assert {r.path.rsplit("/", 1)[0] for r in resources} == instances
    assert ("/3303/0/5700", True) in {(r.path, r.observable) for r in resources}
    # the first call starts the long-poll thread and sends the request at once
    assert await call(api.get_resource_value, "sdk-dev", "/3/0/1", timeout=TIMEOUT) == "42"
    assert await call(api.get_resource_value, "sdk-dev", "3/0/1", timeout=TIMEOUT) == "42"
    await call(api.set_resource_value, "sdk-dev", "/3/0/14", "+02", timeout=TIMEOUT)
    await call(api.execute_resource, "sdk-dev", "/3/0/4", timeout=TIMEOUT)
    assert [(e.method, e.path, e.payload) for e in dev.executed] == [
        (Code.GET, "/3/0/1", b""),  # the second read came from the server's cache
        (Code.PUT, "/3/0/14", b"+02"), (Code.POST, "/3/0/4", b"")]  # fmt: skip
    values = await call(api.add_resource_subscription, "sdk-dev", "/3303/0/5700")
    assert isinstance(dev.handler, Observed)
    await dev.handler.wait("/3303/0/5700")
    assert await call(api.get_resource_subscription, "sdk-dev", "/3303/0/5700")
    assert await call(api.list_device_subscriptions, "sdk-dev") == ["/3303/0/5700"]
    assert await call(values.get, timeout=TIMEOUT) == b"42"  # the value when observed
    await dev.notify("/3303/0/5700", b"21.5")
    assert await call(values.get, timeout=TIMEOUT) == b"21.5"


async def _presubscriptions(api: Any, server: Any, nursery: trio.Nursery) -> None:
    wanted = [{"device_id": "sdk-dev2", "resource_paths": ["/3303/0/5700"]}]
    await call(api.update_presubscriptions, wanted)
    [listed] = await call(api.list_presubscriptions)
    assert (listed.device_id, listed.resource_paths) == ("sdk-dev2", ["/3303/0/5700"])
    observed = Observed()
    dev2 = Device(server, "sdk-dev2", handler=observed)
    await dev2.start(nursery)
    assert (await dev2.register()).code == Code.CREATED
    await observed.wait("/3303/0/5700")  # observed at registration
    assert await call(api.get_resource_subscription, "sdk-dev2", "/3303/0/5700")
    values = await call(api.add_resource_subscription, "sdk-dev2", "/3303/0/5700")
    await dev2.notify("/3303/0/5700", b"7")
    got = await call(values.get, timeout=TIMEOUT)
    if got == b"42":  # the value when it was observed at registration may reach the new
        got = await call(values.get, timeout=TIMEOUT)  # subscription first (a race)
    assert got == b"7"
    await call(api.delete_presubscriptions)  # PUT /v2/subscriptions with []
    assert await call(api.list_presubscriptions) == []


async def _webhook_mode(host: str, dev: Device, nursery: trio.Nursery) -> None:
    api = await call(
        ConnectAPI, {"host": host, "api_key": KEY, "autostart_notification_thread": False}
    )

    async def feed_the_sdk(received: Received) -> int:
        api.notify_webhook_received(received.body.decode())
        return 200

    receiver = Receiver(feed_the_sdk)
    url = await receiver.start(nursery)
    await call(api.update_webhook, url, {"x-app": "sdk"})  # DELETE pull, PUT callback
    assert (await call(api.get_webhook)).url == url
    assert receiver.requests[0].body == b"{}"
    assert receiver.requests[0].headers[b"x-app"] == b"sdk"
    assert await call(api.get_resource_value, "sdk-dev", "/3/0/1", timeout=TIMEOUT) == "42"
    values = await call(api.add_resource_subscription, "sdk-dev", "/3303/0/5700")
    await dev.notify("/3303/0/5700", b"22.0")
    assert await call(values.get, timeout=TIMEOUT) == b"22.0"
    await call(api.delete_webhook)
    assert len(receiver.deliveries()) >= 2
