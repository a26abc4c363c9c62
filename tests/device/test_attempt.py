"""The attempt and link tables (`dm_actor/device/attempt.py`), walked pair by pair, and the
machine held to them: its `attempt` state agrees with its queue after every input.

Issue 12, "Must show": a test that walks the state table.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING

import pytest

from dm_actor.coap.numbers import Code
from dm_actor.device.attempt import (
    ATTEMPT_TRANSITIONS,
    LINK_TRANSITIONS,
    REFUSED,
    AttemptInput,
    AttemptState,
    IllegalTransition,
    Link,
    LinkInput,
    mermaid,
    next_attempt_state,
    next_link,
)
from dm_actor.device.effects import Finished
from tests.device.support import (
    ADDR,
    ADDR2,
    Driver,
    FakeDevice,
    command,
    deliver,
    make_machine,
    requests,
)

if TYPE_CHECKING:
    from dm_actor.coap.message import Message
    from dm_actor.device.machine import DeviceMachine


def state(m: DeviceMachine) -> AttemptState:
    """(read through a call: mypy would keep an earlier assertion's narrowing)"""
    return m.attempt


ATTEMPT_PAIRS = [(s, i) for s in AttemptState for i in AttemptInput]
LINK_PAIRS = [(link, i) for link in Link for i in LinkInput]


# -- the tables --------------------------------------------------------------------------------


def test_every_attempt_pair_is_in_the_table_as_a_state_or_refused() -> None:
    assert set(ATTEMPT_TRANSITIONS) == set(ATTEMPT_PAIRS)
    for pair, nxt in ATTEMPT_TRANSITIONS.items():
        assert nxt is REFUSED or isinstance(nxt, AttemptState), pair


def test_every_link_pair_is_in_the_table_as_a_link_or_refused() -> None:
    assert set(LINK_TRANSITIONS) == set(LINK_PAIRS)
    for pair, nxt in LINK_TRANSITIONS.items():
        assert nxt is REFUSED or isinstance(nxt, Link), pair


@pytest.mark.parametrize(("state", "event"), ATTEMPT_PAIRS, ids=lambda x: x.value)
def test_an_attempt_pair_moves_as_the_table_says_or_raises(
    state: AttemptState, event: AttemptInput
) -> None:
    nxt = ATTEMPT_TRANSITIONS[state, event]
    if nxt is REFUSED:
        with pytest.raises(IllegalTransition, match=f"{state.value}: {event.value}"):
            next_attempt_state(state, event)
    else:
        assert next_attempt_state(state, event) is nxt


@pytest.mark.parametrize(("link", "event"), LINK_PAIRS, ids=lambda x: x.value)
def test_a_link_pair_moves_as_the_table_says_or_raises(link: Link, event: LinkInput) -> None:
    nxt = LINK_TRANSITIONS[link, event]
    if nxt is REFUSED:
        with pytest.raises(IllegalTransition, match=f"{link.value}: {event.value}"):
            next_link(link, event)
    else:
        assert next_link(link, event) is nxt


def _reachable_from(start: AttemptState) -> set[AttemptState]:
    seen, todo = {start}, deque([start])
    while todo:
        state = todo.popleft()
        for event in AttemptInput:
            nxt = ATTEMPT_TRANSITIONS[state, event]
            if isinstance(nxt, AttemptState) and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("state", list(AttemptState), ids=lambda s: s.value)
def test_every_attempt_state_is_reachable_from_idle_and_leads_back_to_it(
    state: AttemptState,
) -> None:
    assert state in _reachable_from(AttemptState.IDLE)
    assert AttemptState.IDLE in _reachable_from(state)


@pytest.mark.parametrize("state", list(AttemptState), ids=lambda s: s.value)
def test_ended_and_a_lost_transport_are_defined_in_every_state_and_end_the_attempt(
    state: AttemptState,
) -> None:
    """Rules 8.2/8.3 (the registration ends) and 3.4 (the transport goes) can happen at any
    moment: neither may be refused, and both leave no attempt in flight."""
    assert ATTEMPT_TRANSITIONS[state, AttemptInput.ENDED] is AttemptState.IDLE
    assert ATTEMPT_TRANSITIONS[state, AttemptInput.TRANSPORT_LOST] is AttemptState.IDLE


def test_idle_takes_nothing_but_a_start_and_the_two_that_may_come_any_time() -> None:
    allowed = {e for e in AttemptInput if ATTEMPT_TRANSITIONS[AttemptState.IDLE, e] is not REFUSED}
    assert allowed == {AttemptInput.STARTED, AttemptInput.TRANSPORT_LOST, AttemptInput.ENDED}


def test_an_ended_link_is_never_bound_again() -> None:
    for event in (LinkInput.UDP_BOUND, LinkInput.TCP_BOUND, LinkInput.ENDED):
        assert LINK_TRANSITIONS[Link.ENDED, event] is REFUSED
    assert LINK_TRANSITIONS[Link.ENDED, LinkInput.LOST] is Link.ENDED
    for link in (Link.NONE, Link.UDP, Link.TCP):
        assert LINK_TRANSITIONS[link, LinkInput.ENDED] is Link.ENDED


def _edges(block: str) -> set[tuple[str, str, str]]:
    out = set()
    for line in block.splitlines():
        head, sep, label = line.strip().partition(": ")
        src, arrow, dst = head.partition(" --> ")
        if arrow and sep and src != "[*]":
            out.add((src, dst, label))
    return out


def test_the_diagram_shows_exactly_the_allowed_transitions() -> None:
    """docs/architecture.md embeds `mermaid()`: every allowed pair is drawn, no refused one
    (ENDED from a busy state is drawn once, as a note on idle); states by their enum names
    (mermaid's ids take no hyphen)."""
    text = mermaid()
    attempt_block, link_block = text.split("```\n\n```")
    expected = {
        (state.name.lower(), nxt.name.lower(), event.value)
        for (state, event), nxt in ATTEMPT_TRANSITIONS.items()
        if isinstance(nxt, AttemptState)
        and not (event is AttemptInput.ENDED and state is not AttemptState.IDLE)
    }
    assert _edges(attempt_block) == expected
    assert "ended, from every state" in attempt_block
    assert _edges(link_block) == {
        (link.name.lower(), nxt.name.lower(), event.value)
        for (link, event), nxt in LINK_TRANSITIONS.items()
        if isinstance(nxt, Link)
    }


# -- the machine follows the table (rule 3.4) ----------------------------------------------------


def test_rule_3_4_an_attempt_decided_but_not_sent_keeps_its_retry_when_the_device_goes() -> None:
    m = make_machine()
    d = Driver(m)
    cmd = command(retry=2)
    m.submit(cmd, 0.0)
    d.take()
    assert state(m) is AttemptState.DECIDED
    m.unreachable(1.0)  # ICMP while the store still writes the exchange
    d.take(1.0)
    assert state(m) is AttemptState.IDLE
    assert m.queue.in_flight is None
    assert m.queue.queue[0] is cmd
    assert cmd.attempts_left == 3
    assert cmd.attempts == 0
    assert not requests(d.durable(1.0))  # and nothing leaves once the write is durable


def test_rule_3_4_an_attempt_sent_uses_a_retry_when_the_device_goes() -> None:
    m = make_machine()
    d = Driver(m)
    cmd = command(retry=2)
    m.submit(cmd, 0.0)
    d.take()
    assert requests(d.durable(0.0))
    assert state(m) is AttemptState.SENT
    m.unreachable(1.0)
    d.take(1.0)
    assert state(m) is AttemptState.IDLE
    assert m.queue.queue[0] is cmd
    assert cmd.attempts_left == 2


def test_rule_3_4_decided_then_moved_to_tcp_keeps_the_retry() -> None:
    """DECIDED + TRANSPORT_LOST: a move to TCP abandons the exchange before it left."""
    m = make_machine()
    d = Driver(m)
    cmd = command(retry=2)
    m.submit(cmd, 0.0)
    d.take()
    m.bind(None, object(), 1.0)
    d.take(1.0)
    assert state(m) is AttemptState.IDLE
    assert m.queue.queue[0] is cmd
    assert cmd.attempts_left == 3


def test_rule_3_4_sent_then_moved_to_tcp_uses_a_retry() -> None:
    """SENT + TRANSPORT_LOST: the request left on UDP; its answer can no longer come."""
    m = make_machine()
    d = Driver(m)
    cmd = command(retry=2)
    m.submit(cmd, 0.0)
    d.take()
    d.durable(0.0)
    m.bind(None, object(), 1.0)
    d.take(1.0)
    assert state(m) is AttemptState.IDLE
    assert m.queue.in_flight is None
    assert m.queue.queue[0] is cmd
    assert cmd.attempts_left == 2


# -- the machine's attempt agrees with its queue, whatever happens -------------------------------


def _random_walk(seed: int, steps: int = 150) -> None:
    rnd = random.Random(seed)
    m = make_machine(seed=seed)
    d = Driver(m)
    dev = FakeDevice()
    now = 0.0
    outstanding: list[Message] = []  # the server's requests the device holds
    acked: list[Message] = []  # requests the device ACKed: a separate response is owed
    tcp_conns: list[object] = []
    accepted = 0
    for _ in range(steps):
        mark = len(d.log)
        roll = rnd.random()
        if m.link is Link.ENDED:
            break
        if roll < 0.2:
            method = rnd.choice(["GET", "GET", "PUT", "POST"])
            payload = b"v" if method != "GET" else b""
            uri = rnd.choice(["/3/0/1", "/3/0", "/3303/0/5700"])
            expiry = rnd.choice([60.0, 300.0])
            cmd = command(method, uri, payload, now=now, expiry=expiry, retry=rnd.randint(0, 2))
            if m.submit(cmd, now).value == "accepted":
                accepted += 1
        elif roll < 0.35:
            d.durable(now)
        elif roll < 0.5:
            now += rnd.choice([0.5, 2.5, 10.0, 60.0])
            m.handle_timer(now)
            m.settle(now)
        elif roll < 0.55 and acked:
            req = acked.pop(0)
            dev.tcp = False
            if rnd.random() < 0.5:
                deliver(m, dev.separate(req, payload=b"s"), now)
            else:
                deliver(m, dev.in_blocks(req, bytes(range(100)), separate=True), now)
        elif roll < 0.75 and outstanding:
            req = outstanding.pop(rnd.randrange(len(outstanding)))
            how = rnd.choice(["ok", "ok", "ack", "error", "reset", "blocks"])
            tcp = m.conn is not None
            dev.tcp = tcp
            if tcp and how in ("ack", "reset"):
                how = "ok"
            if how == "ok":
                data = dev.answer(req, payload=b"x", max_age=rnd.choice([0, 60]))
            elif how == "ack":
                data = dev.ack(req)
                acked.append(req)
            elif how == "error":
                data = dev.answer(req, Code.NOT_FOUND)
            elif how == "reset":
                data = dev.reset(req)
            else:
                data = dev.in_blocks(req, bytes(range(100)))
            deliver(m, data, now)
        elif roll < 0.8:
            m.unreachable(now)
            m.settle(now)
        elif roll < 0.85:
            if rnd.random() < 0.5:
                conn = object()
                tcp_conns.append(conn)
                m.bind(None, conn, now)
            else:
                m.bind(rnd.choice([ADDR, ADDR2]), None, now)
            outstanding.clear()
            acked.clear()
            m.settle(now)
        elif roll < 0.88 and m.conn is not None:
            m.lose_connection()
            m.connection_closed(now)
            outstanding.clear()
            acked.clear()
        elif roll < 0.9:
            m.sweep(now)
        elif roll < 0.903:
            m.end(now)
        else:
            deliver(m, dev.request(), now)
        d.take(now)
        outstanding += requests(d.log[mark:])
        assert (m.attempt is AttemptState.IDLE) == (m.queue.in_flight is None), (seed, m.attempt)
        assert len(m.queue) <= 20
    if m.link is not Link.ENDED:
        m.end(now)
    d.take(now)
    assert state(m) is AttemptState.IDLE
    assert len(d.finished) == accepted
    assert sum(1 for e in d.log if isinstance(e, Finished)) == accepted


@pytest.mark.parametrize("seed", range(40))
def test_the_attempt_state_agrees_with_the_queue_after_every_input(seed: int) -> None:
    _random_walk(seed)
