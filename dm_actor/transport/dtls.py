"""CoAP over DTLS (`coaps://`): the Trio adapter around the sans-IO `dtls.DtlsServer`.

One UDP socket (a `UdpEndpoint` on the coaps port) carries every peer's records. This module
feeds them to the DTLS machine with the time, sends what it answers, runs its one timer
(handshake flights and deadlines), and hands decrypted CoAP messages up exactly as the plain
UDP socket does, with one difference: a message is known by its **session's address**
(`address.session_address(n)`), not by the socket address it came from. A session keeps its
address when the peer's address changes (RFC 9146 Connection ID) and when the same identity
shakes hands again from the same place (a client that lost its state), so the device above
is found without a new Register. A datagram to a session that has ended is dropped and
reported like an ICMP "unreachable".

What a device may do once it authenticated is decided above (`credentials.admit`, called by
the registrar with `identity_of(addr)`): this layer only proves who sent a message.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import TYPE_CHECKING

import trio

from dm_actor.address import is_session, session_address
from dm_actor.dtls import (
    ApplicationData,
    DatagramToSend,
    DtlsServer,
    HandshakeFailed,
    LocalProtocolError,
    SessionAddressChanged,
    SessionClosed,
    SessionEstablished,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from dm_actor.address import Address
    from dm_actor.dtls import Event, Session

log = logging.getLogger(__name__)

#: seconds between the end of a registration and the close of its session (`release`)
RELEASE_GRACE = 2.0


class DtlsTransport:
    """The sessions of one coaps socket, each known to the upper layers by a session address.

    Args:
        server: the DTLS machine (it owns the handshakes and the keys).
        on_datagram: `on_datagram(plaintext, session_addr)` for each decrypted datagram.
        on_unreachable: `on_unreachable(session_addr)` when a datagram cannot reach its
            session (it ended, or ICMP says its peer's address has no listener).
        on_refused: `on_refused(socket_addr, why)` for each failed handshake (the server's
            refusal lines, rate-limited there); the DTLS machine counts them too.
        is_bound: whether a registered device is bound to a session address (`release`).
        now: the clock (Trio's by default).

    Call `attach(send)` with the socket's `send(data, addr)` before datagrams arrive, and run
    `run_timer()` in a task.
    """

    def __init__(
        self,
        server: DtlsServer,
        on_datagram: Callable[[bytes, Address], None],
        on_unreachable: Callable[[Address], None],
        on_refused: Callable[[Address, str], None] | None = None,
        now: Callable[[], float] = trio.current_time,
        is_bound: Callable[[Address], bool] = lambda addr: False,
    ) -> None:
        self._on_refused = on_refused
        self._is_bound = is_bound
        # sessions whose registration ended, closed `RELEASE_GRACE` later unless a device is
        # bound to them again (by session address, in deadline order: one grace for all)
        self._releases: dict[Address, float] = {}
        self.server = server
        self._on_datagram = on_datagram
        self._on_unreachable = on_unreachable
        self._now = now
        self._send: Callable[[bytes, Address], None] | None = None
        self._numbers = itertools.count(1)
        self._by_address: dict[Address, Session] = {}  # session address -> session
        self._address_of: dict[Session, Address] = {}
        # the one session of each PSK identity (a device has one: a new handshake ends the
        # old session, so sessions are bounded by the credentials)
        self._by_identity: dict[bytes, Session] = {}
        self._timer_changed = trio.Event()
        self._timer_at = math.inf
        self.dropped_sends = 0  # datagrams for a session that had ended

    def attach(self, send: Callable[[bytes, Address], None]) -> None:
        """Datagrams go out through `send(data, socket_addr)` (the coaps socket's)."""
        self._send = send

    # -- from the socket ---------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """A datagram arrived on the coaps socket from `addr` (the socket's callback)."""
        self._handle(self.server.receive(data, addr, self._now()))
        self._rearm()

    def on_unreachable(self, addr: Address) -> None:
        """ICMP says nobody listens at the socket address `addr` any more."""
        session = self.server.session_at(addr)
        if session is not None and session in self._address_of:
            self._on_unreachable(self._address_of[session])

    # -- from the layers above ---------------------------------------------------------------

    def send(self, data: bytes, addr: Address) -> None:
        """Send `data` (a CoAP message) on the session named by the session address `addr`."""
        session = self._by_address.get(addr)
        if session is None or self._send is None:
            self.dropped_sends += 1
            log.debug("no DTLS session %s: a datagram for it is dropped", addr)
            self._on_unreachable(addr)
            return
        try:
            record = self.server.send(session, data)
        except LocalProtocolError as exc:  # (over 2^14 bytes: nothing CoAP sends here)
            self.dropped_sends += 1
            log.warning("a datagram for %s cannot be sent: %s", addr, exc)
            return
        self._send(record, session.address)

    def identity_of(self, addr: Address) -> str | None:
        """The PSK identity that authenticated the session `addr` (None: not a session, or
        one that has ended). Identities are UTF-8 (`credentials.validate`)."""
        if not is_session(addr):
            return None
        session = self._by_address.get(addr)
        if session is None:
            return None
        return session.identity.decode("utf-8", "replace")

    def close_identity(self, identity: str) -> int:
        """End the session authenticated by `identity` (its credentials were removed or
        replaced): close_notify is sent; returns how many were closed (0 or 1)."""
        session = self._by_identity.get(identity.encode())
        if session is None:
            return 0
        self._close(session)
        return 1

    def release(self, addr: Address) -> None:
        """The registration bound to session `addr` ended: close the session `RELEASE_GRACE`
        seconds from now (its last answer, the De-register's 2.02, goes out first), unless a
        device registered on it again meanwhile."""
        if addr in self._by_address:
            self._releases.pop(addr, None)
            deadline = self._now() + RELEASE_GRACE
            self._releases[addr] = deadline
            if deadline < self._timer_at:
                self._timer_at = deadline
                self._timer_changed.set()

    def revoked(self, endpoint: str, identity: str | None) -> None:
        """`Provisioning`'s hook: `endpoint`'s credentials changed or were removed, so the
        sessions its former `identity` authenticated end (close_notify)."""
        if identity is not None and (closed := self.close_identity(identity)):
            log.info("closed %d DTLS session(s) of %s: its credentials changed", closed, endpoint)

    def sessions(self) -> int:
        return len(self._by_address)

    # -- the timer ---------------------------------------------------------------------------

    async def run_timer(self) -> None:
        """Retransmit handshake flights, drop handshakes past their deadline and close the
        sessions released (`release`), forever."""
        while True:
            deadline = self.server.get_timer()
            releases = self._releases
            first = next(iter(releases.values())) if releases else math.inf
            self._timer_at = min(math.inf if deadline is None else deadline, first)
            with trio.move_on_at(self._timer_at):
                await self._timer_changed.wait()
            self._timer_changed = trio.Event()
            now = self._now()
            if deadline is not None and now >= deadline:
                self._handle(self.server.handle_timer(now))
            while releases and next(iter(releases.values())) <= now:
                addr = next(iter(releases))
                del releases[addr]
                session = self._by_address.get(addr)
                if session is not None and not self._is_bound(addr):
                    self._close(session)

    def _rearm(self) -> None:
        deadline = self.server.get_timer()
        if deadline is not None and deadline < self._timer_at:
            self._timer_at = deadline
            self._timer_changed.set()

    # -- events ------------------------------------------------------------------------------

    def _handle(self, events: Iterable[Event]) -> None:
        for event in events:
            if type(event) is ApplicationData:
                addr = self._address_of.get(event.session)
                if addr is not None:
                    self._on_datagram(event.data, addr)
            elif type(event) is DatagramToSend:
                if self._send is not None:
                    self._send(event.data, event.address)
            elif type(event) is SessionEstablished:
                self._established(event.session, event.replaced)
            elif type(event) is SessionClosed:
                addr = self._address_of.get(event.session)
                # (debug: a device may close and shake hands again as often as it likes)
                log.debug("DTLS session %s closed: %s", addr, event.reason)
                self._forget(event.session)
            elif type(event) is SessionAddressChanged:
                log.debug(
                    "DTLS session %s moved from %s to %s (Connection ID)",
                    self._address_of.get(event.session),
                    event.old_address,
                    event.session.address,
                )
            elif type(event) is HandshakeFailed and self._on_refused is not None:
                self._on_refused(event.address, f"DTLS handshake failed: {event.reason}")

    def _established(self, session: Session, replaced: Session | None) -> None:
        """A new session: the device of its identity, if it had one (it lost its state, or
        its address changed without a Connection ID), keeps its session address, and its
        older session ends."""
        addr: Address | None = None
        if replaced is not None:  # (the same socket address: already ended by the machine)
            old = self._forget(replaced)
            if replaced.identity == session.identity:
                addr = old
        previous = self._by_identity.get(session.identity)
        if previous is not None:
            old = self._address_of.get(previous)
            self._close(previous)
            addr = addr or old
        if addr is None:
            addr = session_address(next(self._numbers))
        self._by_address[addr] = session
        self._address_of[session] = addr
        self._by_identity[session.identity] = session
        log.debug("DTLS session %s from %s (identity %r)", addr, session.address, session.identity)

    def _close(self, session: Session) -> None:
        """End `session` (close_notify to its peer) and forget it."""
        data = self.server.close(session)
        if data is not None and self._send is not None:
            self._send(data, session.address)
        self._forget(session)

    def _forget(self, session: Session) -> Address | None:
        if self._by_identity.get(session.identity) is session:
            del self._by_identity[session.identity]
        addr = self._address_of.pop(session, None)
        if addr is not None:
            del self._by_address[addr]
        return addr
