"""delivery.md section 9: subscriptions, pre-subscriptions, notification rules, ordering."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted, Presubscription, Rejected
from dm_actor.coap.numbers import Code

from .support import Device, Server, online, responses, start_server

if TYPE_CHECKING:
    from dm_actor.coap.message import Message


def notifications(server: Server) -> list[tuple[str, str]]:
    out = []
    for _, item in server.take("notifications"):
        assert isinstance(item, dict)
        out.append((str(item["path"]), str(item["payload"])))
    return out


async def test_rule_9_1_subscribe_observes_and_notifications_become_events(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    assert await server.sup.subscribe("dev", "/3303/0/5700") == Accepted()
    await trio.sleep(1)
    assert list(dev.observers) == ["/3303/0/5700"]
    [get] = dev.executed
    assert (get.method, get.path) == (Code.GET, "/3303/0/5700")
    await dev.notify("/3303/0/5700", b"21.5")
    await trio.sleep(1)
    # the first value (the Observe response) and the notification: "42" and "21.5" in base64
    assert notifications(server) == [("/3303/0/5700", "NDI="), ("/3303/0/5700", "MjEuNQ==")]
    assert server.take("async-responses") == []  # an Observe owes no AsyncIDResponse
    assert server.sup.subscriptions_of("dev") == ["/3303/0/5700"]
    assert await server.sup.subscribe("dev", "/5/0/1") == Rejected(404, "URI_PATH_DOES_NOT_EXISTS")
    assert await server.sup.subscribe("ghost", "/3/0/1") == Rejected(404, "DEVICE_NOT_FOUND")


async def test_rule_9_1_subscription_follows_queue_rules_for_a_sleeping_device(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    assert await server.sup.subscribe("dev", "/3303/0/5700") == Accepted()
    await trio.sleep(60)
    assert dev.executed == []
    await dev.update()
    await trio.sleep(1)
    assert list(dev.observers) == ["/3303/0/5700"]


async def test_rule_9_2_presubscriptions_apply_to_matching_devices(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    server.sup.set_presubscriptions(
        "",
        [
            Presubscription("sensor-*", None, ("/3303/0/5700",)),
            Presubscription(None, None, ("/3/0/*",)),
        ],
    )
    sensor = Device(server.addr, "sensor-1")
    other = Device(server.addr, "lamp-1")
    for dev in (sensor, other):
        await dev.start(nursery)
        await dev.register()
    await trio.sleep(1)
    assert sorted(sensor.observers) == ["/3/0", "/3303/0/5700"]
    assert sorted(other.observers) == ["/3/0"]


async def test_rule_9_2_presubscriptions_match_the_endpoint_type(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Pelion's `endpoint-type` is the `et` a device registered with; the registration event
    carries it as `ept`."""
    server = await start_server(nursery)
    server.sup.set_presubscriptions(
        "",
        [
            Presubscription(None, "Light", ("/3311/0/5850",)),
            Presubscription("sensor-*", "Sens*", ("/3303/0/5700",)),
        ],
    )
    lamp = Device(server.addr, "lamp-1", endpoint_type="Light")
    sensor = Device(server.addr, "sensor-1", endpoint_type="Sensor")
    untyped = Device(server.addr, "sensor-2")
    for dev in (lamp, sensor, untyped):
        await dev.start(nursery)
        await dev.register()
    await trio.sleep(1)
    assert list(lamp.observers) == ["/3311/0/5850"]
    assert list(sensor.observers) == ["/3303/0/5700"]
    assert untyped.observers == {}
    events = {}
    for _, item in server.take("registrations"):
        assert isinstance(item, dict)
        events[item["ep"]] = item
    assert (events["lamp-1"]["ept"], "ept" in events["sensor-2"]) == ("Light", False)


async def test_rule_9_3_register_again_observes_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.subscribe("dev", "/3303/0/5700")
    await trio.sleep(1)
    dev.close()
    await dev.start(nursery)  # rebooted: new port, no observations
    dev.observers.clear()
    await dev.register()
    await trio.sleep(1)
    assert list(dev.observers) == ["/3303/0/5700"]
    await dev.notify("/3303/0/5700", b"7")
    await trio.sleep(1)
    assert notifications(server)[-1] == ("/3303/0/5700", "Nw==")


