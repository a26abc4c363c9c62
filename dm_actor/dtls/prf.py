"""The TLS 1.2 key schedule for TLS_PSK_WITH_AES_128_CCM_8: PRF with SHA-256 (RFC 5246 §5),
the PSK premaster secret (RFC 4279 §2), the master secret, classic or extended (RFC 7627),
the key block (RFC 5246 §6.3, RFC 6655 §3) and Finished's verify_data (RFC 5246 §7.4.9).

Pure: no I/O. HMAC-SHA-256 comes from the standard library (`hmac.digest`, OpenSSL's); no
cryptographic primitive is written here, only the RFC's composition of HMAC calls.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

#: AES-128 key and the CCM implicit nonce part (RFC 6655 §3: 4-byte salt), no MAC key (AEAD).
KEY_LENGTH = 16
IV_LENGTH = 4
VERIFY_DATA_LENGTH = 12


def p_sha256(secret: bytes, seed: bytes, length: int) -> bytes:
    """P_SHA256(secret, seed) truncated to `length` bytes (RFC 5246 §5)."""
    out = bytearray()
    a = seed
    while len(out) < length:
        a = hmac.digest(secret, a, "sha256")
        out += hmac.digest(secret, a + seed, "sha256")
    return bytes(out[:length])


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """PRF(secret, label, seed) = P_SHA256(secret, label + seed) (RFC 5246 §5)."""
    return p_sha256(secret, label + seed, length)


def psk_premaster(psk: bytes) -> bytes:
    """Plain-PSK premaster secret: uint16 N, N zero bytes, uint16 N, the PSK (RFC 4279 §2)."""
    n = len(psk).to_bytes(2, "big")
    return n + bytes(len(psk)) + n + psk


def master_secret(premaster: bytes, client_random: bytes, server_random: bytes) -> bytes:
    """The classic master secret (RFC 5246 §8.1)."""
    return prf(premaster, b"master secret", client_random + server_random, 48)


def extended_master_secret(premaster: bytes, session_hash: bytes) -> bytes:
    """The extended master secret, bound to the handshake transcript (RFC 7627 §4)."""
    return prf(premaster, b"extended master secret", session_hash, 48)


@dataclass(frozen=True, slots=True)
class KeyBlock:
    """The traffic keys of one direction pair (RFC 5246 §6.3 order, AEAD: no MAC keys)."""

    client_key: bytes
    server_key: bytes
    client_iv: bytes
    server_iv: bytes


def key_block(master: bytes, client_random: bytes, server_random: bytes) -> KeyBlock:
    """Expand the master secret into the CCM_8 keys and implicit IVs (40 bytes)."""
    block = prf(
        master, b"key expansion", server_random + client_random, 2 * (KEY_LENGTH + IV_LENGTH)
    )
    k = KEY_LENGTH
    return KeyBlock(
        client_key=block[:k],
        server_key=block[k : 2 * k],
        client_iv=block[2 * k : 2 * k + IV_LENGTH],
        server_iv=block[2 * k + IV_LENGTH :],
    )


def verify_data(master: bytes, label: bytes, transcript_hash: bytes) -> bytes:
    """Finished.verify_data: PRF(master, "client finished"/"server finished", Hash(msgs))[:12]."""
    return prf(master, label, transcript_hash, VERIFY_DATA_LENGTH)
