"""Stateful property test of the supervisor and its device actors (issue 10's harness).

Hypothesis draws a list of actions (`stateful_support`): Registers, Updates and De-registers
from a handful of UDP and TCP peers, requests with new, repeated and evicted Message IDs,
retransmissions, duplicated and reordered datagrams, a new endpoint registering from an
address another device holds, TCP connections opened and closed mid-exchange, the devices'
answers to the server's requests (or none), commands submitted and expiring, and the store
stalling and catching up. Each example runs in one `trio.run` in virtual time; the
invariants are checked after every action (`World.check`) and at the end (`World.finish`:
every 202 had exactly one AsyncIDResponse). Shrinking works on the list, so a failure is
reported as a short list of actions.

Run longer with `pytest tests/actors/test_stateful.py --hypothesis-profile long`
(docs/operations.md, "Testing under attack").
"""

from __future__ import annotations

from hypothesis import event, given, settings, strategies as st

from tests.actors.stateful_support import (
    LIFETIME_SLACK,
    N_EP,
    N_TCP,
    N_UDP,
    Action,
    Answer,
    Close,
    Commit,
    Connect,
    Deregister,
    Filler,
    Junk,
    Notify,
    Open,
    Ping,
    Register,
    Release,
    Repeat,
    Sleep,
    Stall,
    Submit,
    Subscribe,
    Unreachable,
    Unsubscribe,
    Update,
    run_actions,
)

# biased toward the first peers and endpoints: collisions (one address, several devices;
# one device, several addresses) are what finds bugs; shrinking goes toward 0 too
peers = st.sampled_from([0, 0, 0, 1, 1, 2, 3, 3, 4][: N_UDP + N_TCP + 4])
udp_peers = st.sampled_from([0, 0, 1, 2][: N_UDP + 1])
tcp_peers = st.integers(N_UDP, N_UDP + N_TCP - 1)
eps = st.sampled_from([0, 0, 1, 2][: N_EP + 1])
small = st.integers(0, 7)
lifetimes = st.sampled_from([86400, 60, 300])
held = st.sampled_from([False, False, False, True])  # put in the network, for `Release`
register = st.builds(Register, peers, eps, lifetimes, st.booleans(), held)
update = st.builds(Update, peers, eps, st.none() | lifetimes, st.booleans(), held)
deregister = st.builds(Deregister, peers, eps, st.booleans(), held)
filler = st.builds(
    Filler, peers, st.sampled_from([1, 3, 16, 17, 20]), st.booleans(), st.booleans(),
    st.sampled_from(["get", "delete", "update"]),
)  # fmt: skip
repeat = st.builds(
    Repeat, peers, st.sampled_from([0, 0, 1, 2, 17, 21]), st.booleans(), st.booleans(),
    st.booleans(),
)  # fmt: skip
hows = st.sampled_from(["ok", "ok", "error", "reset", "drop", "twice", "separate", "blocks"])
answer = st.builds(Answer, peers, small, hows)
submit = st.builds(Submit, eps, st.integers(0, 3), st.integers(0, 5), st.sampled_from([60, 300]),
                   st.none() | small)  # fmt: skip
sleep = st.builds(Sleep, st.sampled_from([0.5, 2.5, 10.0, 45.0, 100.0, 250.0]))


def _weighted(*branches: tuple[int, st.SearchStrategy[Action]]) -> st.SearchStrategy[Action]:
    """`one_of` with weights (copies of one strategy would count once)."""
    return st.one_of(*(s.map(_Copy(i)) for w, s in branches for i in range(w)))


class _Copy:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, action: Action) -> Action:
        return action

    def __repr__(self) -> str:
        return f"copy{self.n}"


actions = _weighted(
    # the registration interface, repeats, answers and commands most often
    (5, register), (2, update), (1, deregister), (2, filler), (3, repeat),
    (1, st.builds(Release, udp_peers, st.booleans(), st.booleans())),
    (1, st.builds(Junk, udp_peers, st.binary(max_size=16))),
    (1, st.builds(Ping, udp_peers)),
    (3, answer),
    (2, st.builds(Notify, peers, small, st.booleans(), st.booleans(), st.booleans())),
    (1, st.builds(Unreachable, udp_peers)),
    (1, st.builds(Connect, tcp_peers)),
    (1, st.builds(Close, tcp_peers, st.booleans(), st.booleans())),
    (3, submit), (2, st.builds(Subscribe, eps, st.integers(0, 5))),
    (1, st.builds(Unsubscribe, eps, st.integers(0, 5))), (2, sleep),
    (2, st.just(Stall())), (1, st.just(Commit())), (1, st.just(Open())),
)  # fmt: skip
# hypothesis' lists average 5 elements; lists of lists average ~20 and still shrink well
scripts = st.lists(st.lists(actions, max_size=40), max_size=8).map(
    lambda parts: [a for part in parts for a in part]
)


