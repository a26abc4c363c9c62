"""Attacks on the actor-layer redesign (issue 12): behaviour that changed by accident.

Each test states the rule it guards; a finding not fixed yet is `xfail(strict=True)` with the
finding in one line (see /work/notes/attack-issue12.md).
"""

from __future__ import annotations

import base64
from functools import partial

import trio
import trio.testing

from dm_actor.coap.numbers import Code, OptionNumber

from .support import GatedStore, online


async def test_a_request_already_out_is_not_retransmitted_in_a_burst_after_a_hold(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A notification came in blocks and the server fetches its rest (a GET the device does
    not answer yet); then a command starts, and its attempt waits for a slow store. While
    the hold lasts nothing but answers may leave, so the fetch's retransmissions cannot go
    out; when the store commits, at most one retransmission of it may follow (the old loop
    did not run timers during a hold), never every one that fell due meanwhile at once
    (RFC 7252 4.2: exponential back-off between retransmissions)."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store, block_szx=0)  # 16-byte blocks
    await server.sup.subscribe("dev", "/3303/0/5700")
    await trio.sleep(1)
    assert "/3303/0/5700" in dev.observers
    dev.answer = False  # the device will not answer the fetch (nor the command)
    await dev.notify("/3303/0/5700", b"x" * 40)  # its first block: the rest is fetched
    await trio.sleep(0.01)

    def fetches() -> list[float]:
        return [
            t
            for t, m in dev.arrivals
            if m.code == Code.GET and m.option(OptionNumber.BLOCK2) is not None
        ]

    assert len(fetches()) == 1
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(120)  # the store stalls: longer than MAX_TRANSMIT_WAIT
    assert len(fetches()) == 1  # nothing of ours leaves during the hold
    released = trio.current_time()
    store.open = True
    store.commit()
    await trio.sleep(0.5)
    burst = [t for t in fetches() if t >= released]
    # (147062d sent 2 here: the overdue retransmission twice; the redesign sends every one
    # that fell due during the hold at once: 5, MAX_RETRANSMIT's whole budget spent unseen)
    assert len(burst) <= 2, f"{len(burst)} copies of the fetch at once after the hold"


async def test_a_notification_in_blocks_is_not_lost_to_a_slow_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Rule 9.2 / RFC 7959 2.6: a notification that came in blocks is published once its
    rest is fetched. The fetch's answer is lost once; before its retransmission a command
    starts and waits for a stalled store (a hold: nothing of ours leaves). 147062d did not
    run timers while it waited, so the fetch was retransmitted when the store committed and
    the notification arrived; the redesign times the fetch out during the hold (its
    retransmissions never left) and the value is lost."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store, block_szx=0)  # 16-byte blocks
    await server.sup.subscribe("dev", "/3303/0/5700")
    await trio.sleep(1)
    server.take()
    value = b"0123456789abcdef-and-the-rest-of-it"
    await dev.notify("/3303/0/5700", value)  # its first block: the rest is fetched
    dev.handler = lambda req: (Code.CONTENT, value, 0)  # (what the fetch GET reads)
    dev.mute = True  # the device answers the fetch, and the answer is lost
    await trio.sleep(0.01)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(200)  # the store stalls past the fetch's whole retransmission budget
    dev.mute = False
    store.open = True
    store.commit()
    await trio.sleep(60)
    published = [item for _, item in server.take("notifications")]
    payloads = [base64.b64decode(str(p["payload"])) for p in published if isinstance(p, dict)]
    assert payloads == [value]


async def test_a_fetch_queued_during_a_hold_is_timed_from_when_it_leaves(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """RFC 7252 4.2: the first retransmission comes ACK_TIMEOUT after the first send. Mail is
    read during a hold (the redesign's one intended change), so a notification in blocks
    that arrives while a command's attempt waits for a slow store makes a fetch GET that
    waits with it. When the store commits the GET leaves, and must not leave again at once
    (as the held attempt itself does not: test_durability.py's "timed from when it
    leaves")."""
    store = GatedStore()
    store.open = True
    server, dev = await online(nursery, store=store, block_szx=0)  # 16-byte blocks
    await server.sup.subscribe("dev", "/3303/0/5700")
    await trio.sleep(1)
    dev.answer = False  # (nothing answered: only what the server sends is looked at)
    store.open = False
    nursery.start_soon(partial(server.sup.submit, "dev", "GET", "/3/0/1", async_id="a"))
    await trio.sleep(1)
    await dev.notify("/3303/0/5700", b"x" * 40)  # during the hold: the rest is fetched
    await trio.sleep(60)  # the store stalls
    released = trio.current_time()
    store.open = True
    store.commit()
    await trio.sleep(1)  # (less than ACK_TIMEOUT)
    fetches = [
        m.mid
        for t, m in dev.arrivals
        if t >= released and m.code == Code.GET and m.option(OptionNumber.BLOCK2) is not None
    ]
    assert len(fetches) == 1, f"the fetch GET left {len(fetches)} times within a second"
