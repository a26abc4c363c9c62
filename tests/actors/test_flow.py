"""End-to-end over loopback UDP: register, command, answer, de-register."""

from __future__ import annotations

import trio

from dm_actor.actors.supervisor import Accepted, Rejected
from dm_actor.coap.numbers import Code

from .support import Device, start_server


async def test_register_command_answer_deregister(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = Device(server.addr, "dev-1")
    await dev.start(nursery)
    response = await dev.register()
    assert response.code == Code.CREATED
    assert dev.location.startswith("/rd/")
    [(kind, item)] = server.take()
    assert kind == "registrations"
    assert isinstance(item, dict) and item["ep"] == "dev-1" and item["q"] is False

    result = await server.sup.submit("dev-1", "GET", "/3/0/1", async_id="a-1")
    assert result == Accepted()
    await trio.sleep(1)
    assert [(e.method, e.path) for e in dev.executed] == [(Code.GET, "/3/0/1")]
    events = server.take("async-responses")
    assert events == [
        ("async-responses",
         {"id": "a-1", "status": 200, "payload": "NDI=", "ct": "text/plain", "max-age": 60})
    ]  # fmt: skip

    assert await server.sup.submit("nope", "GET", "/3/0/1", async_id="x") == Rejected(
        404, "DEVICE_NOT_FOUND"
    )
    assert await server.sup.submit("dev-1", "GET", "/5/0/1", async_id="x") == Rejected(
        404, "URI_PATH_DOES_NOT_EXISTS"
    )
    response = await dev.deregister()
    assert response.code == Code.DELETED
    await trio.sleep(1)
    assert server.take() == [("de-registrations", "dev-1")]
    assert "dev-1" not in server.sup.by_endpoint
