"""`dm-actor watch` against `app.serve`: events printed, reconnects, stop conditions."""

from __future__ import annotations

import io
import json
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from dm_actor import app, cli
from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from dm_actor.tools.watch import Watcher
from tests.actors.support import Device

from .client import HttpClient, close_code
from .test_webhook import free_port_url

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from dm_actor.address import Address

KEY = "ak_watch"


async def serve(nursery: trio.Nursery, tmp_path: Path) -> app.Listening:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    listening: app.Listening = await nursery.start(
        partial(app.serve, settings, api_keys=ApiKeys([KEY]))
    )
    return listening


async def online(listening: app.Listening, nursery: trio.Nursery, ep: str) -> Device:
    dev = Device(listening.coap_udp, ep)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    return dev


def url(listening: app.Listening) -> str:
    assert listening.http is not None
    return f"http://127.0.0.1:{listening.http[1]}"


async def test_prints_one_json_line_per_event(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    out, log = io.StringIO(), io.StringIO()
    watcher = Watcher(url(listening), KEY, out, log)
    done = trio.Event()
    codes: list[int] = []

    async def run() -> None:
        codes.append(await watcher.run(count=3))
        done.set()

    nursery.start_soon(run)
    await watcher.wait_connected()
    await online(listening, nursery, "w1")
    assert listening.http is not None
    async with HttpClient(listening.http, KEY) as client:
        reply = await client.request(
            "POST", "/v2/device-requests/w1?async-id=x1", json={"method": "GET", "uri": "/3/0/1"}
        )
        assert reply.status == 202
        reply = await client.request("POST", "/v2/device-requests/w1?async-id=x2",
                                     json={"method": "POST", "uri": "/3/0/4"})  # fmt: skip
        assert reply.status == 202
    await done.wait()
    assert codes == [0]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["kind"] for line in lines] == ["registrations", *["async-responses"] * 2]
    assert lines[0]["ep"] == "w1" and len(lines[0]["resources"]) == 4
    assert lines[1] == {"kind": "async-responses", "id": "x1", "status": 200, "payload": "NDI=",
                        "ct": "text/plain", "max-age": 60}  # fmt: skip
    assert lines[2] == {"kind": "async-responses", "id": "x2", "status": 200}
    assert "connected to" in log.getvalue()


async def test_reconnects_after_a_1001_takeover_and_gets_what_was_queued(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    assert listening.http is not None
    out, log = io.StringIO(), io.StringIO()
    watcher = Watcher(url(listening), KEY, out, log, table=True)
    nursery.start_soon(partial(watcher.run, duration=120))
    await watcher.wait_connected()
    taken_over = await other_socket(listening.http, nursery)
    assert await close_code(taken_over) == 1001  # the watcher came back and took it back
    await watcher.wait_connected(2)
    await online(listening, nursery, "after-takeover")
    await trio.sleep(1)
    assert "closed with 1001; reconnecting in 1 s" in log.getvalue()
    header, *rows = out.getvalue().splitlines()
    assert header.split() == ["TIME", "KIND", "DEVICE", "/", "ASYNC-ID", "PATH", "DETAIL"]
    [row] = rows
    assert row.split()[1:] == ["registrations", "after-takeover", "4", "resources"]


async def other_socket(addr: Address, nursery: trio.Nursery) -> WebSocketConnection:
    stream = await trio.open_tcp_stream(*addr[:2])
    nursery.start_soon(_hold, stream)
    return await wrap_client_stream(
        nursery, stream, "127.0.0.1", "/v2/notification/websocket-connect",
        subprotocols=["wss", f"pelion_{KEY}"],
    )  # fmt: skip


async def _hold(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


async def test_reconnects_when_the_connection_breaks_and_stops_when_the_channel_goes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    assert listening.http is not None
    out, log = io.StringIO(), io.StringIO()
    watcher = Watcher(url(listening), KEY, out, log)
    codes: list[int] = []
    done = trio.Event()

    async def run() -> None:
        codes.append(await watcher.run(duration=600))
        done.set()

    nursery.start_soon(run)
    await watcher.wait_connected()
    async with HttpClient(listening.http, KEY) as client:
        assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
    await done.wait()
    assert codes == [0]
    assert "the channel was deleted (1000): stopping" in log.getvalue()
    assert trio.current_time() < 10


async def test_stops_after_the_duration_and_fails_clearly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    log = io.StringIO()
    watcher = Watcher(url(listening), KEY, io.StringIO(), log)
    started = trio.current_time()
    assert await watcher.run(duration=25) == 0  # (not 30: the server pings then)
    assert trio.current_time() - started == 25
    assert await Watcher(url(listening), "ak_wrong", io.StringIO(), log).run() == 1
    assert "PUT /v2/notification/websocket answered 401 Authentication failure." in log.getvalue()
    assert listening.http is not None
    async with HttpClient(listening.http, KEY) as client:
        assert (await client.request("DELETE", "/v2/notification/websocket")).status == 204
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
    assert await Watcher(url(listening), KEY, io.StringIO(), log).run() == 1
    assert "answered 400 Another type of notification channel already exists." in log.getvalue()
    assert await Watcher(free_port_url(), KEY, io.StringIO(), log).run() == 1
    assert "cannot reach http://127.0.0.1:" in log.getvalue()


def test_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["watch", "--server", "https://example.org", "--api-key", "k"]) == 2
    assert "--server: Only http:// URLs are supported." in capsys.readouterr().err
    assert cli.main(["watch", "--server", free_port_url(), "--api-key", "k", "--count", "1"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_the_gap_marker_prints_as_a_line_of_its_own() -> None:
    """`"events-lost": N` (the server's gap marker) is a count, not a list of events."""
    watcher = Watcher("http://127.0.0.1:1", KEY, io.StringIO(), io.StringIO())
    lines = watcher.lines({"events-lost": 5, "de-registrations": ["d"]})
    assert [json.loads(line) for line in lines] == [
        {"kind": "events-lost", "count": 5}, {"kind": "de-registrations", "ep": "d"}]  # fmt: skip
    table = Watcher("http://127.0.0.1:1", KEY, io.StringIO(), io.StringIO(), table=True)
    assert "events-lost" in table.lines({"events-lost": 5})[0]
