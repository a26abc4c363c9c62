"""Pelion's SDK (`mbed-cloud-sdk==2.2.0`, unmodified) seeing a device's resources through
dm_actor (issue 14 item 1): `get_resource`, `list_resources` and
`subscribe(ResourceValues(dev, "/3303/0/5700"))` receiving a notification, against a device
that registers resource-level links (Pelion's device client) and one that registers
instances only (Wakaama, Anjay, the simulator). Real time: the SDK runs in worker threads, as
in `test_sdk.py`.
"""

from __future__ import annotations

from functools import partial
from multiprocessing.pool import ThreadPool
from typing import TYPE_CHECKING, Any

import pytest
import trio
from mbed_cloud import ConnectAPI
from mbed_cloud.exceptions import CloudApiException
from mbed_cloud.subscribe.channels import ResourceValues

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import OBJECTS, Device

from .test_sdk import TIMEOUT, Observed, call

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)

KEY = "ak_sdk_resources"
#: Pelion's device client registers resources, with `obs` on the observable ones
RESOURCE_LINKS = b'</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="counter",</3303/0/5700>;obs'


async def test_the_sdk_sees_resources_of_both_kinds_of_device(
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
        devices = {}
        for ep, links in (("sdk-resources", RESOURCE_LINKS), ("sdk-instances", OBJECTS)):
            dev = Device(listening.coap_udp, ep, objects=links, handler=Observed())
            await dev.start(nursery)
            assert (await dev.register()).code == Code.CREATED
            devices[ep] = dev
        api = await call(ConnectAPI, {"host": host, "api_key": KEY})
        try:
            await _resource_links(api)
            await _instances_only(api)
            with ThreadPool(1) as pool:  # (the observers' waits run there)
                for ep, dev in devices.items():
                    await _resource_values(api, ep, dev, pool)
        finally:
            await call(api.stop_notifications)


async def _resource_links(api: Any) -> None:
    listed = await call(api.list_resources, "sdk-resources")
    assert [(r.path, r.observable, r.type) for r in listed] == [
        ("/3/0/0", True, None), ("/3/0/1", False, None), ("/3200/0/5501", True, "counter"),
        ("/3303/0/5700", True, None)]  # fmt: skip
    resource = await call(api.get_resource, "sdk-resources", "/3/0/0")
    assert (resource.path, resource.observable) == ("/3/0/0", True)
    counter = await call(api.get_resource, "sdk-resources", "/3200/0/5501")
    assert (counter.type, counter.content_type) == ("counter", "")
    with pytest.raises(CloudApiException, match="Resource not found"):
        await call(api.get_resource, "sdk-resources", "/3/0/2")  # not registered
    assert await call(api.get_resource_value, "sdk-resources", "/3/0/0", timeout=TIMEOUT) == "42"
    # 404 URI_PATH_DOES_NOT_EXISTS: the SDK's answer to any 404 is None
    assert await call(api.get_resource_value_async, "sdk-resources", "/3/0/2") is None


async def _instances_only(api: Any) -> None:
    listed = await call(api.list_resources, "sdk-instances")
    paths = [r.path for r in listed]
    assert paths[:3] == ["/1/0/0", "/1/0/1", "/1/0/2"]
    assert {p.rsplit("/", 1)[0] for p in paths} == {"/1/0", "/3/0", "/3303/0", "/3311/0"}
    resource = await call(api.get_resource, "sdk-instances", "/3/0/0")
    assert (resource.path, resource.observable) == ("/3/0/0", True)  # readable: observable
    reboot = await call(api.get_resource, "sdk-instances", "/3/0/4")
    assert not reboot.observable  # an executable
    with pytest.raises(CloudApiException, match="Resource not found"):
        await call(api.get_resource, "sdk-instances", "/3/0")  # the instance is not listed
    assert await call(api.list_resources, "ghost") is None  # 404 Endpoint not found
    assert await call(api.get_resource_value, "sdk-instances", "/3/0/0", timeout=TIMEOUT) == "42"


async def _resource_values(api: Any, ep: str, dev: Device, pool: ThreadPool) -> None:
    observer = await call(api.subscribe, ResourceValues(ep, "/3303/0/5700"), provider=pool)
    assert isinstance(dev.handler, Observed)
    with trio.fail_after(TIMEOUT):
        await dev.handler.wait("/3303/0/5700")  # the SDK found the resource and subscribed
    await dev.notify("/3303/0/5700", b"21.5")
    payloads = []
    while b"21.5" not in payloads:  # (the value when observed, "42", may come first)
        item = await call(lambda: observer.next().block(timeout=TIMEOUT))
        assert (item["device_id"], item["resource_path"]) == (ep, "/3303/0/5700")
        payloads.append(item["payload"])
    assert payloads in ([b"42", b"21.5"], [b"21.5"])
