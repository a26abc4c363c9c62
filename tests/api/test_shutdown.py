"""Graceful stop (`app.serve(shutdown_trigger=...)`, what SIGTERM does): a command accepted
before the stop whose commit is slow still gets its 202; no new connection is taken
meanwhile; the stop lasts at most `[server] graceful_timeout`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from dm_actor import app
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings
from tests.actors.support import Device, GatedStore, settle

from .client import KEY_A, KEYS, HttpClient, Reply

if TYPE_CHECKING:
    from pathlib import Path


async def serving(
    nursery: trio.Nursery, tmp_path: Path, grace: float
) -> tuple[app.Listening, GatedStore, trio.Event, trio.Event]:
    """The app on a store the test commits by hand; (listening, store, stop, stopped)."""
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\nstore = "memory"\n'
        f'data_dir = "{tmp_path}"\ngraceful_timeout = {grace}\n'
    )
    store = GatedStore()
    store.open = True
    stop, stopped = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[app.Listening]) -> None:
        await app.serve(
            settings, store=store, api_keys=KEYS, shutdown_trigger=stop.wait,
            task_status=task_status,
        )  # fmt: skip
        stopped.set()

    listening: app.Listening = await nursery.start(run)
    dev = Device(listening.coap_udp, "dev", binding="UQ")
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    store.open = False  # from now on the test commits
    return listening, store, stop, stopped


async def post_command(client: HttpClient, replies: list[Reply | Exception]) -> None:
    try:
        replies.append(
            await client.request(
                "POST",
                "/v2/device-requests/dev?async-id=a1",
                json={"method": "GET", "uri": "/3/0/1"},
            )
        )
    except (trio.BrokenResourceError, OSError, ValueError) as exc:  # no answer: closed
        replies.append(exc)


async def test_a_command_waiting_for_a_slow_commit_gets_its_202_after_the_stop(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening, store, stop, stopped = await serving(nursery, tmp_path, grace=5.0)
    assert listening.http is not None
    replies: list[Reply | Exception] = []
    async with HttpClient(listening.http, KEY_A) as client:
        nursery.start_soon(post_command, client, replies)
        await settle()
        assert replies == [] and store.backlog() > 0  # accepted, waiting for its commit
        stop.set()  # SIGTERM
        await trio.sleep(2)  # the commit is slow ...
        assert replies == [] and not stopped.is_set()
        with pytest.raises(OSError, match="failed"):  # no new connection meanwhile
            await trio.open_tcp_stream(*listening.http[:2])
        t0 = trio.current_time()
        store.open = True  # ... and comes (the later writes commit as they are waited for)
        store.commit()
        with trio.fail_after(1):
            await stopped.wait()
        assert trio.current_time() - t0 < 0.1  # it stopped as soon as the answer was out
        await settle()  # (the client reads it)
    [reply] = replies
    assert isinstance(reply, Reply)
    assert reply.status == 202
    assert reply.headers.get(b"connection") == b"close"


async def test_the_grace_is_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A commit that does not come within `graceful_timeout`: the stop goes on without it
    (the 202 is not sent: the client does not know, as before the grace existed)."""
    listening, _store, stop, stopped = await serving(nursery, tmp_path, grace=3.0)
    assert listening.http is not None
    replies: list[Reply | Exception] = []
    async with HttpClient(listening.http, KEY_A) as client:
        nursery.start_soon(post_command, client, replies)
        await settle()
        t0 = trio.current_time()
        stop.set()
        await stopped.wait()
        assert 3.0 <= trio.current_time() - t0 < 3.1
        await settle()
    assert len(replies) == 1 and not isinstance(replies[0], Reply)


async def test_nothing_in_flight_stops_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    _listening, _store, stop, stopped = await serving(nursery, tmp_path, grace=30.0)
    t0 = trio.current_time()
    stop.set()
    await stopped.wait()
    assert trio.current_time() == t0
