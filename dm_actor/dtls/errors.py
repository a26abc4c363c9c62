"""The DTLS machine's errors: what a peer sent that does not parse, and what the caller misused.

Pure: no I/O. A `DecodeError` never leaves `DtlsServer.receive` / `DtlsClient.receive` (the
record is dropped and counted); a `LocalProtocolError` is the caller's mistake (sending on a
closed session, a plaintext too long for one record).
"""

from __future__ import annotations


class DtlsError(Exception):
    """Base of every error this package raises."""


class DecodeError(DtlsError):
    """Bytes from the peer that are not a well-formed DTLS 1.2 structure."""


class LocalProtocolError(DtlsError):
    """The caller asked for something the machine cannot do (a closed session, a too-long write)."""
