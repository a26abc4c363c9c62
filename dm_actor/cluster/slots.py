"""Slots: endpoint names hashed into a fixed number of slots, and the slot written into the
ids the server issues, so that any node can route a datagram without a lookup.

Pure: no I/O, no clock. Cluster mode only; a single node issues ids as it always did.

- A registration id in cluster mode is 4 hex digits of slot, then 12 random hex digits
  (`reg_id`): an Update or De-register names its slot in its path.
- A token in cluster mode is 2 bytes of slot, then 4 bytes of the endpoint's counter
  (`token_prefix`): a response or notification names its slot.
- An application's notification channel lives on the owner of its home slot (`home_slot`).
"""

from __future__ import annotations

import hashlib
import secrets

#: The default slot count of a new cluster (fixed at creation: the ids issued carry slots).
DEFAULT_SLOTS = 1024
#: Slots are numbered below this (2 bytes of token, 4 hex digits of registration id).
MAX_SLOTS = 1 << 16
REG_ID_LENGTH = 16
TOKEN_LENGTH = 6
_HEX = frozenset("0123456789abcdef")


def _hash(text: str) -> int:
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def slot_of(endpoint: str, count: int) -> int:
    """The slot of an endpoint name (stable across processes, hosts and versions)."""
    return _hash(endpoint) % count


def home_slot(owner: str, count: int) -> int:
    """The slot whose owner hosts `owner`'s notification channel."""
    return _hash("app:" + owner) % count


def reg_id(slot: int) -> str:
    """A new, unguessable registration id naming `slot`."""
    return f"{slot:04x}{secrets.token_hex(6)}"


def slot_of_reg_id(reg_id: str, count: int) -> int | None:
    """The slot a cluster registration id names; None for any other string."""
    if len(reg_id) != REG_ID_LENGTH or not _HEX.issuperset(reg_id):
        return None
    slot = int(reg_id[:4], 16)
    return slot if slot < count else None


def token_prefix(slot: int) -> bytes:
    """The first bytes of every token sent to a device of `slot`."""
    return slot.to_bytes(2, "big")


def slot_of_token(token: bytes, count: int) -> int | None:
    """The slot a cluster token names; None for any other token."""
    if len(token) != TOKEN_LENGTH:
        return None
    slot = int.from_bytes(token[:2], "big")
    return slot if slot < count else None
