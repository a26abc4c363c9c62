"""The lifecycle of a command attempt and of the transport under it, as two tables.

h11's way: the states, the inputs, and one table of transitions per machine. The device
machine (`device/machine.py`) fires an input at each place where something happens to the
attempt in flight or to the device's transport; `next_attempt_state` / `next_link` look the
pair up and return the next state. Every (state, input) pair is in the table: either a next
state, or `REFUSED` — a pair that cannot happen unless the machine has a bug, which raises
`IllegalTransition` (contained at the device's crash boundary like any other bug). A test
walks every pair (`tests/device/test_attempt.py`), and the diagram in `docs/architecture.md`
is generated from these tables (`mermaid()`), so the picture cannot drift from the code.

A request body sent in blocks (Block1, with 4.13 / Size1 renegotiation) is UPLOADING,
entered by `BLOCK_SENT`; an Observe the device refuses is `ANSWERED` with the refusal as
the outcome.

This module owns the tables only; it never reads a clock or does I/O.
"""

from __future__ import annotations

import enum
from typing import Final


class AttemptState(enum.Enum):
    """Where the attempt of the command in flight (`DeviceQueue.in_flight`) stands."""

    IDLE = "idle"  # no command in flight
    DECIDED = "decided"  # its Message ID and token are chosen and stored, not yet durable
    SENT = "sent"  # the request left (CON: retransmitted until acknowledged)
    ACKED = "acked"  # an empty ACK came: the separate response is awaited (RFC 7252 5.2.2)
    IN_BLOCKS = "in-blocks"  # the answer comes in blocks: the next one was asked (RFC 7959)
    UPLOADING = "uploading"  # the request body goes in blocks: the next one was sent (Block1)


class AttemptInput(enum.Enum):
    """What can happen to the attempt."""

    STARTED = "started"  # the delivery rules chose a command: its exchange is decided
    DURABLE = "durable"  # the store holds the exchange: the request is sent
    EXPIRED = "expired"  # the command expired while its write waited (rule 5.2)
    ACKED = "acked"  # the device acknowledged the request (or a block request)
    BLOCK_ASKED = "block-asked"  # the answer came in blocks: the next block was asked for
    # a block of the request body was taken (2.31), or refused as too large (4.13, block 0):
    # the next block (or block 0, smaller) was sent
    BLOCK_SENT = "block-sent"
    ANSWERED = "answered"  # the whole answer arrived (or a broken block-wise one: 502)
    FAILED = "failed"  # no answer: timeout, Reset, ICMP (rule 3.4; a retry is used)
    TRANSPORT_LOST = "transport-lost"  # closed, replaced, or the address taken (rule 3.4)
    ENDED = "ended"  # the registration ended (rules 8.2, 8.3)


class Link(enum.Enum):
    """The transport a device is reached on."""

    NONE = "none"  # not reachable now: restored TCP device, connection closed, address taken
    UDP = "udp"
    TCP = "tcp"
    ENDED = "ended"  # the registration ended: nothing more is sent


class LinkInput(enum.Enum):
    UDP_BOUND = "udp-bound"  # a message came from a (new) UDP address
    TCP_BOUND = "tcp-bound"  # a message came on a (new) TCP connection
    LOST = "lost"  # the connection closed, or another endpoint took the address
    ENDED = "ended"


class _Refused:
    __slots__ = ()

    def __repr__(self) -> str:
        return "REFUSED"


#: a pair that cannot happen: the machine raises `IllegalTransition`
REFUSED: Final = _Refused()


class IllegalTransition(Exception):
    """The machine fired an input its state does not allow: a bug in the machine."""


_S, _I = AttemptState, AttemptInput

