"""A pre-subscription with a wildcard, on a device that marks what may be observed."""

from __future__ import annotations

import trio
import trio.testing

from .client import start_api
from .test_flow import online
from .test_websocket import put_channel


async def test_a_wildcard_observes_only_the_links_a_pelion_device_marked_obs(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pelion's client registers resource links and marks the observable ones (`;obs`): a
    wildcard pre-subscription observes those only (observing `/3/0/1`, not marked, would be
    refused and reported as a failed subscription). A device that marks nothing (instance
    links, as Wakaama and Anjay register) gets Observes for every link, as before."""
    api = await start_api(nursery)
    await put_channel(api)
    body = [{"endpoint-name": "*", "resource-path": ["/*"]}]
    async with api.client() as client:
        assert (await client.request("PUT", "/v2/subscriptions", json=body)).status == 204
    pelion = await online(
        api, nursery, ep="pelion", objects=b'</3/0/0>;obs,</3/0/1>,</3200/0/5501>;obs;rt="n"'
    )
    plain = await online(api, nursery, ep="plain", objects=b"</3/0>,</3303/0>")
    await trio.sleep(1)
    assert sorted(pelion.observers) == ["/3/0/0", "/3200/0/5501"]
    assert sorted(plain.observers) == ["/3/0", "/3303/0"]
