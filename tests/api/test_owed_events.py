"""Events owed to an application are kept until handed over, wherever they are meanwhile
(docs/delivery.md, "Hand-over to the application"):

- in flight: taken by a delivery that has not completed (a slow webhook receiver), they are
  stored by the spill like the events waiting, and forgotten once handed over;
"""

from __future__ import annotations

import trio
import trio.testing

from dm_actor.store.memory import MemoryStore

from .client import start_api
from .test_flow import online
from .test_webhook import Received, Receiver


async def test_an_event_in_flight_to_a_slow_webhook_is_stored(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A registration event whose PUT the receiver has held for 10 s (of its 15) is not
    handed over: a crash now must not lose it. Once answered 2xx it is forgotten."""

    async def answer(received: Received) -> int:
        if received.body != b"{}":
            await trio.sleep(15)  # slow, within the 20 s request timeout
        return 200

    store = MemoryStore()
    api = await start_api(nursery, store=store)
    receiver = Receiver(answer=answer)
    url = await receiver.start(nursery)
    async with api.client() as client:
        reply = await client.request("PUT", "/v2/notification/callback", json={"url": url})
        assert reply.status == 204, reply.text
        await online(api, nursery)
        await trio.sleep(10)
        assert len(receiver.deliveries()) == 1  # in flight, not answered yet
        assert [e.kind for e in store.load().events] == ["registrations"]
        await trio.sleep(10)  # answered 200: handed over, forgotten
        assert len(receiver.deliveries()) == 1
        assert store.load().events == []
