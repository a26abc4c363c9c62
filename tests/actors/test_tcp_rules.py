"""delivery.md rules that concern CoAP over TCP (RFC 8323), over real loopback connections."""

from __future__ import annotations

from functools import partial

import trio
import trio.testing

from dm_actor.actors.device import Signal
from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code

from .support import GatedStore, TcpDevice, responses, start_server


async def test_tcp_device_registers_and_answers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1")
    await dev.connect(nursery)
    assert (await dev.register()).code == Code.CREATED
    assert await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a") == Accepted()
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    assert [(e.method, e.path) for e in dev.executed] == [(Code.GET, "/3/0/1")]
    await dev.disconnect()


async def test_rule_3_2_tcp_attempt_is_written_once_and_fails_after_126_s(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1", answer=False)
    await dev.connect(nursery)
    await dev.register()
    t0 = trio.current_time()
    await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a")
    await trio.sleep(125)
    assert responses(server) == {}
    await trio.sleep(2)
    assert responses(server)["a"] == {"id": "a", "status": 504, "error": "TIMEOUT"}
    assert len(dev.executed) == 1  # written once: TCP is reliable, nothing is retransmitted
    assert 126 <= trio.current_time() - t0 <= 127
    await dev.disconnect()


async def test_rule_3_4_tcp_device_without_a_connection_uses_no_retry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcp-1")
    await dev.connect(nursery)
    await dev.register()
    await dev.disconnect()
    await trio.sleep(1)
    await server.sup.submit("tcp-1", "GET", "/3/0/1", async_id="a", retry=0)
    await trio.sleep(3600)
    assert responses(server) == {}  # nothing sent, and the only attempt is not used up
    cmd = server.sup.by_endpoint["tcp-1"].queue.find("a")
    assert cmd is not None and (cmd.attempts, cmd.attempts_left) == (0, 1)
    await dev.connect(nursery)  # the device comes back on a new connection with an Update
    assert (await dev.update()).code == Code.CHANGED
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    await dev.disconnect()


async def test_rule_6_tcp_queue_mode_waits_for_wake_up(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = TcpDevice(server.tcp_addr, "tcpq", binding="TQ")
    await dev.connect(nursery)
    await dev.register()
    await trio.sleep(94)
    await server.sup.submit("tcpq", "GET", "/3/0/1", async_id="a")
    await trio.sleep(600)
    assert dev.executed == []
    await dev.update()
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
    await dev.disconnect()


async def test_a_reconnect_while_the_actor_is_busy_keeps_the_new_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The connection closes and the device reconnects and updates before the actor read the
    close (it waited for the store): the close must not take the new connection away."""
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    dev = TcpDevice(server.tcp_addr, "dev")
    await dev.connect(nursery)
    assert (await dev.register()).code == Code.CREATED
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(0.1)
    actor = server.sup.by_endpoint["dev"]
    actor.tell(Signal.WAKE)  # the actor's task now waits for the attempt's write
    await trio.sleep(0.1)
    await dev.disconnect()
    await trio.sleep(0.1)
    await dev.connect(nursery)
    updated: list[int] = []

    async def update() -> None:
        updated.append((await dev.update()).code)

    nursery.start_soon(update)
    await trio.sleep(0.5)
    store.open = True
    store.commit()
    await trio.sleep(30)
    assert updated == [Code.CHANGED]
    assert actor.conn is not None
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(5)
    assert responses(server)["b"]["status"] == 200
    await dev.disconnect()