async def test_rule_9_4_notification_rules_are_validated_early(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    submit = server.sup.submit
    for query in ("pmin=10&pmax=5", "gt=10&lt=5&st=3", "foo=1"):
        assert await submit("dev", "PUT", f"/3303/0/5700?{query}", async_id="r") == Rejected(
            400, "MALFORMED_NOTIFICATION_RULES"
        )
    ok = "/3303/0/5700?pmin=10&pmax=60&gt=30&lt=5&st=1"
    assert await submit("dev", "PUT", ok, async_id="r") == Accepted()
    await trio.sleep(1)
    [put] = [m for _, m in dev.arrivals if m.code == Code.PUT]
    assert put.uri_path == ("3303", "0", "5700")
    assert put.uri_query == ("pmin=10", "pmax=60", "gt=30", "lt=5", "st=1")
    assert put.payload == b""


async def test_rule_9_5_stale_notifications_are_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.subscribe("dev", "/3303/0/5700")
    await trio.sleep(1)
    notifications(server)
    await dev.notify("/3303/0/5700", b"5", seq=5)
    await dev.notify("/3303/0/5700", b"4", seq=4)  # reordered: older than 5
    await dev.notify("/3303/0/5700", b"6", seq=6)
    await trio.sleep(1)
    assert [p for _, p in notifications(server)] == ["NQ==", "Ng=="]


async def test_unsubscribe_cancels_the_observation(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.subscribe("dev", "/3303/0/5700", owner="app-a")
    await server.sup.subscribe("dev", "/3303/0/5700", owner="app-b")
    await trio.sleep(1)
    events = server.events.take()
    assert {owners for kind, _, owners, _ in events if kind == "notifications"} == {
        frozenset({"app-a", "app-b"})
    }
    assert server.sup.unsubscribe("dev", "/3303/0/5700", owner="app-a")
    assert server.sup.subscriptions_of("dev", "app-b") == ["/3303/0/5700"]
    assert server.sup.unsubscribe("dev", "3303/0/5700", owner="app-b")
    assert not server.sup.unsubscribe("dev", "/3303/0/5700", owner="app-b")
    await dev.notify("/3303/0/5700", b"1", confirmable=True)
    await trio.sleep(1)
    assert server.events.take() == []
    # the server rejected the notification with a Reset: the device learns it is not observed
    assert [m.mtype for _, m in dev.arrivals][-1] == 3


async def test_get_answered_from_a_fresh_cached_value(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="first")
    await trio.sleep(1)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="cached")
    await trio.sleep(1)
    assert len(dev.executed) == 1  # answered from the cache: Max-Age 60 s has not passed
    got = responses(server)
    assert got["cached"]["payload"] == got["first"]["payload"] == "NDI="
    await trio.sleep(60)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="stale")
    await trio.sleep(1)
    assert len(dev.executed) == 2


async def test_a_cached_get_does_not_overtake_queued_commands(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="first")
    await trio.sleep(1)  # /3/0/1 is cached for 60 s
    dev.reset = True  # the PUT's attempt fails: it waits at the head for the next contact
    await server.sup.submit("dev", "PUT", "/3/0/1", async_id="put", payload=b"new", retry=1)
    await trio.sleep(1)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="get")
    await trio.sleep(1)
    assert responses(server).keys() == {"first"}  # the GET was not answered from the cache
    dev.reset = False
    dev.handler = lambda req: (Code.CONTENT, b"new", 0) if req.code == Code.GET else None
    await trio.sleep(120)
    await dev.update()
    await trio.sleep(1)
    got = responses(server)
    assert list(got) == ["put", "get"]
    assert got["get"]["payload"] == "bmV3"


async def test_a_successful_write_forgets_the_cached_values_of_its_path_and_relatives(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 13, item 2 (Anjay): GET /3/0/14 -> "+05:00"; PUT "+06:00" -> 2.04; the next GET
    returned "+05:00" from the cache without asking the device."""
    server, dev = await online(nursery)
    value = [b"+05:00"]

    def handler(req: Message) -> tuple[int, bytes, int | None]:
        if req.code == Code.PUT:
            value[0] = req.payload
            return Code.CHANGED, b"", None
        return Code.CONTENT, value[0], 0

    dev.handler = handler
    for path in ("/3/0/14", "/3/0", "/3/0/15"):
        await server.sup.submit("dev", "GET", path, async_id=f"before{path}".replace("/", "-"))
    await trio.sleep(1)
    await server.sup.submit("dev", "PUT", "/3/0/14", async_id="put", payload=b"+06:00",
                            content_format=0)  # fmt: skip
    await trio.sleep(1)
    executed = len(dev.executed)
    for path in ("/3/0/14", "/3/0", "/3/0/15"):
        await server.sup.submit("dev", "GET", path, async_id=f"after{path}".replace("/", "-"))
        await trio.sleep(1)
    got = responses(server)
    assert got["after-3-0-14"]["payload"] == "KzA2OjAw"  # "+06:00", asked of the device
    assert len(dev.executed) == executed + 2  # /3/0/14 and its parent /3/0; not /3/0/15


async def test_a_value_read_with_an_accept_is_not_served_to_a_read_without(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="tlv", accept=11542)
    await trio.sleep(1)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="plain")
    await trio.sleep(1)
    assert len(dev.executed) == 2
