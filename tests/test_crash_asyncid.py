"""kill -9 and repeated async-ids (docs/delivery.md rule 1.7): a real daemon in a subprocess.

A real `dm-actor serve --store sqlite` on loopback, a scripted device and a webhook receiver
(with `include_uid`) in this process, in real time. Writes are accepted and answered; the
daemon is killed with SIGKILL and restarted on the same data directory; the application
repeats every POST with the same async-ids: each gets 202 and the same AsyncIDResponse again
(same body, same `uid`) and the device executes nothing again; a different request with one
of the ids gets 409. Then a repeat is killed right after its 202: the restarted daemon still
delivers that acceptance's AsyncIDResponse (it was stored before the 202), and nothing runs
again. About 10 s.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import trio

from dm_actor.coap.numbers import Code
from tests.actors.support import Device
from tests.api.test_webhook import Receiver
from tests.daemon import Daemon, free_ports, request

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = [pytest.mark.crash, pytest.mark.filterwarnings("ignore::ResourceWarning")]

KEY = "ak_crash_asyncid"
IDS = [f"w{i}" for i in range(5)]


def write(i: int) -> dict[str, str]:
    return {"method": "PUT", "uri": "/3/0/14", "payload-b64": f"KzA{i}"}


def arrivals(receiver: Receiver) -> list[dict[str, Any]]:
    return [
        item
        for r in receiver.deliveries()
        for item in json.loads(r.body).get("async-responses", [])
    ]


async def until(condition: Any, limit: float = 20.0) -> None:
    with trio.fail_after(limit):
        while not condition():  # noqa: ASYNC110 (a condition of another task's records)
            await trio.sleep(0.05)


async def test_repeats_after_kill_9_are_answered_from_the_store(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    receiver = Receiver()  # (its port first: free_ports' ports stay free until the start)
    url = await receiver.start(nursery)
    coap_port, http_port, coaps_port = free_ports(3)  # (coaps: not the CoAP port + 1)
    http = ("127.0.0.1", http_port)
    daemon = Daemon(
        ["--store", "sqlite", "--data-dir", str(tmp_path / "data"), "--host", "127.0.0.1",
         "--coap-port", str(coap_port), "--coaps-port", str(coaps_port),
         "--http-port", str(http_port), "--api-key", KEY,
         "--log-level", "info"],
        http, tmp_path / "daemon.log",
    )  # fmt: skip

    async def post(async_id: str, body: dict[str, str]) -> int:
        return (await request(http, "POST", f"/v2/device-requests/dev?async-id={async_id}",
                              KEY, body))[0]  # fmt: skip

    async def restart() -> None:
        await daemon.kill()
        await daemon.start()
        with trio.fail_after(20):
            await daemon.ready()

    try:
        await daemon.start()
        with trio.fail_after(20):
            await daemon.ready()
        dev = Device(("127.0.0.1", coap_port), "dev", lifetime=3600)
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        callback = {"url": url, "serialization": {"cfg": {"include_uid": True}}}
        status, body = await request(http, "PUT", "/v2/notification/callback", KEY, callback)
        assert status == 204, body
        for i, async_id in enumerate(IDS):
            assert await post(async_id, write(i)) == 202
        await until(lambda: len(arrivals(receiver)) >= len(IDS))
        first = {item["id"]: item for item in arrivals(receiver)}
        assert sorted(first) == IDS and all(len(item["uid"]) == 36 for item in first.values())
        executed = len(dev.executed)
        assert executed == len(IDS)

        await restart()
        for i, async_id in enumerate(IDS):
            assert await post(async_id, write(i)) == 202
        assert await post(IDS[0], write(9)) == 409  # another request with a remembered id
        await until(lambda: len(arrivals(receiver)) >= 2 * len(IDS))
        again = arrivals(receiver)[len(IDS) :]
        assert sorted(again, key=lambda item: item["id"]) == [first[a] for a in IDS]

        # a repeat killed right after its 202: that acceptance's answer is still delivered
        seen = len(arrivals(receiver))
        assert await post(IDS[1], write(1)) == 202
        await restart()
        await until(lambda: len(arrivals(receiver)) > seen)
        assert all(item == first[IDS[1]] for item in arrivals(receiver)[seen:])
        await trio.sleep(1)
        assert len(dev.executed) == executed  # nothing ran twice
    finally:
        await daemon.kill()
