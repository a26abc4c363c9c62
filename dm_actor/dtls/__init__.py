"""DTLS 1.2 with pre-shared keys, as a sans-IO machine (RFC 6347, RFC 4279, RFC 6655, RFC 7627,
RFC 9146): bytes and `now` in, events and bytes out.

Never imports trio, socket or time (import-linter); randomness is an injected
`random_bytes(n)` (`os.urandom` by default); AES-CCM-8 is `cryptography`'s, HMAC-SHA-256 the
standard library's. One cipher suite: TLS_PSK_WITH_AES_128_CCM_8 (0xC0A8), the one LwM2M 1.1
mandates; no CBC suite (so no Lucky 13 surface), no certificates, no resumption, no
renegotiation (refused).

Public surface:

- `DtlsServer(psk_lookup, *, random_bytes, connection_id, cid_length, max_handshakes,
  max_handshakes_per_host, handshake_timeout, initial_retransmit, max_retransmit,
  cookie_lifetime)`: all peers of one socket.
    - `receive(datagram, address, now) -> list[Event]`: never raises for peer input.
    - `send(session, plaintext) -> bytes`: one datagram for `session.address`.
    - `close(session) -> bytes | None`: close_notify for `session.address`; forgets it.
    - `session_at(address) -> Session | None`.
    - `get_timer() -> float | None` / `handle_timer(now) -> list[Event]`: flight
      retransmission (1 s doubling to 60 s) and the handshake deadline.
    - `statistics() -> DtlsStatistics`.
- `DtlsClient(server, identity, psk, *, connection_id, extended_master_secret, ...)`:
  `connect(now)`, `receive(datagram, now)`, `send(plaintext)`, `close()`, `get_timer()`,
  `handle_timer(now)`, `.session`.
- `Session`: `.address` (moves on a CID record from a new address), `.identity` (bytes),
  `.cid` (b"" when none), `.closed`.
- Events (frozen): `DatagramToSend(address, data)`, `SessionEstablished(session, replaced)`,
  `ApplicationData(session, data)`, `SessionAddressChanged(session, old_address)`,
  `SessionClosed(session, reason)`, `HandshakeFailed(address, reason, identity)`.
- Errors: `DtlsError` <- `DecodeError` (peer bytes; contained), `LocalProtocolError`
  (caller misuse: closed session, plaintext over 2^14 bytes).
"""

from __future__ import annotations

from dm_actor.dtls.client import DtlsClient as DtlsClient
from dm_actor.dtls.errors import (
    DecodeError as DecodeError,
    DtlsError as DtlsError,
    LocalProtocolError as LocalProtocolError,
)
from dm_actor.dtls.events import (
    ApplicationData as ApplicationData,
    DatagramToSend as DatagramToSend,
    Event as Event,
    HandshakeFailed as HandshakeFailed,
    SessionAddressChanged as SessionAddressChanged,
    SessionClosed as SessionClosed,
    SessionEstablished as SessionEstablished,
)
from dm_actor.dtls.server import DtlsServer as DtlsServer, DtlsStatistics as DtlsStatistics
from dm_actor.dtls.session import Session as Session