@settings(report_multiple_bugs=False)
@given(scripts, st.integers(0, 2**16))
def test_random_interleavings_keep_every_invariant(actions: list[Action], seed: int) -> None:
    for key, value in run_actions(actions, seed).items():
        event(
            f"{key}: {'0' if not value else '1' if value == 1 else '2-9' if value < 10 else '10+'}"
        )


def test_a_quiet_world_finishes() -> None:
    """The harness itself: a device registers, gets a command, answers it."""
    run_actions([Register(0, 0), Submit(0), Answer(0), Sleep(2.5)])


# -- what the harness found: each shrunk example, with no finding assumed away ----------------
NONE: frozenset[str] = frozenset()


def test_issue_10_finding_1_a_repeat_after_eviction_of_a_held_register() -> None:
    """Issue 10, finding 1 (fixed in d5d604e, 6355215): crashed the server on a681b2b with
    `LocalProtocolError: request 10002 was already answered` in `_release_replies`."""
    run_actions([Register(0, 0), Stall(), Register(0, 0), Repeat(0, 0, evict=True), Open()], 0,
                NONE)  # fmt: skip


def test_issue_10_finding_2_another_endpoint_from_a_bound_address() -> None:
    """Issue 10, finding 2 (fixed in 6355215): never answered on a681b2b."""
    run_actions([Register(0, 0), Register(0, 1)], 0, NONE)


def test_f1_a_held_answer_goes_out_on_the_transport_it_came_on() -> None:
    """F1 (fixed in 11d04ce): the TCP Register's 2.01 went out as a UDP ACK to 10.0.0.1."""
    run_actions([Stall(), Register(3, 0), Register(3, 0), Register(0, 0)], 0, NONE)


def test_f2_an_attempt_waiting_for_the_store_when_another_device_takes_the_address() -> None:
    """F2 (fixed in 770d659): the attempt stayed in flight forever, its 202 unanswered."""
    run_actions([Stall(), Register(0, 0), Submit(0), Register(0, 1)], 0, NONE)


def test_f3_seventeen_requests_in_one_step() -> None:
    """F3 (fixed in 770d659): the 17th was dropped, unanswered and uncounted."""
    run_actions([Register(0, 0), Filler(0, 17, settle_each=False)], 0, NONE)


def test_f4_updates_do_not_grow_the_lifetime_heap() -> None:
    """F4 (fixed in 770d659): each Update pushed an entry that stayed until due (a day)."""
    updates = [Filler(0, 20, kind="update")] * (LIFETIME_SLACK // 20 + 4)
    run_actions([Register(0, 0), *updates], 0, NONE)


def test_f5_mail_queued_behind_a_register_of_another_endpoint() -> None:
    """F5 (fixed in 770d659): the second Register was answered to nobody and unbound ep0."""
    run_actions([Register(0, 0, hold=True), Register(0, 0, hold=True), Register(0, 1),
                 Release(0)], 0, NONE)  # fmt: skip


def test_f5b_answers_waiting_behind_an_attempt_when_the_device_moves() -> None:
    """The Update's 4.04 waits in the endpoint behind the submitted GET's write; ep0 moves to
    10.0.0.2 meanwhile: the answer to 10.0.0.1's Message ID goes to 10.0.0.2."""
    run_actions([Stall(), Register(0, 0), Submit(0), Update(0, 0), Register(1, 0)], 0, NONE)


def test_f6_answers_held_for_the_store_stay_within_the_limit() -> None:
    """F6 (fixed in 770d659): wrong-id De-registers waited for the store, 16 per device."""
    run_actions([Register(2, 2), Stall(), Register(0, 0), Filler(2, 17, kind="delete"),
                 Filler(0, 20, kind="delete")], 0, NONE)  # fmt: skip


def test_f7_tcp_mail_queued_behind_a_register_of_another_endpoint() -> None:
    """ep0 waits for its Observe's write; a Register of ep1 and one of ep0 queue on its TCP
    connection; the first takes the connection, the second is answered to nobody."""
    run_actions([Register(0, 0), Subscribe(0, 0), Stall(), Register(3, 0), Register(3, 1),
                 Register(3, 0), Open()], 0, NONE)  # fmt: skip


def test_f7_tcp_mail_drained_after_its_connection_was_replaced() -> None:
    """ep0 is on a TCP connection with a Register queued; a UDP Register of ep0, queued in
    ep1's mailbox and read after the commit, moves ep0: `_bind` drains the connection's
    mail after dropping it, and the queued Register is answered to nobody."""
    run_actions([Stall(), Register(0, 0), Register(0, 1), Submit(0), Submit(1), Register(0, 1),
                 Register(0, 0), Register(3, 0), Register(3, 0)], 0, NONE)  # fmt: skip
