"""`/v3/devices` filters as Pelion's published SDK sends them (`mbed-cloud-sdk==2.2.0`).

The foundation API's `Device().list(filter=...)` turns an `ApiFilter` (or a dict) into
`field__op=value` query parameters (a list joined with `,`, a `datetime` as UTC ISO 8601 with
`Z`) and pages with `after=` the last id; the legacy `ConnectAPI.list_connected_devices`
sends `filter=state%3Dregistered`. Real server on loopback, real time, SDK in worker threads.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from mbed_cloud import ApiFilter, ConnectAPI
from mbed_cloud.sdk import SDK
from mbed_cloud.sdk.exceptions import ApiErrorResponse

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device

from .test_sdk import call

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.filterwarnings(
    r"ignore:\[Beta\] this section of the SDK is at a `beta` release level:FutureWarning"
)

KEY = "ak_sdk_filters"
NAMES = ("sdk-a", "sdk-b", "sdk-c", "sdk-d")


def _listed(sdk: Any, flt: object = None, **kw: Any) -> list[str]:
    """Every device the foundation API lists (it pages by itself), by id."""
    return [d.id for d in sdk.foundation.device().list(filter=flt, **kw)]


def _filter(field: str, op: str, value: object) -> ApiFilter:
    api_filter = ApiFilter()
    api_filter.add_filter(field, op, value)
    return api_filter


async def test_the_foundation_api_filters(nursery: trio.Nursery, tmp_path: Path) -> None:
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
        for ep in NAMES:
            devices[ep] = dev = Device(listening.coap_udp, ep)
            await dev.start(nursery)
            assert (await dev.register()).code == Code.CREATED
            await trio.sleep(0.01)  # (distinct created_at, in milliseconds)
        assert (await devices["sdk-c"].deregister()).code == Code.DELETED
        sdk = await call(SDK, api_key=KEY, host=host)
        listed = await call(lambda: list(sdk.foundation.device().list(page_size=2)))
        assert [d.id for d in listed] == list(NAMES)  # 2 pages, after= the last id
        assert [d.state for d in listed] == [
            "registered",
            "registered",
            "deregistered",
            "registered",
        ]
        created = {d.id: d.created_at for d in listed}  # (datetimes, as the SDK decodes them)

        async def listed_by(flt: object, **kw: Any) -> list[str]:
            return await call(_listed, sdk, flt, **kw)

        cases: list[tuple[object, list[str]]] = [
            (_filter("state", "eq", "registered"), ["sdk-a", "sdk-b", "sdk-d"]),
            (_filter("state", "neq", "registered"), ["sdk-c"]),
            (_filter("state", "in", ["deregistered", "registered"]), list(NAMES)),
            (_filter("state", "nin", ["registered"]), ["sdk-c"]),
            (_filter("id", "in", ["sdk-d", "sdk-a"]), ["sdk-a", "sdk-d"]),
            (_filter("id", "nin", ["sdk-d", "sdk-a"]), ["sdk-b", "sdk-c"]),
            (_filter("endpoint_name", "eq", "sdk-b"), ["sdk-b"]),
            (_filter("endpoint_name", "neq", "sdk-b"), ["sdk-a", "sdk-c", "sdk-d"]),
            (_filter("created_at", "gte", created["sdk-c"]), ["sdk-c", "sdk-d"]),
            (_filter("created_at", "lte", created["sdk-b"]), ["sdk-a", "sdk-b"]),
            (_filter("created_at", "in", [created["sdk-a"], created["sdk-d"]]), ["sdk-a", "sdk-d"]),
            (_filter("created_at", "nin", [created["sdk-a"]]), ["sdk-b", "sdk-c", "sdk-d"]),
            ({"state": "registered", "id": {"$nin": ["sdk-b"]}}, ["sdk-a", "sdk-d"]),  # a dict
        ]  # fmt: skip
        for flt, want in cases:
            assert await listed_by(flt, page_size=2) == want, flt
            assert await listed_by(flt, order="DESC") == want[::-1], flt
        count = sdk.foundation.device().list(filter=_filter("state", "eq", "registered"))
        assert await call(count.count) == 3  # include=total_count, limit=2
        # what Pelion's table does not have is refused, and the SDK raises it
        for flt in (_filter("state", "like", "reg"), _filter("created_at", "eq", created["sdk-a"]),
                    _filter("firmware_checksum", "eq", "x")):  # fmt: skip
            with pytest.raises(ApiErrorResponse) as refused:
                await listed_by(flt)
            assert refused.value.status_code == 400
        # the legacy API's list of connected devices: filter=state%3Dregistered
        legacy = await call(ConnectAPI, {"host": host, "api_key": KEY,
                                         "autostart_notification_thread": False})  # fmt: skip
        connected = await call(lambda: [d.id for d in legacy.list_connected_devices()])
        assert connected == ["sdk-a", "sdk-b", "sdk-d"]
