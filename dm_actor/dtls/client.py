"""The client half of the DTLS 1.2 PSK machine (TLS_PSK_WITH_AES_128_CCM_8), for the
simulator and the tests: one session with one server.

Pure: no I/O, no clock (`now` comes in), `random_bytes` injected. Nothing the server sends
raises out of `receive`; bad records are dropped and counted (`records_dropped`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING

from dm_actor.dtls.errors import DecodeError, LocalProtocolError
from dm_actor.dtls.events import (
    ApplicationData,
    DatagramToSend,
    Event,
    HandshakeFailed,
    SessionClosed,
    SessionEstablished,
)
from dm_actor.dtls.messages import (
    TLS_PSK_WITH_AES_128_CCM_8,
    AlertDescription,
    AlertLevel,
    ExtensionType,
    Fragment,
    HandshakeType,
    Reassembly,
    alert,
    client_hello,
    handshake_message,
    parse_hello_verify_request,
    parse_server_hello,
    split_fragments,
)
from dm_actor.dtls.prf import (
    extended_master_secret,
    key_block,
    master_secret,
    psk_premaster,
    verify_data,
)
from dm_actor.dtls.record import DTLS_1_2, ContentType, Record, plaintext_record, split_records
from dm_actor.dtls.session import Session
from dm_actor.dtls.wire import Reader, vec8, vec16

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.address import Address

_IDLE, _WAIT_HELLO, _WAIT_DONE, _WAIT_CCS, _WAIT_FINISHED, _ESTABLISHED, _CLOSED = range(7)


class DtlsClient:
    """A DTLS 1.2 PSK client for one server.

    Args:
        server: the server's address (copied into `DatagramToSend` and the session).
        identity, psk: the credentials.
        connection_id: None to not offer RFC 9146; else the CID the server must put in its
            records to us (b"": we support CIDs but need none).
        extended_master_secret: offer RFC 7627.
        random_bytes: the CSPRNG.
        initial_retransmit, max_retransmit, handshake_timeout: the flight timer and deadline.
    """

    def __init__(
        self,
        server: Address,
        identity: bytes,
        psk: bytes,
        *,
        connection_id: bytes | None = None,
        extended_master_secret: bool = True,
        random_bytes: Callable[[int], bytes] = os.urandom,
        initial_retransmit: float = 1.0,
        max_retransmit: float = 60.0,
        handshake_timeout: float = 60.0,
    ) -> None:
        self.server = server
        self._identity = identity
        self._psk = psk
        self._own_cid = connection_id
        self._offer_ems = extended_master_secret
        self._random = random_bytes
        self._initial_retransmit = initial_retransmit
        self._max_retransmit = max_retransmit
        self._handshake_timeout = handshake_timeout
        self._state = _IDLE
        self._client_random = random_bytes(32)
        self._server_random = b""
        self._transcript = hashlib.sha256()
        self._ems = False
        self._peer_cid = b""
        self._master = b""
        self._send_seq = 0
        self._recv_seq = 0
        self._epoch0_seq = 0
        #: Our last flight: (content type, handshake message, protected?), re-sent with new
        #: record numbers each time (RFC 6347 §4.2.4).
        self._flight: list[tuple[int, bytes, bool]] = []
        self._reassembly: Reassembly | None = None
        self._pending: Session | None = None
        self._cookie: bytes | None = None
        self._timeout = initial_retransmit
        self._timer_at: float | None = None
        self._deadline = 0.0
        self.session: Session | None = None
        """The established session (None until `SessionEstablished`)."""
        self.records_dropped = 0

    # -- public surface ---------------------------------------------------------------------

    def connect(self, now: float) -> list[Event]:
        """Start the handshake: the first ClientHello."""
        if self._state != _IDLE:
            raise LocalProtocolError("connect() twice")
        self._state = _WAIT_HELLO
        self._deadline = now + self._handshake_timeout
        message = self._hello_message(b"")
        self._transcript = hashlib.sha256(message)
        self._flight = [(ContentType.HANDSHAKE, message, False)]
        self._timer_at = now + self._timeout
        return [DatagramToSend(self.server, self._flight_datagram())]

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        """Feed one datagram from the server. Never raises for what the server sent."""
        events: list[Event] = []
        cid_length = len(self._own_cid) if self._own_cid else 0
        records, bad = split_records(datagram, cid_length)
        self.records_dropped += bad
        for record in records:
            try:
                self._record(record, now, events)
            except DecodeError:
                self.records_dropped += 1
        return events

    def send(self, plaintext: bytes) -> bytes:
        """One protected application-data datagram for the server."""
        if self.session is None:
            raise LocalProtocolError("no established session")
        return self.session.seal(ContentType.APPLICATION_DATA, plaintext)

    def close(self) -> bytes | None:
        """close_notify for the server (None if there is no open session)."""
        session = self.session
        if session is None or session.closed:
            return None
        data = session.seal(ContentType.ALERT, alert(AlertLevel.WARNING, 0))
        session.closed = True
        self._state = _CLOSED
        return data

    def get_timer(self) -> float | None:
        return self._timer_at

    def handle_timer(self, now: float) -> list[Event]:
        if self._timer_at is None or now < self._timer_at:
            return []
        if now >= self._deadline:
            return self._give_up("handshake timed out")
        self._timeout = min(self._timeout * 2, self._max_retransmit)
        self._timer_at = min(now + self._timeout, self._deadline)
        return [DatagramToSend(self.server, self._flight_datagram())]

    # -- internals --------------------------------------------------------------------------

    def _flight_datagram(self) -> bytes:
        out = b""
        for ctype, fragment, protected in self._flight:
            if protected:
                assert self._pending is not None
                out += self._pending.seal(ctype, fragment)
            else:
                out += plaintext_record(ctype, 0, self._epoch0_seq, fragment)
                self._epoch0_seq += 1
        return out

    def _hello_message(self, cookie: bytes) -> bytes:
        extensions: list[tuple[int, bytes]] = []
        if self._offer_ems:
            extensions.append((ExtensionType.EXTENDED_MASTER_SECRET, b""))
        if self._own_cid is not None:
            extensions.append((ExtensionType.CONNECTION_ID, vec8(self._own_cid)))
        body = client_hello(self._client_random, cookie, extensions, DTLS_1_2)
        message = handshake_message(HandshakeType.CLIENT_HELLO, self._send_seq, body)
        self._send_seq += 1
        return message

    def _give_up(self, reason: str) -> list[Event]:
        self._state = _CLOSED
        self._timer_at = None
        return [HandshakeFailed(self.server, reason, self._identity)]

    def _record(self, record: Record, now: float, events: list[Event]) -> None:
        state = self._state
        if state == _ESTABLISHED:
            self._session_record(record, events)
            return
        if record.epoch == 0:
            if record.type == ContentType.HANDSHAKE and state in (_WAIT_HELLO, _WAIT_DONE):
                for fragment in split_fragments(record.fragment):
                    self._fragment(fragment, now, events)
            elif record.type == ContentType.HANDSHAKE and state in (_WAIT_CCS, _WAIT_FINISHED):
                # The server repeats its flight: ours was lost (RFC 6347 §4.2.4); once per datagram.
                if not any(isinstance(e, DatagramToSend) for e in events):
                    events.append(DatagramToSend(self.server, self._flight_datagram()))
            elif record.type == ContentType.CHANGE_CIPHER_SPEC and state == _WAIT_CCS:
                self._state = _WAIT_FINISHED
            elif record.type == ContentType.ALERT and state != _CLOSED:
                reader = Reader(record.fragment)
                level, description = reader.u8(), reader.u8()
                if level == AlertLevel.FATAL:
                    events += self._give_up(f"server alert {description}")
            else:
                raise DecodeError("unexpected plaintext record")
            return
        if state != _WAIT_FINISHED or self._pending is None:
            raise DecodeError("protected record out of place")
        ctype, data = self._pending.open(record)
        if ctype != ContentType.HANDSHAKE:
            raise DecodeError("protected non-handshake record in the handshake")
        for fragment in split_fragments(data):
            self._fragment(fragment, now, events)

    def _session_record(self, record: Record, events: list[Event]) -> None:
        session = self.session
        assert session is not None
        if record.epoch == 0:
            raise DecodeError("plaintext record on an established session")
        ctype, data = session.open(record)
        if ctype == ContentType.APPLICATION_DATA:
            events.append(ApplicationData(session, data))
        elif ctype == ContentType.ALERT:
            reader = Reader(data)
            level, description = reader.u8(), reader.u8()
            if description == AlertDescription.CLOSE_NOTIFY or level == AlertLevel.FATAL:
                session.closed = True
                self._state = _CLOSED
                events.append(SessionClosed(session, f"alert {description}"))

    def _fragment(self, fragment: Fragment, now: float, events: list[Event]) -> None:
        if fragment.msg_type == HandshakeType.HELLO_VERIFY_REQUEST and self._state == _WAIT_HELLO:
            if fragment.offset or len(fragment.body) != fragment.length:
                raise DecodeError("fragmented HelloVerifyRequest")
            cookie = parse_hello_verify_request(fragment.body)
            if cookie == self._cookie:
                return  # a duplicated HelloVerifyRequest: our ClientHello already carries it
            self._cookie = cookie
            # RFC 6347 §4.2.6: the first ClientHello and the HelloVerifyRequest are not hashed.
            message = self._hello_message(cookie)
            self._transcript = hashlib.sha256(message)
            self._recv_seq = fragment.message_seq + 1
            self._flight = [(ContentType.HANDSHAKE, message, False)]
            self._timeout = self._initial_retransmit
            self._timer_at = now + self._timeout
            events.append(DatagramToSend(self.server, self._flight_datagram()))
            return
        if fragment.message_seq != self._recv_seq:
            return  # a repeat or ahead of order: retransmission sorts it out
        if self._reassembly is None:
            self._reassembly = Reassembly(fragment)
        body = self._reassembly.add(fragment)
        if body is None:
            return
        self._reassembly = None
        self._recv_seq += 1
        message = handshake_message(fragment.msg_type, fragment.message_seq, body)
        msg_type = fragment.msg_type
        if msg_type == HandshakeType.SERVER_HELLO and self._state == _WAIT_HELLO:
            self._server_hello(body, message, events)
        elif msg_type == HandshakeType.SERVER_KEY_EXCHANGE and self._state == _WAIT_DONE:
            self._transcript.update(message)  # a PSK identity hint: not used
        elif msg_type == HandshakeType.SERVER_HELLO_DONE and self._state == _WAIT_DONE:
            self._transcript.update(message)
            self._send_final_flight(now, events)
        elif msg_type == HandshakeType.FINISHED and self._state == _WAIT_FINISHED:
            self._finished(body, events)
        else:
            raise DecodeError(f"unexpected handshake message {msg_type}")

    def _server_hello(self, body: bytes, message: bytes, events: list[Event]) -> None:
        hello = parse_server_hello(body)
        if hello.cipher_suite != TLS_PSK_WITH_AES_128_CCM_8 or hello.compression_method != 0:
            events += self._give_up("server chose another suite")
            return
        if hello.version != DTLS_1_2:
            events += self._give_up(f"server version {hello.version:#06x}")
            return
        self._server_random = hello.random
        self._ems = self._offer_ems and ExtensionType.EXTENDED_MASTER_SECRET in hello.extensions
        cid_ext = hello.extensions.get(ExtensionType.CONNECTION_ID)
        if cid_ext is not None and self._own_cid is not None:
            reader = Reader(cid_ext)
            self._peer_cid = reader.vec8()
            reader.expect_end()
        else:
            self._own_cid = None
        self._transcript.update(message)
        self._state = _WAIT_DONE

    def _send_final_flight(self, now: float, events: list[Event]) -> None:
        key_exchange = handshake_message(
            HandshakeType.CLIENT_KEY_EXCHANGE, self._send_seq, vec16(self._identity)
        )
        self._send_seq += 1
        self._transcript.update(key_exchange)
        premaster = psk_premaster(self._psk)
        if self._ems:
            self._master = extended_master_secret(premaster, self._transcript.copy().digest())
        else:
            self._master = master_secret(premaster, self._client_random, self._server_random)
        keys = key_block(self._master, self._client_random, self._server_random)
        session = Session(
            address=self.server,
            identity=self._identity,
            read_key=keys.server_key,
            read_iv=keys.server_iv,
            write_key=keys.client_key,
            write_iv=keys.client_iv,
            cid=self._own_cid or b"",
            peer_cid=self._peer_cid,
            write_seq=0,
            last_flight=None,
        )
        ours = verify_data(self._master, b"client finished", self._transcript.digest())
        finished = handshake_message(HandshakeType.FINISHED, self._send_seq, ours)
        self._send_seq += 1
        self._transcript.update(finished)
        self._flight = [
            (ContentType.HANDSHAKE, key_exchange, False),
            (ContentType.CHANGE_CIPHER_SPEC, b"\x01", False),
            (ContentType.HANDSHAKE, finished, True),
        ]
        self._pending = session
        self._state = _WAIT_CCS
        self._timeout = self._initial_retransmit
        self._timer_at = now + self._timeout
        events.append(DatagramToSend(self.server, self._flight_datagram()))

    def _finished(self, body: bytes, events: list[Event]) -> None:
        expected = verify_data(self._master, b"server finished", self._transcript.digest())
        if not hmac.compare_digest(body, expected):
            events += self._give_up("server Finished does not verify")
            return
        session = self._pending
        assert session is not None
        self.session = session
        self._pending = None
        self._state = _ESTABLISHED
        self._timer_at = None
        self._flight = []
        events.append(SessionEstablished(session))