#: every input the attempt can take in each state (absent pairs are refused)
_ATTEMPT: dict[AttemptState, dict[AttemptInput, AttemptState]] = {
    _S.IDLE: {
        _I.STARTED: _S.DECIDED,
        _I.TRANSPORT_LOST: _S.IDLE,
        _I.ENDED: _S.IDLE,
    },
    _S.DECIDED: {
        _I.DURABLE: _S.SENT,
        _I.EXPIRED: _S.IDLE,
        # never sent: back to the queue without using up a retry (rule 3.4)
        _I.TRANSPORT_LOST: _S.IDLE,
        _I.ENDED: _S.IDLE,
    },
    _S.SENT: {
        _I.ACKED: _S.ACKED,
        _I.BLOCK_SENT: _S.UPLOADING,
        _I.BLOCK_ASKED: _S.IN_BLOCKS,
        _I.ANSWERED: _S.IDLE,
        _I.FAILED: _S.IDLE,
        _I.TRANSPORT_LOST: _S.IDLE,  # it can no longer be answered: failed (unreachable)
        _I.ENDED: _S.IDLE,
    },
    _S.ACKED: {
        _I.ACKED: _S.ACKED,
        _I.BLOCK_SENT: _S.UPLOADING,
        _I.BLOCK_ASKED: _S.IN_BLOCKS,
        _I.ANSWERED: _S.IDLE,
        _I.FAILED: _S.IDLE,
        _I.TRANSPORT_LOST: _S.IDLE,
        _I.ENDED: _S.IDLE,
    },
    _S.UPLOADING: {
        _I.ACKED: _S.UPLOADING,
        _I.BLOCK_SENT: _S.UPLOADING,
        _I.BLOCK_ASKED: _S.IN_BLOCKS,  # the final answer itself comes in blocks
        _I.ANSWERED: _S.IDLE,
        _I.FAILED: _S.IDLE,  # a retry sends from block 0 again
        _I.TRANSPORT_LOST: _S.IDLE,
        _I.ENDED: _S.IDLE,
    },
    _S.IN_BLOCKS: {
        _I.ACKED: _S.IN_BLOCKS,
        _I.BLOCK_ASKED: _S.IN_BLOCKS,
        _I.ANSWERED: _S.IDLE,
        _I.FAILED: _S.IDLE,  # a retry asks from the first block again
        _I.TRANSPORT_LOST: _S.IDLE,
        _I.ENDED: _S.IDLE,
    },
}

ATTEMPT_TRANSITIONS: Final[dict[tuple[AttemptState, AttemptInput], AttemptState | _Refused]] = {
    (state, event): _ATTEMPT[state].get(event, REFUSED) for state in _S for event in _I
}

_L, _LI = Link, LinkInput

LINK_TRANSITIONS: Final[dict[tuple[Link, LinkInput], Link | _Refused]] = {
    (_L.NONE, _LI.UDP_BOUND): _L.UDP,
    (_L.NONE, _LI.TCP_BOUND): _L.TCP,
    (_L.NONE, _LI.LOST): _L.NONE,
    (_L.NONE, _LI.ENDED): _L.ENDED,
    (_L.UDP, _LI.UDP_BOUND): _L.UDP,  # a new address (NAT rebinding): the endpoint stays
    (_L.UDP, _LI.TCP_BOUND): _L.TCP,  # a new endpoint: the attempt's transport is lost
    (_L.UDP, _LI.LOST): _L.NONE,
    (_L.UDP, _LI.ENDED): _L.ENDED,
    (_L.TCP, _LI.UDP_BOUND): _L.UDP,  # a new endpoint: the attempt's transport is lost
    (_L.TCP, _LI.TCP_BOUND): _L.TCP,  # another connection: what was sent on the old one fails
    (_L.TCP, _LI.LOST): _L.NONE,
    (_L.TCP, _LI.ENDED): _L.ENDED,
    (_L.ENDED, _LI.UDP_BOUND): REFUSED,
    (_L.ENDED, _LI.TCP_BOUND): REFUSED,
    (_L.ENDED, _LI.LOST): _L.ENDED,  # (its connection closes after the De-register)
    (_L.ENDED, _LI.ENDED): REFUSED,
}


def next_attempt_state(state: AttemptState, event: AttemptInput) -> AttemptState:
    """The attempt's state after `event`.

    Raises:
        IllegalTransition: the table refuses the pair.
    """
    nxt = ATTEMPT_TRANSITIONS[state, event]
    if isinstance(nxt, _Refused):
        raise IllegalTransition(f"attempt {state.value}: {event.value} is refused")
    return nxt


def next_link(link: Link, event: LinkInput) -> Link:
    """The link after `event`.

    Raises:
        IllegalTransition: the table refuses the pair.
    """
    nxt = LINK_TRANSITIONS[link, event]
    if isinstance(nxt, _Refused):
        raise IllegalTransition(f"link {link.value}: {event.value} is refused")
    return nxt


def mermaid() -> str:
    """Both tables as mermaid state diagrams (docs/architecture.md embeds this text)."""
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> idle"]
    for (state, event), nxt in ATTEMPT_TRANSITIONS.items():
        if not isinstance(nxt, _Refused) and not (event is _I.ENDED and state is not _S.IDLE):
            lines.append(f"    {state.name.lower()} --> {nxt.name.lower()}: {event.value}")
    lines.append("    note right of idle: ended, from every state, leads here too")
    lines += ["```", "", "```mermaid", "stateDiagram-v2", "    [*] --> none"]
    for (link, levent), lnxt in LINK_TRANSITIONS.items():
        if not isinstance(lnxt, _Refused):
            lines.append(f"    {link.name.lower()} --> {lnxt.name.lower()}: {levent.value}")
    lines.append("```")
    return "\n".join(lines)
