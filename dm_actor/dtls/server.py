"""The server half of the DTLS 1.2 PSK machine: cookies, handshakes, sessions by address and
by Connection ID.

Pure: no I/O, no clock (`now` comes in), no global random (`random_bytes` is injected;
`os.urandom` by default). Nothing a peer sends raises out of `receive`: a record that does not
parse or authenticate is dropped and counted (`statistics().records_dropped`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import itertools
import os
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import TYPE_CHECKING

from dm_actor.dtls.errors import DecodeError
from dm_actor.dtls.events import (
    ApplicationData,
    DatagramToSend,
    Event,
    HandshakeFailed,
    SessionAddressChanged,
    SessionClosed,
    SessionEstablished,
)
from dm_actor.dtls.messages import (
    EMPTY_RENEGOTIATION_INFO_SCSV,
    TLS_PSK_WITH_AES_128_CCM_8,
    AlertDescription,
    AlertLevel,
    ClientHello,
    ExtensionType,
    Fragment,
    HandshakeType,
    Reassembly,
    alert,
    handshake_message,
    hello_verify_request,
    parse_client_hello,
    parse_client_key_exchange,
    server_hello,
    split_fragments,
)
from dm_actor.dtls.prf import (
    extended_master_secret,
    key_block,
    master_secret,
    psk_premaster,
    verify_data,
)
from dm_actor.dtls.record import (
    DTLS_1_0,
    DTLS_1_2,
    ContentType,
    Record,
    plaintext_record,
    split_records,
)
from dm_actor.dtls.session import Session
from dm_actor.dtls.wire import Reader, vec8

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.address import Address

COOKIE_LENGTH = 16
_WAIT_CKE, _WAIT_CCS, _WAIT_FINISHED = 0, 1, 2


#: records of one datagram that are read (a client's flight is 3 to 5); the rest are dropped
MAX_RECORDS = 16


@dataclass(frozen=True, slots=True)
class DtlsStatistics:
    """Counters of one `DtlsServer` (trio's `statistics()` convention)."""

    sessions: int
    """Established sessions."""
    handshakes: int
    """Half-open handshakes (past the cookie exchange)."""
    hello_verify_requests: int
    """Cookies sent: ClientHellos answered without allocating anything."""
    handshakes_completed: int
    handshakes_failed: int
    """Handshakes abandoned: alert sent or received, or the deadline passed."""
    handshakes_refused: int
    """Verified ClientHellos dropped because the half-open bounds were full."""
    records_dropped: int
    """Records dropped: malformed, unknown epoch or CID, replayed, failed MAC."""
    retransmissions: int


class _Handshake:
    """A half-open server handshake, from the verified ClientHello to the client's Finished."""

    __slots__ = (
        "address",
        "cid",
        "client_random",
        "deadline",
        "ems",
        "epoch0_seq",
        "flight",
        "identity",
        "master",
        "peer_cid",
        "psk",
        "reassembly",
        "recv_seq",
        "send_seq",
        "server_random",
        "session",
        "state",
        "timeout",
        "timer_at",
        "transcript",
    )

    def __init__(self, address: Address, client_random: bytes, server_random: bytes) -> None:
        self.address = address
        self.client_random = client_random
        self.server_random = server_random
        self.transcript = hashlib.sha256()
        self.ems = False
        self.cid = b""
        self.peer_cid = b""
        self.recv_seq = 0
        self.send_seq = 0
        self.epoch0_seq = 0
        self.state = _WAIT_CKE
        self.session: Session | None = None
        self.master = b""
        self.identity: bytes | None = None
        self.psk = b""  # the key looked up at the ClientKeyExchange (checked again at Finished)
        self.flight: tuple[bytes, ...] = ()
        self.reassembly: Reassembly | None = None
        self.timeout = 0.0
        self.timer_at = 0.0
        self.deadline = 0.0


class DtlsServer:
    """The server side of DTLS 1.2 with TLS_PSK_WITH_AES_128_CCM_8, for any number of peers.

    Args:
        psk_lookup: PSK identity -> key bytes, or None when the identity is unknown (the
            handshake then ends with an `unknown_psk_identity` alert, RFC 4279 §2).
        random_bytes: the CSPRNG (server randoms, cookie secrets, CIDs).
        connection_id: offer RFC 9146 Connection IDs to clients that ask.
        cid_length: the length of the CIDs this server hands out.
        max_handshakes: half-open handshakes in total; more verified ClientHellos are dropped.
        max_handshakes_per_host: half-open handshakes per source IP address.
        handshake_timeout: seconds from the verified ClientHello to the Finished.
        initial_retransmit, max_retransmit: the flight timer (RFC 6347 §4.2.4.1: 1 s doubling
            to 60 s).
        cookie_lifetime: seconds between cookie-secret rotations (the previous secret stays
            valid for one more period).
    """

    def __init__(
        self,
        psk_lookup: Callable[[bytes], bytes | None],
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        connection_id: bool = True,
        cid_length: int = 6,
        max_handshakes: int = 1024,
        max_handshakes_per_host: int = 8,
        handshake_timeout: float = 60.0,
        initial_retransmit: float = 1.0,
        max_retransmit: float = 60.0,
        cookie_lifetime: float = 300.0,
    ) -> None:
        if not 1 <= cid_length <= 255:
            raise ValueError("cid_length must be 1..255")
        self._psk_lookup = psk_lookup
        self._random = random_bytes
        self._use_cid = connection_id
        self._cid_length = cid_length
        self._max_handshakes = max_handshakes
        self._max_per_host = max_handshakes_per_host
        self._handshake_timeout = handshake_timeout
        self._initial_retransmit = initial_retransmit
        self._max_retransmit = max_retransmit
        self._cookie_lifetime = cookie_lifetime
        self._secret = random_bytes(32)
        self._old_secret: bytes | None = None
        self._rotate_at: float | None = None
        self._sessions: dict[Address, Session] = {}
        self._by_cid: dict[bytes, Session] = {}
        self._handshakes: dict[Address, _Handshake] = {}
        self._per_host: dict[str | bytes, int] = {}
        #: (when, order, address): a stale entry (handshake gone or re-armed) is skipped.
        self._timers: list[tuple[float, int, Address]] = []
        self._timer_order = itertools.count()
        self._hvr = self._completed = self._failed = self._refused = 0
        self._dropped = self._retransmissions = 0
        self._hello_in_datagram = False

    # -- public surface ---------------------------------------------------------------------

    def receive(self, datagram: bytes, address: Address, now: float) -> list[Event]:
        """Feed one datagram from `address`; returns what happened, in order. Never raises for
        anything the peer sent."""
        self._rotate_secret(now)
        self._hello_in_datagram = False
        events: list[Event] = []
        records, bad = split_records(datagram, self._cid_length)
        if bad:
            self._dropped += 1
        if len(records) > MAX_RECORDS:
            # a flight is a few records; 2,000 forged ones in one datagram must not cost
            # 2,000 authentication attempts
            self._dropped += len(records) - MAX_RECORDS
            records = records[:MAX_RECORDS]
        for record in records:
            try:
                self._record(record, address, now, events)
            except DecodeError:
                self._dropped += 1
        return events

    def send(self, session: Session, plaintext: bytes) -> bytes:
        """One protected application-data datagram for `session.address`.

        Raises:
            LocalProtocolError: the session is closed, or `plaintext` exceeds 2^14 bytes.
        """
        return session.seal(ContentType.APPLICATION_DATA, plaintext)

    def close(self, session: Session) -> bytes | None:
        """End `session` and forget it; the close_notify datagram for `session.address`, or
        None if it had already ended."""
        if session.closed:
            return None
        data = session.seal(ContentType.ALERT, alert(AlertLevel.WARNING, 0))
        self._forget(session)
        return data

    def session_at(self, address: Address) -> Session | None:
        """The established session whose peer is at `address`, if any."""
        return self._sessions.get(address)

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (a flight retransmission or a handshake
        deadline), or None."""
        timers = self._timers
        while timers:
            when, _, address = timers[0]
            hs = self._handshakes.get(address)
            if hs is not None and hs.timer_at == when:
                return when
            heappop(timers)
        return None

    def handle_timer(self, now: float) -> list[Event]:
        """Retransmit due flights (the timer doubles up to `max_retransmit`) and abandon
        handshakes past their deadline."""
        events: list[Event] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, address = heappop(timers)
            hs = self._handshakes.get(address)
            if hs is None or hs.timer_at != when:
                continue
            if now >= hs.deadline:
                self._drop_handshake(hs)
                self._failed += 1
                events.append(HandshakeFailed(hs.address, "handshake timed out", hs.identity))
                continue
            self._retransmit(hs, events)
            hs.timeout = min(hs.timeout * 2, self._max_retransmit)
            self._arm(hs, min(now + hs.timeout, hs.deadline))
        return events

    def statistics(self) -> DtlsStatistics:
        return DtlsStatistics(
            sessions=len(self._sessions),
            handshakes=len(self._handshakes),
            hello_verify_requests=self._hvr,
            handshakes_completed=self._completed,
            handshakes_failed=self._failed,
            handshakes_refused=self._refused,
            records_dropped=self._dropped,
            retransmissions=self._retransmissions,
        )

    # -- records ----------------------------------------------------------------------------

    def _record(self, record: Record, address: Address, now: float, events: list[Event]) -> None:
        if record.type == ContentType.TLS12_CID:
            session = self._by_cid.get(record.cid)
            if session is not None:
                self._session_record(session, record, address, events)
                return
            hs = self._handshakes.get(address)
            if hs is not None and hs.cid == record.cid and hs.state == _WAIT_FINISHED:
                self._handshake_protected(hs, record, now, events)
                return
            raise DecodeError("unknown connection ID")
        if record.epoch == 0:
            self._plaintext_record(record, address, now, events)
            return
        hs = self._handshakes.get(address)
        if hs is not None and hs.state == _WAIT_FINISHED and record.type == ContentType.HANDSHAKE:
            self._handshake_protected(hs, record, now, events)
            return
        session = self._sessions.get(address)
        if session is None:
            raise DecodeError("protected record without a session")
        self._session_record(session, record, address, events)

    def _plaintext_record(
        self, record: Record, address: Address, now: float, events: list[Event]
    ) -> None:
        hs = self._handshakes.get(address)
        if record.type == ContentType.HANDSHAKE:
            for fragment in split_fragments(record.fragment):
                if fragment.msg_type == HandshakeType.CLIENT_HELLO:
                    self._client_hello(fragment, record, address, now, events)
                    hs = self._handshakes.get(address)
                elif hs is not None:
                    self._fragment(hs, fragment, 0, events)
                else:
                    # (the client's repeated final flight: its authenticated Finished, in the
                    # same datagram, gets our Finished again; an unauthenticated record, which
                    # anyone can spoof from its address, gets nothing)
                    raise DecodeError("plaintext handshake record outside a handshake")
        elif record.type == ContentType.CHANGE_CIPHER_SPEC:
            if hs is None:
                raise DecodeError("ChangeCipherSpec outside a handshake")
            if record.fragment != b"\x01":
                raise DecodeError("ChangeCipherSpec body")
            if hs.state == _WAIT_CCS:
                hs.state = _WAIT_FINISHED
        elif record.type == ContentType.ALERT and hs is not None:
            reader = Reader(record.fragment)
            level, description = reader.u8(), reader.u8()
            if level == AlertLevel.FATAL:
                self._drop_handshake(hs)
                self._failed += 1
                events.append(HandshakeFailed(address, f"peer alert {description}", hs.identity))
        else:
            raise DecodeError(f"unexpected plaintext record of type {record.type}")

    def _session_record(
        self, session: Session, record: Record, address: Address, events: list[Event]
    ) -> None:
        ctype, data = session.open(record)
        holder = self._sessions.get(address)
        if (
            address != session.address
            and session.cid
            and session.is_newest(record.seq)
            and (holder is None or holder.cid)
        ):
            # an authenticated record from a new address moves the session there, unless a
            # session without CID lives at that address (it is found by its address alone:
            # a spoofed source must not end it); one with a CID is found by its CID anyway
            old = session.address
            if self._sessions.get(old) is session:
                del self._sessions[old]
            session.address = address
            self._sessions[address] = session
            events.append(SessionAddressChanged(session, old))
        if ctype == ContentType.APPLICATION_DATA:
            session._last_flight = None
            events.append(ApplicationData(session, data))
        elif ctype == ContentType.ALERT:
            reader = Reader(data)
            level, description = reader.u8(), reader.u8()
            if description == AlertDescription.CLOSE_NOTIFY or level == AlertLevel.FATAL:
                self._forget(session)
                reason = "close_notify" if description == 0 else f"peer alert {description}"
                events.append(SessionClosed(session, reason))
        elif ctype == ContentType.HANDSHAKE:
            types = {fragment.msg_type for fragment in split_fragments(data)}
            if HandshakeType.CLIENT_HELLO in types:
                no_renegotiation = alert(AlertLevel.WARNING, AlertDescription.NO_RENEGOTIATION)
                events.append(
                    DatagramToSend(
                        session.address, session.seal(ContentType.ALERT, no_renegotiation)
                    )
                )
            elif HandshakeType.FINISHED in types:
                self._resend_final_flight(session.address, events)

    def _resend_final_flight(self, address: Address, events: list[Event]) -> None:
        """The client repeats its last flight: our Finished was lost; send it again."""
        session = self._sessions.get(address)
        if session is None or session._last_flight is None:
            raise DecodeError("handshake record without a handshake")
        if not any(isinstance(e, DatagramToSend) and e.address == address for e in events):
            self._retransmissions += 1
            events.append(DatagramToSend(address, _final_flight(session)))

    # -- the handshake ----------------------------------------------------------------------

    def _cookie(self, secret: bytes, address: Address, hello: ClientHello) -> bytes:
        data = repr(address).encode() + hello.cookie_input
        return hmac.digest(secret, data, "sha256")[:COOKIE_LENGTH]

    def _rotate_secret(self, now: float) -> None:
        if self._rotate_at is None:
            self._rotate_at = now + self._cookie_lifetime
        elif now >= self._rotate_at:
            self._old_secret, self._secret = self._secret, self._random(32)
            self._rotate_at = now + self._cookie_lifetime

    def _cookie_valid(self, address: Address, hello: ClientHello) -> bool:
        if len(hello.cookie) != COOKIE_LENGTH:
            return False
        if hmac.compare_digest(hello.cookie, self._cookie(self._secret, address, hello)):
            return True
        old = self._old_secret
        return old is not None and hmac.compare_digest(
            hello.cookie, self._cookie(old, address, hello)
        )

    def _client_hello(
        self, fragment: Fragment, record: Record, address: Address, now: float, events: list[Event]
    ) -> None:
        if fragment.offset != 0 or len(fragment.body) != fragment.length:
            raise DecodeError("fragmented ClientHello (no state before the cookie)")
        if self._hello_in_datagram:
            # one answer per datagram at most: 900 ClientHellos packed in one datagram from a
            # spoofed source must not make us send 900 datagrams to it
            raise DecodeError("a second ClientHello in one datagram")
        self._hello_in_datagram = True
        hello = parse_client_hello(fragment.body)
        hs = self._handshakes.get(address)
        if hs is not None and hs.client_random == hello.random:
            if fragment.message_seq < hs.recv_seq:
                self._retransmit(hs, events)
            return
        session = self._sessions.get(address)
        flight = session._last_flight if session is not None else None
        if flight is not None and flight[2] == hello.random:
            return  # a late copy of the ClientHello that made this session
        if not self._cookie_valid(address, hello):
            self._hvr += 1
            cookie = self._cookie(self._secret, address, hello)
            message = handshake_message(
                HandshakeType.HELLO_VERIFY_REQUEST,
                fragment.message_seq,
                hello_verify_request(cookie, DTLS_1_0),
            )
            # RFC 6347 §4.2.1: the HelloVerifyRequest reuses the ClientHello's record number.
            events.append(
                DatagramToSend(
                    address, plaintext_record(ContentType.HANDSHAKE, 0, record.seq, message)
                )
            )
            return
        refusal = self._refusal(hello)
        if refusal is not None:
            description, reason = refusal
            self._failed += 1
            data = plaintext_record(
                ContentType.ALERT, 0, record.seq, alert(AlertLevel.FATAL, description)
            )
            events += [DatagramToSend(address, data), HandshakeFailed(address, reason)]
            return
        if hs is not None:
            self._drop_handshake(hs)
        elif len(self._handshakes) >= self._max_handshakes or (
            # one source's share is bounded once the table is half full (not before: behind
            # a carrier-grade NAT many devices share one IPv4 address)
            len(self._handshakes) * 2 >= self._max_handshakes
            and self._per_host.get(_source(address), 0) >= self._max_per_host
        ):
            self._refused += 1
            return
        self._start_handshake(fragment, hello, record, address, now, events)

    def _refusal(self, hello: ClientHello) -> tuple[int, str] | None:
        if hello.version > DTLS_1_2:
            # DTLS versions count down (0xFEFD is 1.2, 0xFEFF 1.0): a higher number is older.
            return AlertDescription.PROTOCOL_VERSION, f"version {hello.version:#06x}"
        if (
            TLS_PSK_WITH_AES_128_CCM_8 not in hello.cipher_suites
            or 0 not in hello.compression_methods
        ):
            return AlertDescription.HANDSHAKE_FAILURE, "no common cipher suite"
        renegotiation = hello.extensions.get(ExtensionType.RENEGOTIATION_INFO)
        if renegotiation is not None and renegotiation != b"\x00":
            return AlertDescription.HANDSHAKE_FAILURE, "renegotiation refused"
        return None

    def _start_handshake(
        self,
        fragment: Fragment,
        hello: ClientHello,
        record: Record,
        address: Address,
        now: float,
        events: list[Event],
    ) -> None:
        hs = _Handshake(address, hello.random, self._random(32))
        hs.transcript.update(
            handshake_message(HandshakeType.CLIENT_HELLO, fragment.message_seq, fragment.body)
        )
        extensions: list[tuple[int, bytes]] = []
        if (
            EMPTY_RENEGOTIATION_INFO_SCSV in hello.cipher_suites
            or ExtensionType.RENEGOTIATION_INFO in hello.extensions
        ):
            extensions.append((ExtensionType.RENEGOTIATION_INFO, b"\x00"))
        if ExtensionType.EXTENDED_MASTER_SECRET in hello.extensions:
            hs.ems = True
            extensions.append((ExtensionType.EXTENDED_MASTER_SECRET, b""))
        offered_cid = hello.extensions.get(ExtensionType.CONNECTION_ID)
        if self._use_cid and offered_cid is not None:
            reader = Reader(offered_cid)
            hs.peer_cid = reader.vec8()
            reader.expect_end()
            hs.cid = self._new_cid()
            extensions.append((ExtensionType.CONNECTION_ID, vec8(hs.cid)))
        seq = fragment.message_seq
        hello_message = handshake_message(
            HandshakeType.SERVER_HELLO,
            seq,
            server_hello(DTLS_1_2, hs.server_random, b"", extensions),
        )
        done = handshake_message(HandshakeType.SERVER_HELLO_DONE, seq + 1, b"")
        hs.transcript.update(hello_message)
        hs.transcript.update(done)
        hs.recv_seq = seq + 1
        hs.send_seq = seq + 2
        hs.flight = (hello_message, done)
        hs.epoch0_seq = record.seq
        hs.timeout = self._initial_retransmit
        hs.deadline = now + self._handshake_timeout
        self._handshakes[address] = hs
        source = _source(address)
        self._per_host[source] = self._per_host.get(source, 0) + 1
        self._arm(hs, min(now + hs.timeout, hs.deadline))
        events.append(DatagramToSend(address, self._flight_datagram(hs)))

    def _new_cid(self) -> bytes:
        in_handshakes = {hs.cid for hs in self._handshakes.values()} if self._handshakes else set()
        while True:
            cid = self._random(self._cid_length)
            if cid not in self._by_cid and cid not in in_handshakes:
                return cid

    def _handshake_protected(
        self, hs: _Handshake, record: Record, now: float, events: list[Event]
    ) -> None:
        session = hs.session
        if session is None:
            raise DecodeError("protected record before the keys")
        try:
            ctype, data = session.open(record)
        except DecodeError:
            self._fail(hs, AlertDescription.DECRYPT_ERROR, "Finished does not authenticate", events)
            return
        if ctype != ContentType.HANDSHAKE:
            raise DecodeError("protected non-handshake record during the handshake")
        for fragment in split_fragments(data):
            if self._handshakes.get(hs.address) is hs:
                self._fragment(hs, fragment, 1, events)

    def _fragment(
        self, hs: _Handshake, fragment: Fragment, epoch: int, events: list[Event]
    ) -> None:
        if fragment.message_seq < hs.recv_seq:
            self._retransmit(hs, events)
            return
        if fragment.message_seq > hs.recv_seq:
            return  # ahead of order: the peer retransmits it
        if hs.reassembly is None:
            hs.reassembly = Reassembly(fragment)
        body = hs.reassembly.add(fragment)
        if body is None:
            return
        hs.reassembly = None
        hs.recv_seq += 1
        message = handshake_message(fragment.msg_type, fragment.message_seq, body)
        if fragment.msg_type == HandshakeType.CLIENT_KEY_EXCHANGE and hs.state == _WAIT_CKE:
            if epoch != 0:
                raise DecodeError("ClientKeyExchange in epoch 1")
            self._client_key_exchange(hs, body, message, events)
        elif fragment.msg_type == HandshakeType.FINISHED and hs.state == _WAIT_FINISHED:
            if epoch != 1:
                raise DecodeError("Finished in epoch 0")
            self._finished(hs, body, message, events)
        else:
            self._fail(
                hs,
                AlertDescription.UNEXPECTED_MESSAGE,
                f"unexpected handshake message {fragment.msg_type}",
                events,
            )

    def _client_key_exchange(
        self, hs: _Handshake, body: bytes, message: bytes, events: list[Event]
    ) -> None:
        identity = parse_client_key_exchange(body)
        hs.identity = identity
        psk = self._psk_lookup(identity)
        if psk is None:
            self._fail(hs, AlertDescription.UNKNOWN_PSK_IDENTITY, "unknown PSK identity", events)
            return
        hs.psk = psk
        hs.transcript.update(message)
        premaster = psk_premaster(psk)
        if hs.ems:
            hs.master = extended_master_secret(premaster, hs.transcript.copy().digest())
        else:
            hs.master = master_secret(premaster, hs.client_random, hs.server_random)
        keys = key_block(hs.master, hs.client_random, hs.server_random)
        hs.session = Session(
            address=hs.address,
            identity=identity,
            read_key=keys.client_key,
            read_iv=keys.client_iv,
            write_key=keys.server_key,
            write_iv=keys.server_iv,
            cid=hs.cid,
            peer_cid=hs.peer_cid,
            write_seq=0,
            last_flight=None,
        )
        hs.state = _WAIT_CCS

    def _finished(self, hs: _Handshake, body: bytes, message: bytes, events: list[Event]) -> None:
        session = hs.session
        assert session is not None
        expected = verify_data(hs.master, b"client finished", hs.transcript.digest())
        if not hmac.compare_digest(body, expected):
            self._fail(hs, AlertDescription.DECRYPT_ERROR, "Finished does not verify", events)
            return
        assert hs.identity is not None
        current = self._psk_lookup(hs.identity)
        if current is None or not hmac.compare_digest(current, hs.psk):
            # the credentials were replaced or removed during the handshake: whoever holds
            # the old key must not finish it (the upper layer closed the identity's sessions)
            self._fail(hs, AlertDescription.DECRYPT_ERROR, "credentials changed", events)
            return
        hs.transcript.update(message)
        ours = verify_data(hs.master, b"server finished", hs.transcript.digest())
        finished = handshake_message(HandshakeType.FINISHED, hs.send_seq, ours)
        session._last_flight = (hs.epoch0_seq, finished, hs.client_random)
        flight = _final_flight(session)
        self._drop_handshake(hs)
        replaced = self._sessions.get(hs.address)
        if replaced is not None:
            self._forget(replaced)
        self._sessions[hs.address] = session
        if session.cid:
            self._by_cid[session.cid] = session
        self._completed += 1
        events += [DatagramToSend(hs.address, flight), SessionEstablished(session, replaced)]

    def _fail(self, hs: _Handshake, description: int, reason: str, events: list[Event]) -> None:
        data = plaintext_record(
            ContentType.ALERT, 0, hs.epoch0_seq, alert(AlertLevel.FATAL, description)
        )
        self._drop_handshake(hs)
        self._failed += 1
        events += [
            DatagramToSend(hs.address, data),
            HandshakeFailed(hs.address, reason, hs.identity),
        ]

    def _flight_datagram(self, hs: _Handshake) -> bytes:
        """ServerHello + ServerHelloDone, with fresh record numbers (RFC 6347 §4.2.4)."""
        out = b""
        for message in hs.flight:
            out += plaintext_record(ContentType.HANDSHAKE, 0, hs.epoch0_seq, message)
            hs.epoch0_seq += 1
        return out

    def _retransmit(self, hs: _Handshake, events: list[Event]) -> None:
        """Send our last flight again, at most once per datagram received."""
        if not any(isinstance(e, DatagramToSend) and e.address == hs.address for e in events):
            self._retransmissions += 1
            events.append(DatagramToSend(hs.address, self._flight_datagram(hs)))

    def _arm(self, hs: _Handshake, when: float) -> None:
        hs.timer_at = when
        heappush(self._timers, (when, next(self._timer_order), hs.address))

    def _drop_handshake(self, hs: _Handshake) -> None:
        if self._handshakes.get(hs.address) is hs:
            del self._handshakes[hs.address]
            host = _source(hs.address)
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def _forget(self, session: Session) -> None:
        session.closed = True
        if self._sessions.get(session.address) is session:
            del self._sessions[session.address]
        if session.cid and self._by_cid.get(session.cid) is session:
            del self._by_cid[session.cid]


def _final_flight(session: Session) -> bytes:
    """ChangeCipherSpec + our Finished, each time with new record numbers."""
    assert session._last_flight is not None
    epoch0_seq, finished, client_random = session._last_flight
    session._last_flight = (epoch0_seq + 1, finished, client_random)
    return plaintext_record(ContentType.CHANGE_CIPHER_SPEC, 0, epoch0_seq, b"\x01") + session.seal(
        ContentType.HANDSHAKE, finished
    )


def _source(address: Address) -> str | bytes:
    """Whose half-open handshakes count together: an IPv4 host, or an IPv6 /64 (one host
    may use every address of its own /64, RFC 4941)."""
    host = address[0]
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:  # (an IPv4 peer on a dual-stack socket: its own host)
        return str(ip.ipv4_mapped)
    return ip.packed[:8]
