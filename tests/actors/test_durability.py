"""A Register's 2.01 and a command's 202 wait until the store says the write is durable."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted, Rejected
from dm_actor.coap.message import Message, decode, encode, path_options, query_options
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.device.machine import MID_BLOCK

from .support import Device, GatedStore, TcpDevice, online, responses, settle, start_server


def register_datagram(mid: int) -> bytes:
    options = (
        *path_options("/rd"),
        (OptionNumber.CONTENT_FORMAT, b"\x28"),
        *query_options("ep=gated&lt=300&b=U"),
    )
    msg = Message(MessageType.CON, Code.POST, mid, b"tk", tuple(sorted(options)), b"</3/0>")
    return encode(msg)


async def test_register_is_answered_only_after_the_store_is_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    server = await start_server(nursery, store=store)
    sup, addr = server.sup, server.addr
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        await client.bind(("127.0.0.1", 0))
        await client.sendto(register_datagram(7), addr)
        await trio.sleep(5)
        await client.sendto(register_datagram(7), addr)  # the client retransmits
        await trio.sleep(5)
        with trio.move_on_after(1):
            await client.recvfrom(2048)
            raise AssertionError("answered before the registration was durable")
        assert list(store.registrations) == ["gated"]
        assert sup.statistics["registrations"] == 1  # the retransmission made no second one
        store.commit()
        data, _ = await client.recvfrom(2048)
        reply = decode(data)
        assert (reply.code, reply.mid, reply.location_path[0]) == (Code.CREATED, 7, "rd")
        await client.sendto(register_datagram(7), addr)  # a late retransmission: same answer
        data, _ = await client.recvfrom(2048)
        assert decode(data) == reply


async def test_submit_returns_after_the_store_is_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    sup, addr = server.sup, server.addr
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        await client.bind(("127.0.0.1", 0))
        await client.sendto(register_datagram(8), addr)
        await client.recvfrom(2048)
    store.open = False
    done: list[object] = []

    async def submit() -> None:
        done.append(await sup.submit("gated", "GET", "/3/0/1", async_id="a"))

    nursery.start_soon(submit)
    await trio.sleep(10)
    assert done == []
    assert "a" in store.commands["gated"]  # written, not yet durable: no 202 yet
    store.commit()
    await trio.sleep(0.1)
    assert done == [Accepted()]


async def test_registers_are_shed_while_too_many_answers_wait_for_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    server = await start_server(nursery, store=store)
    server.sup._held_limit = 1
    clients = [trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for client in clients:
        await client.bind(("127.0.0.1", 0))
    with clients[0], clients[1]:
        await clients[0].sendto(register_datagram(1), server.addr)
        await trio.sleep(1)
        await clients[1].sendto(register_datagram(2).replace(b"ep=gated", b"ep=other"), server.addr)
        await trio.sleep(1)
        assert list(store.registrations) == ["gated"]  # the second one was not taken
        assert server.sup.statistics["registrations_shed"] == 1
        data, _ = await clients[1].recvfrom(2048)  # ... and told to come back later
        shed = decode(data)
        assert (shed.code, shed.mid, shed.max_age) == (Code.SERVICE_UNAVAILABLE, 2, 60)
        store.commit()
        data, _ = await clients[0].recvfrom(2048)
        assert decode(data).code == Code.CREATED


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_a_request_leaves_only_once_its_message_id_and_token_are_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, transport: str
) -> None:
    """Rule: a restart can resend the exchange in flight only if it was stored before it was
    sent. Both ways an attempt starts: at once on submit (its MID and token are in the
    acceptance's write) and from the queue after the command ahead of it finished."""
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    dev = Device(server.addr, "dev") if transport == "udp" else TcpDevice(server.tcp_addr, "dev")
    if isinstance(dev, TcpDevice):
        await dev.connect(nursery)
    else:
        await dev.start(nursery)
    await dev.register()
    store.open = False
    done: list[object] = []

    async def submit(async_id: str, uri: str) -> None:
        done.append(await server.sup.submit("dev", "GET", uri, async_id=async_id))

    writes = store.writes
    nursery.start_soon(submit, "a", "/3/0/1")
    await settle()
    nursery.start_soon(submit, "b", "/3/0/2")
    await trio.sleep(10)
    assert done == [] and dev.executed == []  # written, not durable: no 202, no request
    # one write per command, "a" with its attempt's MID and token (and over UDP the device's
    # first block of Message IDs reserved)
    assert store.writes == writes + 2 + (transport == "udp")
    stored = store.commands["dev"]["a"]
    assert stored.token is not None and (stored.mid is not None) is (transport == "udp")
    if stored.mid is not None:
        assert store.next_mids["dev"] == (stored.mid + MID_BLOCK) & 0xFFFF
    else:
        assert "dev" not in store.next_mids  # TCP has no Message IDs to reserve
    store.commit()
    await trio.sleep(0.1)
    assert done == [Accepted(), Accepted()]
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    await trio.sleep(10)  # "b" started after "a" finished: held until its write commits
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    assert store.commands["dev"]["b"].token is not None
    store.commit()
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1", "/3/0/2"]
    if isinstance(dev, TcpDevice):
        await dev.disconnect()


async def test_a_request_started_on_submit_leaves_even_if_the_submitter_is_cancelled(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The HTTP client went away while its 202 waited for the store: the command was
    accepted into the store all the same, so the device gets it once the write is durable."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store)
    store.open = False
    with trio.move_on_after(5):
        await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    assert dev.executed == []
    store.open = True
    store.commit()
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    assert responses(server)["a"]["status"] == 200


async def test_a_202_always_means_the_command_is_in_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A subscription's Observe waits at the head of an idle device's queue for its write to
    commit when a command arrives: the command is not the one that starts, so it is written
    on its own before its 202 (it was not, once)."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store)
    store.open = False
    done: list[object] = []

    async def subscribe() -> None:
        done.append(await server.sup.subscribe("dev", "/3/0/1", "app"))

    async def submit() -> None:
        done.append(await server.sup.submit("dev", "PUT", "/3/0/2", async_id="c", payload=b"x",
                                            content_format=0))  # fmt: skip

    nursery.start_soon(subscribe)
    await settle()
    nursery.start_soon(submit)
    await settle()
    assert "c" in store.commands["dev"]  # written before anyone waits for the commit
    store.open = True
    store.commit()
    await trio.sleep(1)
    assert done == [Accepted(), Accepted()]
    assert sorted(e.path for e in dev.executed) == ["/3/0/1", "/3/0/2"]


async def test_an_attempt_that_ended_before_its_write_committed_is_never_sent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The device de-registers while its Reboot waits for the store: the command ends with
    DEVICE_REMOVED_REGISTRATION and the Reboot must not reach the device afterwards."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "POST", "/3/0/4", async_id="reboot"))
    await settle()
    nursery.start_soon(dev.deregister)
    await trio.sleep(1)
    store.open = True
    store.commit()
    await trio.sleep(5)
    assert [e.path for e in dev.executed] == []
    assert responses(server)["reboot"]["error"] == "DEVICE_REMOVED_REGISTRATION"


async def test_a_request_held_by_a_slow_disk_is_timed_from_when_it_leaves(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The store stalls for longer than MAX_TRANSMIT_WAIT: once the write commits the request
    goes out once, with its retransmission timer starting then (not already expired)."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(200)
    assert dev.arrivals[-1][1].code != Code.GET  # nothing sent while the disk stalls
    store.open = True
    store.commit()
    await trio.sleep(1)
    assert [m.code for _, m in dev.arrivals].count(Code.GET) == 1  # no instant retransmission
    assert responses(server)["a"]["status"] == 200


async def test_a_get_answered_from_the_cache_is_durable_before_its_202(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 11: a repeated GET within Max-Age is answered from the value cache; its 202
    left before anything was written, so a kill -9 lost the AsyncIDResponse without a
    trace. Now its AsyncIDResponse is stored before the 202, and published once durable."""
    store = GatedStore()
    store.open = True
    server, _ = await online(nursery, "cached", store=store)
    sup = server.sup
    assert await sup.submit("cached", "GET", "/3/0/0", async_id="first") == Accepted()
    await trio.sleep(5)
    assert set(responses(server)) == {"first"}
    store.open = False
    done: list[object] = []

    async def submit() -> None:
        done.append(await sup.submit("cached", "GET", "/3/0/0", async_id="hit"))

    nursery.start_soon(submit)
    await trio.sleep(10)
    assert done == []  # no 202 before the answer is durable
    stored = [e for events in store.events.values() for e in events.values()]
    assert [e for e in stored if b'"id":"hit"' in e.item]
    assert responses(server) == {}  # nor a publication
    store.commit()
    await trio.sleep(0.1)
    assert done == [Accepted()]
    assert responses(server)["hit"]["status"] == 200


async def test_a_repeated_async_id_waits_for_the_first_acceptance_to_be_durable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server, _ = await online(nursery, "dup", store=store, answer=False)
    sup = server.sup
    store.open = False
    done: list[object] = []

    async def submit() -> None:
        done.append(await sup.submit("dup", "PUT", "/3/0/1", async_id="same", payload=b"x"))

    nursery.start_soon(submit)
    nursery.start_soon(submit)
    await trio.sleep(10)
    assert done == []
    store.commit()
    await trio.sleep(0.1)
    assert sorted(map(repr, done)) == sorted(map(repr, [Accepted(), Accepted(duplicate=True)]))


class FailingStore(GatedStore):
    """A store whose disk is full: it keeps what it was given and retries (not healthy)."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def healthy(self) -> bool:
        return not self.full


async def test_a_full_disk_refuses_new_work_and_recovers_without_a_restart(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Issue 11, item 4: while the store cannot write, new commands get 503 STORE_IS_BEHIND
    and new Registers 5.03 with Max-Age; once it can, both are taken again."""
    store = FailingStore()
    store.open = True
    server, _ = await online(nursery, "dev", store=store)
    sup = server.sup
    store.full = True
    assert await sup.submit("dev", "GET", "/3/0/1", async_id="a") == Rejected(
        503, "STORE_IS_BEHIND"
    )
    late = Device(server.addr, "late")
    await late.start(nursery)
    refused = await late.register()
    assert (refused.code, refused.max_age) == (Code.SERVICE_UNAVAILABLE, 60)
    store.full = False
    assert await sup.submit("dev", "GET", "/3/0/1", async_id="a") == Accepted()
    assert (await late.register()).code == Code.CREATED


async def test_an_attempt_that_expired_while_waiting_for_the_store_is_never_sent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: a PUT with a 60 s expiry, held for an hour by a stalled disk,
    was executed when the disk came back (answered 200). Now it ends 429 REQUEST_EXPIRED
    and never reaches the device."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, "dev", store=store)
    store.open = False
    nursery.start_soon(
        partial(server.sup.submit, "dev", "PUT", "/3/0/1", async_id="unlock", payload=b"1",
                expiry=60)
    )  # fmt: skip
    await trio.sleep(3600)
    store.commit()
    await trio.sleep(10)
    store.commit()
    await trio.sleep(1)
    assert [e.method for e in dev.executed] == []
    assert responses(server)["unlock"] == {
        "id": "unlock", "status": 429, "error": "REQUEST_EXPIRED"
    }  # fmt: skip


async def test_an_update_is_answered_once_durable_and_refused_while_the_disk_fails(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An attacker's finding: Updates answered 2.04 while the disk was full were not kept;
    after a restart the registration had expired although the device was told it was
    renewed. Now the 2.04 waits for the store, and a failing store answers 5.03."""
    store = FailingStore()
    store.open = True
    _server, dev = await online(nursery, "dev", store=store)
    store.open = False
    answers: list[Message] = []

    async def update() -> None:
        answers.append(await dev.update())

    nursery.start_soon(update)
    await trio.sleep(1)
    assert answers == []  # written, not yet durable: no 2.04 yet
    store.commit()
    await trio.sleep(0.1)
    assert [a.code for a in answers] == [Code.CHANGED]
    store.open = True
    store.full = True
    refused = await dev.update()
    assert (refused.code, refused.max_age) == (Code.SERVICE_UNAVAILABLE, 60)
