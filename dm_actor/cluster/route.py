"""Which slot a CoAP datagram from a device names, read from its bytes (cluster mode's ingress).

Every datagram a node receives in cluster mode passes here before anything else, so this
reads as little as it can and never raises:

- a response (codes 2.xx-5.xx: a piggybacked ACK, a separate response, a notification) names
  the slot in the first two bytes of its 6-byte token (`slots.slot_of_token`): the header and
  two bytes, nothing decoded;
- a Register (POST with Uri-Path "rd" and a Uri-Query "ep=...") names `slot_of(ep)`;
- an Update or De-register (POST or DELETE with Uri-Path "rd", "<registration id>") names
  the slot in its registration id (`slots.slot_of_reg_id`);

anything else (an empty ACK, a Reset, a ping, other requests, a malformed datagram) names no
slot: None. Options are walked only as far as Uri-Query (no `Message` is built), and a
datagram over `MAX_ROUTED` bytes is not read (the router drops those unread anyway).
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dm_actor.cluster.slots import TOKEN_LENGTH, slot_of, slot_of_reg_id

#: longer datagrams name no slot (handled where they arrive: the router drops them unread)
MAX_ROUTED = 4096

_POST = 2
_DELETE = 4
_URI_PATH = 11
_URI_QUERY = 15
_FIRST_RESPONSE = 64  # 2.00: every code from here on is a response (or TCP signalling)


def slot_named(data: bytes, count: int) -> int | None:
    """The slot `data` names (see the module docstring), None when it names none.

    Never raises, whatever the bytes."""
    try:
        return _slot_named(data, count)
    except Exception:  # (a bug here must not end the receive loop: the datagram stays local)
        return None


def _slot_named(data: bytes, count: int) -> int | None:
    n = len(data)
    if n < 4 or n > MAX_ROUTED:
        return None
    b0 = data[0]
    if b0 >> 6 != 1:
        return None
    tkl = b0 & 0x0F
    code = data[1]
    if code >= _FIRST_RESPONSE:
        if tkl != TOKEN_LENGTH or n < 4 + TOKEN_LENGTH:
            return None
        slot = (data[4] << 8) | data[5]
        return slot if slot < count else None
    if code != _POST and code != _DELETE:
        return None
    pos = 4 + tkl
    if tkl > 8 or pos >= n:
        return None
    number = 0
    segments = 0
    second = b""
    ep: bytes | None = None
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            break
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 13:
                if pos >= n:
                    return None
                delta = data[pos] + 13
                pos += 1
            elif delta == 14:
                if pos + 2 > n:
                    return None
                delta = ((data[pos] << 8) | data[pos + 1]) + 269
                pos += 2
            else:
                return None
        if length >= 13:
            if length == 13:
                if pos >= n:
                    return None
                length = data[pos] + 13
                pos += 1
            elif length == 14:
                if pos + 2 > n:
                    return None
                length = ((data[pos] << 8) | data[pos + 1]) + 269
                pos += 2
            else:
                return None
        number += delta
        end = pos + length
        if number > _URI_QUERY or end > n:
            break
        if number == _URI_PATH:
            segments += 1
            if segments == 1:
                if length != 2 or data[pos] != 0x72 or data[pos + 1] != 0x64:  # "rd"
                    return None
            elif segments == 2:
                second = data[pos:end]
            else:
                return None
        elif number > _URI_PATH:
            if segments != 1:
                break  # (an Update's queries do not matter; no path: not ours)
            if number == _URI_QUERY and ep is None and data.startswith(b"ep=", pos, end):
                ep = data[pos + 3 : end]
        pos = end
    if segments == 1:
        if code != _POST or not ep:
            return None
        try:
            return slot_of(ep.decode("utf-8"), count)
        except UnicodeDecodeError:
            return None
    if segments == 2:
        try:
            return slot_of_reg_id(second.decode("ascii"), count)
        except UnicodeDecodeError:
            return None
    return None
