"""A queue-mode device whose request outlasts its awake window asks for no timer in the past.

Found by tests/test_crash.py: with the server down, a woken device's Update was retransmitted
for longer than `Profile.awake`; `deadline()` then returned the past `awake_until` while
`on_timer` (rightly) does nothing about it with a request in flight, so the fleet fired that
device over and over and every other device of the fleet starved until the Update ended.
"""

from __future__ import annotations

import random

from dm_actor.coap.message import Message, decode, encode, path_options
from dm_actor.coap.numbers import Code, MessageType
from dm_actor.sim.client import REGISTERED, SLEEPING, Profile, SimDevice, Totals
from dm_actor.sim.objects import World


class Net:
    def __init__(self) -> None:
        self.totals = Totals()
        self.sent: list[bytes] = []

    def send(self, device: SimDevice, data: bytes) -> None:
        self.sent.append(data)

    def open(self, device: SimDevice) -> bool:
        return True

    def close(self, device: SimDevice) -> None:
        pass


def test_an_unanswered_update_past_the_awake_window_keeps_the_timer_moving() -> None:
    net = Net()
    world = World(random.Random(3), sample_period=5.0)
    dev = SimDevice(net, Profile(awake=5.0), world, 0, "dev-0", queue=True, lifetime=300)
    dev.on_timer(0.0)
    reg = decode(net.sent.pop())
    created = Message(MessageType.ACK, Code.CREATED, reg.mid, reg.token, path_options("rd/r1", 8))
    dev.on_datagram(encode(created), 0.0)
    dev.on_timer(dev.deadline())
    assert dev.state == SLEEPING
    woke = dev.deadline()
    dev.on_timer(woke)  # wakes with an Update that nobody answers
    assert dev.state == REGISTERED and dev.req_token is not None and len(net.sent) == 1

    now = woke
    while len(net.sent) < 4:  # the Update and three retransmissions, ~2 + 4 + 8 s later
        at = dev.deadline()
        assert at > now, f"a timer at {at} when it is already {now}"
        now = at
        dev.on_timer(now)
    assert now > woke + 5.0  # well past the awake window
    assert len({decode(d).mid for d in net.sent}) == 1
