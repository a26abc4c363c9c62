"""Moving devices between two supervisors through the store, as cluster mode's handover and
failover do (`Supervisor.release`, `Supervisor.adopt`), and durable event numbers per node."""

from __future__ import annotations

import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code
from dm_actor.store.memory import MemoryStore

from .support import online, responses, settle, start_server


async def test_released_devices_leave_no_trace_and_the_adopter_resends_the_same_exchange(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = MemoryStore()
    first, dev = await online(nursery, "moving", store=store)
    dev.mute = True  # it executes the request, its answers are lost
    accepted = await first.sup.submit("moving", "PUT", "/3311/0/5850", async_id="a",
                                      payload=b"1", content_format=0)  # fmt: skip
    assert accepted == Accepted()
    await trio.sleep(1)
    assert len(dev.executed) == 1

    assert first.sup.release(lambda ep: ep == "moving") == 1
    await settle()
    for index in (first.sup.by_endpoint, first.sup.by_reg_id, first.sup.by_addr):
        assert not index
    assert first.take() == []  # no de-registration event: the device did not leave
    snapshot = store.load()
    assert [r.endpoint for r in snapshot.registrations] == ["moving"]
    assert [c.async_id for c in snapshot.commands] == ["a"]  # still owed
    sent_before = len(dev.arrivals)
    await trio.sleep(30)
    assert len(dev.arrivals) == sent_before  # the released actor sends nothing more

    second = await start_server(nursery, store=store)
    second.sup.adopt(store.load())
    dev.server = second.addr  # (in a cluster both answer on one address: SO_REUSEPORT, a VIP)
    dev.mute = False
    await trio.sleep(5)
    assert responses(second)["a"]["status"] == 200
    assert len(dev.executed) == 1  # the resend was the same exchange: the device's dedup
    puts = [m for _, m in dev.arrivals if m.code == Code.PUT]
    assert len({(m.mid, m.token) for m in puts}) == 1
    assert "moving" in second.sup.by_endpoint


async def test_release_selects_only_the_chosen_devices(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _ = await online(nursery, "stays")
    other, _ = await online(nursery, "goes")
    del other
    assert server.sup.release(lambda ep: ep == "goes") == 0  # (not this server's device)
    assert server.sup.release(lambda ep: ep == "stays") == 1
    assert server.sup.release(lambda ep: True) == 0


async def test_durable_event_numbers_stay_in_the_node_class(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery, "dev")
    commands = server.sup.commands
    commands.seq_stride, commands.seq_residue = 1024, 7
    seqs = [commands.keep_event("app", "notifications", {"n": i}) for i in range(5)]
    assert all(s % 1024 == 7 for s in seqs)
    assert seqs == sorted(set(seqs))
