"""The one-line message format of the debug log, and the budget of refusal lines."""

from __future__ import annotations

from dm_actor.coap.blockwise import Block
from dm_actor.coap.message import Message, path_options, query_options, sort_options, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.coap.trace import (
    MAX_TARGET,
    LineBudget,
    describe,
    peer_str,
    request_line,
    undecodable,
)


def test_a_register_shows_type_code_mid_token_path_query_and_length() -> None:
    msg = Message(
        MessageType.CON,
        Code.POST,
        4711,
        bytes.fromhex("1a2b"),
        path_options("rd") + query_options("ep=dev-1&lt=300"),
        b"</1/0>,</3/0>",
    )
    line = describe(msg, "in", "udp", ("127.0.0.1", 56830))
    assert line == "in udp 127.0.0.1:56830 CON 0.02 mid=4711 token=1a2b /rd?ep=dev-1&lt=300 len=13"


def test_a_response_shows_no_path_and_its_block_and_observe_options() -> None:
    options = sort_options(
        [
            (OptionNumber.OBSERVE.value, uint_bytes(12)),
            Block(3, True, 5).option(OptionNumber.BLOCK2.value),
            Block(0, False, 7).option(OptionNumber.BLOCK1.value),
        ]
    )
    msg = Message(MessageType.ACK, Code.CONTENT, 9, b"\x07", options, b"x" * 512)
    line = describe(msg, "out", "udp", ("::1", 5683, 0, 0))
    assert line == (
        "out udp [::1]:5683 ACK 2.05 mid=9 token=07"
        " observe=12 block2=3/1/512 block1=0/0/bert len=512"
    )


def test_tcp_has_no_type_and_no_message_id_and_an_empty_token_is_left_out() -> None:
    msg = Message(0, Code.GET, 0, b"", path_options("3/0/1"))
    assert (
        describe(msg, "in", "tcp", ("10.0.0.7", 40112)) == "in tcp 10.0.0.7:40112 0.01 /3/0/1 len=0"
    )
    assert (
        describe(Message(0, 0xE1), "out", "tcp", ("10.0.0.7", 1)) == "out tcp 10.0.0.7:1 7.01 len=0"
    )


def test_text_the_peer_chose_is_escaped_and_cut() -> None:
    evil = Message(MessageType.CON, Code.GET, 1, b"", ((11, b"a\nb\x1b[31m"), (11, b"\xff")))
    line = describe(evil, "in", "udp", ("127.0.0.1", 1))
    assert "\n" not in line and "\x1b" not in line
    assert "/a\\nb\\x1b[31m/\\xff " in line
    long = Message(MessageType.CON, Code.GET, 1, b"", path_options("/".join(["abcdefgh"] * 40)))
    target = describe(long, "in", "udp", ("127.0.0.1", 1)).split()[6]
    assert target.endswith("...") and len(target) == MAX_TARGET + 3
    assert request_line(Message(MessageType.CON, Code.DELETE, 1, b"", path_options("rd/x"))) == (
        "DELETE /rd/x"
    )
    assert request_line(Message(MessageType.CON, 0x1F, 1)) == "0.31 /"


def test_undecodable_bytes_and_peers() -> None:
    assert undecodable(b"\x00" * 3, "in", "udp", ("1.2.3.4", 5), "too short") == (
        "in udp 1.2.3.4:5 undecodable (too short) 3 bytes"
    )
    assert peer_str("somewhere") == "somewhere"


def test_the_budget_allows_limit_lines_per_interval_and_reports_what_it_left_out() -> None:
    budget = LineBudget(3, 60.0)
    taken = [budget.take(("peer", i), 10.0) for i in range(10_000)]
    assert taken[:3] == [0, 0, 0]
    assert all(t is None for t in taken[3:])
    assert budget.take(("peer", -5), 69.9) is None  # still the same interval
    assert budget.take(("peer", -6), 70.0) == 9_998  # the next interval: 9,997 + 1 left out
    assert budget.take(("peer", -7), 70.0) == 0


def test_a_repeated_key_is_logged_once_an_interval_and_not_counted_as_left_out() -> None:
    budget = LineBudget(20, 60.0)
    assert budget.take(("a", 1), 0.0) == 0
    for t in range(1, 60):
        assert budget.take(("a", 1), float(t)) is None  # retransmissions of one message
    assert budget.skipped == 0
    assert budget.take(("a", 1), 60.0) == 0  # a minute later it is news again
    assert budget.take(None, 60.0) == 0  # no key: never a repeat
    assert budget.take(None, 60.0) == 0


def test_the_keys_it_remembers_are_bounded() -> None:
    budget = LineBudget(10**9, 60.0, max_keys=100)
    for i in range(10_000):
        assert budget.take(i, 1.0) == 0
    assert len(budget._keys) == 100
    assert budget.take(9_999, 2.0) is None and budget.take(0, 2.0) == 0
