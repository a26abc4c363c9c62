"""Pelion's SDK (`mbed-cloud-sdk==2.2.0`, unmodified) subscribing through dm_actor (issue 14
items 4 and 5): `subscribe(ResourceValues(dev, "/3303/0/5700"))` sends
`PUT /v2/subscriptions/{dev}/%2F3303%2F0%2F5700`, which is accepted (200) and brings the
values; a path the device refuses gets 202 and is not listed. Real time: the SDK runs in
worker threads, as in `test_sdk.py`.
"""

from __future__ import annotations

from functools import partial
from multiprocessing.pool import ThreadPool
from typing import TYPE_CHECKING, Any

import pytest
import trio
from mbed_cloud import ConnectAPI
from mbed_cloud.subscribe.channels import ResourceValues

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device

from .test_sdk import TIMEOUT, Observed, call

if TYPE_CHECKING:
    from pathlib import Path

    from dm_actor.coap.message import Message

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)

KEY = "ak_sdk_subscriptions"
REFUSED = "/3303/0/77"
#: a Pelion device client's Register: resource-level links with `obs`
LINKS = b"</1/0>,</3/0>,</3303/0/5700>;obs,</3303/0/77>;obs"


class Refusing:
    """Notes each Observe (`Observed`), and answers 4.04 to any request on REFUSED."""

    def __init__(self) -> None:
        self.observed = Observed()

    def __call__(self, request: Message) -> tuple[int, bytes, int | None] | None:
        self.observed(request)
        if "/" + "/".join(request.uri_path) == REFUSED:
            return Code.NOT_FOUND, b"", None
        return None

    async def wait(self, path: str) -> None:
        await self.observed.wait(path)


async def test_the_sdk_subscribes_with_resource_values(
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
        host = f"http://127.0.0.1:{listening.http[1]}"
        observed = Refusing()
        dev = Device(listening.coap_udp, "sdk-sub", objects=LINKS, handler=observed)
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        api = await call(ConnectAPI, {"host": host, "api_key": KEY})
        try:
            await _resource_values(api, dev, observed)
            await _refused(api, dev)
        finally:
            await call(api.stop_notifications)


async def _resource_values(api: Any, dev: Device, observed: Refusing) -> None:
    with ThreadPool(1) as pool:  # (the observer's waits run there; closed at the end)
        observer = await call(
            api.subscribe, ResourceValues("sdk-sub", "/3303/0/5700"), provider=pool
        )
        await _values(api, dev, observed, observer)


async def _values(api: Any, dev: Device, observed: Refusing, observer: Any) -> None:
    await observed.wait("/3303/0/5700")  # (the PUT with %2F was accepted)
    assert await call(api.get_resource_subscription, "sdk-sub", "/3303/0/5700")
    assert await call(api.list_device_subscriptions, "sdk-sub") == ["/3303/0/5700"]
    await dev.notify("/3303/0/5700", b"21.5")
    payloads = []
    while b"21.5" not in payloads:  # (the value when observed, "42", may come first)
        item = await call(lambda: observer.next().block(timeout=TIMEOUT))
        assert (item["device_id"], item["resource_path"]) == ("sdk-sub", "/3303/0/5700")
        payloads.append(item["payload"])
    assert payloads in ([b"42", b"21.5"], [b"21.5"])


async def _refused(api: Any, dev: Device) -> None:
    # the beta API subscribes with a leading slash, the legacy one without; both get a 2xx
    # (202: the device refused) and nothing is subscribed
    await call(api.subscribe, ResourceValues("sdk-sub", REFUSED))
    await call(api.add_resource_subscription, "sdk-sub", REFUSED)
    await trio.sleep(0.5)
    assert [e.path for e in dev.executed].count(REFUSED) == 2  # each asked the device
    assert not await call(api.get_resource_subscription, "sdk-sub", REFUSED)
    assert await call(api.list_device_subscriptions, "sdk-sub") == ["/3303/0/5700"]
    # the SDK's long-poll thread took the AsyncIDResponses (unknown ids) and goes on
    assert await call(api.get_resource_value, "sdk-sub", "/3/0/1", timeout=TIMEOUT) == "42"
