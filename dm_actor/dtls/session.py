"""An established DTLS 1.2 session: the state a parked device costs (kept small: slots, raw
16-byte keys, one int each for the write sequence and the replay window).

Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.dtls.errors import DecodeError, LocalProtocolError
from dm_actor.dtls.record import (
    MAX_PLAINTEXT,
    MAX_SEQUENCE,
    ContentType,
    Record,
    open_record,
    replay_fresh,
    replay_mark,
    seal,
)

if TYPE_CHECKING:
    from dm_actor.address import Address

#: Established sessions live in epoch 1: renegotiation is refused, so there is no epoch 2.
EPOCH = 1


class Session:
    """One established session (the server's view, or the client's).

    Attributes:
        address: where the peer is now (moves when a CID record authenticates from elsewhere).
        identity: the PSK identity the handshake authenticated.
        cid: the Connection ID the peer puts in its records to us (b"": none negotiated).
        peer_cid: the Connection ID we put in our records to the peer (b"": none).
        closed: set once the session has ended; `send` then raises.

    Until the peer's first application data shows it has our Finished, the session keeps
    `_last_flight` (next epoch-0 record number, our Finished, the client's random) to repeat
    that flight and to recognise late copies of the handshake's ClientHello.
    """

    __slots__ = (
        "_last_flight",
        "_read_iv",
        "_read_key",
        "_replay_highest",
        "_replay_window",
        "_write_iv",
        "_write_key",
        "_write_seq",
        "address",
        "cid",
        "closed",
        "identity",
        "peer_cid",
    )

    def __init__(
        self,
        *,
        address: Address,
        identity: bytes,
        read_key: bytes,
        read_iv: bytes,
        write_key: bytes,
        write_iv: bytes,
        cid: bytes,
        peer_cid: bytes,
        write_seq: int,
        last_flight: tuple[int, bytes, bytes] | None,
    ) -> None:
        self.address = address
        self.identity = identity
        self.cid = cid
        self.peer_cid = peer_cid
        self.closed = False
        self._read_key = read_key
        self._read_iv = read_iv
        self._write_key = write_key
        self._write_iv = write_iv
        self._write_seq = write_seq
        self._replay_highest = -1
        self._replay_window = 0
        self._last_flight = last_flight

    def __repr__(self) -> str:
        return f"<Session {self.identity!r} at {self.address} cid={self.cid.hex()}>"

    def seal(self, ctype: int, plaintext: bytes) -> bytes:
        """One protected record of ours (the next sequence number of epoch 1)."""
        if self.closed:
            raise LocalProtocolError("session closed")
        if len(plaintext) > MAX_PLAINTEXT:
            raise LocalProtocolError(f"{len(plaintext)} bytes do not fit one record")
        seq = self._write_seq
        if seq > MAX_SEQUENCE:
            raise LocalProtocolError("sequence numbers exhausted")
        self._write_seq = seq + 1
        return seal(self._write_key, self._write_iv, ctype, EPOCH, seq, plaintext, self.peer_cid)

    def open(self, record: Record) -> tuple[int, bytes]:
        """Authenticate one of the peer's epoch-1 records and mark it in the replay window.

        Raises:
            DecodeError: wrong epoch, a replay, a bad MAC (the caller drops and counts it).
        """
        if record.epoch != EPOCH:
            raise DecodeError(f"record of epoch {record.epoch}")
        if (record.type == ContentType.TLS12_CID) != bool(self.cid):
            raise DecodeError("record format does not match the negotiated CID")
        if not replay_fresh(self._replay_highest, self._replay_window, record.seq):
            raise DecodeError("replayed record")
        result = open_record(self._read_key, self._read_iv, record)
        self._replay_highest, self._replay_window = replay_mark(
            self._replay_highest, self._replay_window, record.seq
        )
        return result

    def is_newest(self, seq: int) -> bool:
        """Whether `seq` is the highest accepted so far (RFC 9146 §6: only that record may
        move the peer's address)."""
        return seq == self._replay_highest
