"""The frames of the internal link between cluster nodes (`dm_actor.transport.link`).

A datagram a node received for another node's slot travels to the owner as a FORWARD frame
with the device's original address; the owner's datagrams to that device travel back to the
node that received it as BACKWARD frames and leave from that node's CoAP socket (Californium's
cluster forwarding and "backwarding"); an ICMP error the ingress node saw for such a device
travels as UNREACHABLE. Pure: no I/O, no clock.

Layout (big-endian), then a 16-byte MAC:

    magic "DM" | version 2 | kind | sender length S | family 4/6 | host length H | port (2)
    | sent at (8: the sender's wall clock, IEEE double seconds)
    [IPv6 only: flowinfo (4) | scope id (4)] | sender (S, ASCII) | host (H, ASCII) | payload

- The time a frame was sent, under the MAC, lets the receiver refuse a frame that is stale:
  one replayed by someone on the internal network (without it a BACKWARD captured once made
  the ingress node send a command to the device again, minutes later: the issue-17 attacker's
  finding), or one that waited in the socket of a node that was paused (`decode_stamped`).

- The device's host is carried as the text the receiving socket reported, so the owner keys
  the device by exactly the address the ingress node sees (an IPv4-mapped "::ffff:1.2.3.4"
  or a scoped "fe80::1%eth0" would not survive a round trip through packed bytes unchanged).
  `decode` accepts only a numeric IPv4 or IPv6 address there (never a name to resolve).
- The MAC is HMAC-SHA-256 of everything before it, truncated to 16 bytes, keyed by
  `link_key(secret)` (the cluster secret, separated from its other uses). `decode` checks the
  length, magic and version, then the MAC, and parses nothing unauthenticated.
- A frame is at most `MAX_FRAME` bytes (`MAX_PAYLOAD` of payload).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import struct
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from dm_actor.address import Address

FORWARD, BACKWARD, UNREACHABLE = 1, 2, 3
KINDS = frozenset((FORWARD, BACKWARD, UNREACHABLE))
KIND_NAMES = {FORWARD: "FORWARD", BACKWARD: "BACKWARD", UNREACHABLE: "UNREACHABLE"}

MAGIC = b"DM"
VERSION = 2
MAC_LENGTH = 16
#: the longest node name (config: `[cluster] node`, at most 64 characters)
MAX_SENDER = 64
#: the longest host text: an IPv6 address (45) with a scope ("%" and an interface name)
MAX_HOST = 64
#: the longest datagram a frame carries (LwM2M needs far less: the router drops datagrams
#: over 4096 bytes unread, and bodies go in blocks of at most 1024)
MAX_PAYLOAD = 8192

_HEAD = struct.Struct(">2sBBBBBHd")  # magic, version, kind, S, family, H, port, sent at
_V6 = struct.Struct(">II")  # flowinfo, scope id
MIN_FRAME = _HEAD.size + 1 + 1 + MAC_LENGTH
MAX_FRAME = _HEAD.size + _V6.size + MAX_SENDER + MAX_HOST + MAX_PAYLOAD + MAC_LENGTH

_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    re.ASCII,
)
_SCOPE = re.compile(r"[A-Za-z0-9_.:-]{1,16}", re.ASCII)


class WireError(ValueError):
    """A frame that is not one of ours: wrong length, magic, version, kind, MAC or address.

    `reason` is a short stable word for counting and logging (`"mac"`, `"length"`, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Frame(NamedTuple):
    """One decoded, authenticated frame."""

    kind: int
    sender: str
    addr: Address
    payload: bytes


def link_key(secret: bytes) -> bytes:
    """The link's MAC key from the cluster secret (kept apart from internal HTTP's use)."""
    return hmac.digest(secret, b"dm-actor cluster link v1", "sha256")


# HMAC objects keyed and ready (the inner and outer pads hashed once), by key: copying one
# per frame costs ~1.4 us instead of ~2 us for `hmac.digest`. A node has one key; bounded.
_macs: dict[bytes, hmac.HMAC] = {}
_MACS_MAX = 16


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    base = _macs.get(key)
    if base is None:
        if len(_macs) >= _MACS_MAX:
            _macs.clear()
        base = _macs[key] = hmac.new(key, digestmod=hashlib.sha256)
    h = base.copy()
    h.update(data)
    return h.digest()[:MAC_LENGTH]


def encode(
    kind: int, sender: str, addr: Address, payload: bytes, key: bytes, sent_at: float = 0.0
) -> bytes:
    """One frame, sent at wall-clock time `sent_at` (the caller reads the clock).

    Raises:
        ValueError: an unknown kind, a sender or host too long or not ASCII, a payload over
            `MAX_PAYLOAD` (the caller's own data: nothing a peer controls, except the
            payload's length, which the caller checks first).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes, over {MAX_PAYLOAD}")
    name = sender.encode("ascii")
    host = addr[0].encode("ascii")
    if not 0 < len(name) <= MAX_SENDER or not 0 < len(host) <= MAX_HOST:
        raise ValueError("sender or host empty or too long")
    try:
        if len(addr) == 2:
            head = _HEAD.pack(MAGIC, VERSION, kind, len(name), 4, len(host), addr[1], sent_at)
            body = b"".join((head, name, host, payload))
        else:
            head = _HEAD.pack(MAGIC, VERSION, kind, len(name), 6, len(host), addr[1], sent_at)
            v6 = _V6.pack(addr[2], addr[3])
            body = b"".join((head, v6, name, host, payload))
    except struct.error as exc:
        raise ValueError(f"address {addr!r}: {exc}") from None
    return body + _mac(key, body)


def decode(data: bytes, key: bytes) -> Frame:
    """The frame in `data`, authenticated with `key` (its time not checked).

    Raises:
        WireError: anything wrong; nothing else, whatever the bytes.
    """
    return decode_stamped(data, key)[0]


def decode_stamped(data: bytes, key: bytes) -> tuple[Frame, float]:
    """The frame in `data`, authenticated with `key`, and the time it was sent at (the
    sender's wall clock: the caller compares it with its own).

    Raises:
        WireError: anything wrong; nothing else, whatever the bytes.
    """
    n = len(data)
    if n < MIN_FRAME or n > MAX_FRAME:
        raise WireError("length", f"{n} bytes")
    magic, version, kind, s, family, h, port, sent_at = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise WireError("magic", repr(magic))
    if version != VERSION:
        raise WireError("version", str(version))
    end = n - MAC_LENGTH
    view = memoryview(data)
    if not hmac.compare_digest(_mac(key, view[:end]), data[end:]):
        raise WireError("mac", "the MAC does not match")
    if kind not in KINDS:
        raise WireError("kind", str(kind))
    pos = _HEAD.size
    if family == 6:
        if pos + _V6.size > end:
            raise WireError("length", "truncated IPv6 address")
        flowinfo, scope = _V6.unpack_from(data, pos)
        pos += _V6.size
    elif family != 4:
        raise WireError("address", f"family {family}")
    if not 0 < s <= MAX_SENDER or not 0 < h <= MAX_HOST or pos + s + h > end:
        raise WireError("length", "sender or host length")
    try:
        sender = data[pos : pos + s].decode("ascii")
        host = data[pos + s : pos + s + h].decode("ascii")
    except UnicodeDecodeError:
        raise WireError("address", "sender or host is not ASCII") from None
    payload = data[pos + s + h : end]
    if kind == UNREACHABLE and payload:
        raise WireError("length", "an UNREACHABLE frame carries no payload")
    addr: Address
    if family == 4:
        if _IPV4.fullmatch(host) is None:
            raise WireError("address", f"not an IPv4 address: {host[:64]!r}")
        addr = (host, port)
    else:
        _check_ipv6(host)
        addr = (host, port, flowinfo, scope)
    return Frame(kind, sender, addr, payload), sent_at


def _check_ipv6(host: str) -> None:
    address, percent, scope = host.partition("%")
    if percent and _SCOPE.fullmatch(scope) is None:
        raise WireError("address", f"not an IPv6 scope: {scope[:64]!r}")
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise WireError("address", f"not an IPv6 address: {host[:64]!r}") from None
