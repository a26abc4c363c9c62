"""One short log line per CoAP message, and a budget for refusal lines. Pure: no I/O, no clock.

`describe` formats a message the way `--log-level debug` shows it (the transports call it
only when debug is on: it costs a few microseconds per message):

    in udp 127.0.0.1:56830 CON 0.02 mid=4711 token=1a2b /rd?ep=dev-1&lt=300 len=38
    out tcp 10.0.0.7:40112 2.05 token=07 block2=0/1/512 observe=12 len=512

direction, transport, peer, type (UDP only), code, Message ID (UDP only), token in hex, the
path and query of a request, Block1/Block2 as number/more/size (`bert` for size exponent 7),
Observe, and the payload's length (never the payload). Text the peer chose (path, query) is
escaped and cut, so a line stays one short line whatever it sent.

`LineBudget` bounds the refusal lines logged at info: at most `limit` per `interval`, a
repeat of one message (same key: a retransmission) within `interval` never, and the count
left out is reported with the first line after the interval.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from dm_actor.coap.numbers import MessageType, OptionNumber, code_str

if TYPE_CHECKING:
    from collections.abc import Hashable

    from dm_actor.coap.message import Message

_URI_PATH = OptionNumber.URI_PATH.value
_URI_QUERY = OptionNumber.URI_QUERY.value
_OBSERVE = OptionNumber.OBSERVE.value
_BLOCK1 = OptionNumber.BLOCK1.value
_BLOCK2 = OptionNumber.BLOCK2.value
_TYPES = tuple(t.name for t in MessageType)
_METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "iPATCH"}
#: characters of path and query shown; the rest is cut ("...")
MAX_TARGET = 120


def peer_str(peer: object) -> str:
    """`("127.0.0.1", 5683)` -> `127.0.0.1:5683`; an IPv6 host in brackets."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def _text(raw: bytes) -> str:
    text = raw.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text


def _block(raw: bytes) -> str:
    value = int.from_bytes(raw, "big")
    szx = value & 7
    size = "bert" if szx == 7 else str(16 << szx)
    return f"{value >> 4}/{value >> 3 & 1}/{size}"


def describe(msg: Message, direction: str, transport: str, peer: object) -> str:
    """One line for one message (see the module's docstring). `direction` is `in` or `out`,
    `transport` `udp` or `tcp` (TCP has no type and no Message ID on the wire)."""
    parts = [direction, transport, peer_str(peer)]
    if transport == "udp":
        mtype = msg.mtype
        parts.append(_TYPES[mtype] if 0 <= mtype < 4 else str(mtype))
    code = msg.code
    parts.append(code_str(code))
    if transport == "udp":
        parts.append(f"mid={msg.mid}")
    if msg.token:
        parts.append(f"token={msg.token.hex()}")
    extra: list[str] = []
    for number, value in msg.options:
        if number == _OBSERVE:
            extra.append(f"observe={int.from_bytes(value, 'big')}")
        elif number == _BLOCK1:
            extra.append(f"block1={_block(value)}")
        elif number == _BLOCK2:
            extra.append(f"block2={_block(value)}")
    if 1 <= code <= 31:  # a request: its target
        parts.append(target(msg))
    parts.extend(extra)
    parts.append(f"len={len(msg.payload)}")
    return " ".join(parts)


def target(msg: Message) -> str:
    """A request's path and query, `/rd?ep=dev-1&lt=300`, escaped and cut at `MAX_TARGET`."""
    path = [_text(v) for n, v in msg.options if n == _URI_PATH]
    query = [_text(v) for n, v in msg.options if n == _URI_QUERY]
    text = "/" + "/".join(path)
    if query:
        text += "?" + "&".join(query)
    return text if len(text) <= MAX_TARGET else text[:MAX_TARGET] + "..."


def request_line(msg: Message) -> str:
    """`GET /3/0`: a request's method (or code) and target, for a refusal's log line."""
    code = msg.code
    return f"{_METHODS.get(code) or code_str(code)} {target(msg)}"


def undecodable(data: bytes, direction: str, transport: str, peer: object, why: str) -> str:
    """The line for bytes that are no CoAP message."""
    return f"{direction} {transport} {peer_str(peer)} undecodable ({why}) {len(data)} bytes"


class LineBudget:
    """At most `limit` lines per `interval` seconds, and a repeated key never within it.

    `take(key, now)` says whether to log the event now: None means no (over the budget, or
    `key` was logged less than `interval` ago: a retransmission of the same message); else
    the number of events left out since the last line allowed (for "N more ..."). `key`
    None is never treated as a repeat. The keys remembered are bounded (`max_keys`, oldest
    dropped first), so a flood of distinct keys costs bounded memory.
    """

    __slots__ = ("_count", "_keys", "_max_keys", "_window_end", "interval", "limit", "skipped")

    def __init__(self, limit: int = 20, interval: float = 60.0, *, max_keys: int = 1024) -> None:
        self.limit = limit
        self.interval = interval
        self._max_keys = max_keys
        self._keys: OrderedDict[Hashable, float] = OrderedDict()  # key -> logged at
        self._window_end = float("-inf")
        self._count = 0
        self.skipped = 0
        """Events left out since the last line allowed."""

    def take(self, key: Hashable | None, now: float) -> int | None:
        keys = self._keys
        if key is not None:
            seen = keys.get(key)
            if seen is not None and now - seen < self.interval:
                return None  # a repeat: not counted as left out
        if now >= self._window_end:
            self._window_end = now + self.interval
            self._count = 0
        if self._count >= self.limit:
            self.skipped += 1
            return None
        self._count += 1
        if key is not None:
            keys[key] = now
            keys.move_to_end(key)
            while len(keys) > self._max_keys:
                keys.popitem(last=False)
        skipped, self.skipped = self.skipped, 0
        return skipped
