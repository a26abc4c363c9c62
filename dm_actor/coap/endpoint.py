"""The CoAP message layer toward one peer, sans-IO (RFC 7252 sections 4 and 5.3, RFC 7641).

`CoapEndpoint` owns, for a single peer: Message ID and token allocation, confirmable
retransmission, matching of ACKs, Resets and responses to our requests, deduplication of the
peer's messages with replay of our cached replies, automatic ACKs and Resets, and the liveness of
observations we hold. Bytes and `now` go in; events, bytes to send and the next deadline come
out. It never touches a socket, never reads a clock and draws randomness only from the injected
`random.Random`. Over TCP (`reliable=True`, RFC 8323) there are no types, Message IDs, ACKs or
deduplication; each request is written once and fails after MAX_TRANSMIT_WAIT.

It does not interpret LwM2M, reorder notifications (RFC 7641 3.4) or do block-wise transfers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dm_actor.coap import framing_tcp
from dm_actor.coap.dedup import BUSY, DedupCache
from dm_actor.coap.errors import DecodeError, LocalProtocolError
from dm_actor.coap.events import (
    Event,
    FailureReason,
    MessageRefused,
    NotificationFailed,
    NotificationReceived,
    RequestAcknowledged,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from dm_actor.coap.message import (
    Message,
    Option,
    check_options,
    decode,
    empty_ack,
    encode,
    reply_for,
    reset_for,
    sort_options,
)
from dm_actor.coap.numbers import (
    Code,
    MessageType,
    OptionNumber,
    TransmissionParameters,
    is_request,
    is_response,
)
from dm_actor.coap.reliability import Exchange, first_timeout

if TYPE_CHECKING:
    import random

# the enums' values as plain ints for the hot path (a module global reads faster than an
# enum attribute), taken from the enums rather than written out again
_CON = MessageType.CON.value
_NON = MessageType.NON.value
_ACK = MessageType.ACK.value
_RST = MessageType.RST.value
_OBSERVE = OptionNumber.OBSERVE.value
_DEFAULT_PARAMS = TransmissionParameters()


class CoapEndpoint:
    """The message layer toward one peer, over UDP datagrams or an RFC 8323 stream.

    Containers are created on first use and dropped when empty, so an idle endpoint holds
    little more than its counters.

    Args:
        params: transmission parameters (timeouts, lifetimes).
        reliable: CoAP over TCP: messages come in through `receive_message` and go out framed.
        rng: randomness for the first retransmission timeout; required when
            `params.ack_random_factor` is above 1 (share one among endpoints).
        mid_start: the first Message ID to allocate.
        token_seed: the first token is this number as 4 big-endian bytes; then +1 each.
        token_prefix: put before every token this endpoint makes (cluster mode: the device's
            slot, `dm_actor.cluster.slots.token_prefix`); at most 4 bytes.
        dedup_limit: the most peer Message IDs remembered for deduplication.

    Raises:
        ValueError: a random factor above 1 without an rng, or a dedup limit below 1.
    """

    __slots__ = (
        "_by_mid",
        "_by_token",
        "_dedup",
        "_events",
        "_mid",
        "_observations",
        "_out",
        "_token_n",
        "_token_prefix",
        "dedup_limit",
        "params",
        "reliable",
        "rng",
    )

    def __init__(
        self,
        params: TransmissionParameters = _DEFAULT_PARAMS,
        *,
        reliable: bool = False,
        rng: random.Random | None = None,
        mid_start: int = 0,
        token_seed: int = 0,
        dedup_limit: int = 64,
        token_prefix: bytes = b"",
    ) -> None:
        if params.ack_random_factor != 1.0 and rng is None and not reliable:
            raise ValueError("ack_random_factor > 1 needs an injected random.Random")
        if dedup_limit < 1:
            raise ValueError("dedup_limit must be at least 1")
        self.params = params
        self.reliable = reliable
        self.rng = rng
        self.dedup_limit = dedup_limit
        self._mid = mid_start & 0xFFFF
        self._token_n = token_seed & 0xFFFFFFFF
        self._token_prefix = token_prefix
        self._events: list[Event] | None = None
        self._out: list[bytes] | None = None
        # UDP messages of ours that an ACK or Reset may answer, by Message ID
        self._by_mid: dict[int, Exchange] | None = None
        # our requests waiting for a response, by token
        self._by_token: dict[bytes, Exchange] | None = None
        # tokens of live observations (after their first 2.xx response with Observe)
        self._observations: set[bytes] | None = None
        self._dedup: DedupCache | None = None

    # -- input ----------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Handle one UDP datagram from the peer.

        An undecodable datagram is answered as `message.reply_for` says (a Reset, 4.00 or 4.02)
        and produces no event.
        """
        try:
            msg = decode(data)
        except DecodeError as err:
            reply = reply_for(err)
            if reply is not None:
                self._send(reply)
            return
        self._receive_udp(msg, now)

    def receive_message(self, msg: Message, now: float) -> None:
        """Handle one decoded message from the peer.

        In reliable mode: a non-signalling message from the RFC 8323 stream decoder. Otherwise
        a decoded datagram, handled exactly as `receive_datagram` would.
        """
        if self.reliable:
            self._receive_stream(msg)
        else:
            self._receive_udp(msg, now)

    def peer_unreachable(self, now: float) -> None:
        """The peer's port is closed (ICMP port unreachable): every outstanding request fails
        with UNREACHABLE, and so does every unacknowledged confirmable notification.

        `now` is accepted for uniformity with the other inputs; the failure is immediate.
        """
        failed = [] if self._by_token is None else list(self._by_token.values())
        if self._by_mid is not None:
            failed += [ex for ex in self._by_mid.values() if ex.notification]
        self._by_mid = self._by_token = None
        for ex in failed:
            self._fail(ex, FailureReason.UNREACHABLE)

    def handle_timer(self, now: float) -> tuple[int, int]:
        """Retransmit or fail every exchange whose deadline is at or before `now`; how many
        were retransmitted and how many timed out (for the server's counters)."""
        due = []
        if self._by_token is not None:
            due += [ex for ex in self._by_token.values() if ex.deadline <= now]
        if self._by_mid is not None:
            due += [ex for ex in self._by_mid.values() if ex.notification and ex.deadline <= now]
        retransmitted = 0
        for ex in due:
            if ex.expire(now):
                self._send(ex.datagram)
                retransmitted += 1
            else:
                self._forget(ex)
                self._fail(ex, FailureReason.TIMEOUT)
        return retransmitted, len(due) - retransmitted

    # -- commands -------------------------------------------------------------------------

    def send_request(
        self,
        code: int,
        options: tuple[Option, ...],
        payload: bytes,
        now: float,
        *,
        confirmable: bool = True,
        observe: bool = False,
        mid: int | None = None,
        token: bytes | None = None,
    ) -> bytes:
        """Send a request; its outcome arrives later as an event carrying the returned token.

        Args:
            code: a request code (GET, POST, ...).
            options: sorted `(number, raw value)` options.
            payload: the request body.
            now: the current time (the first send).
            confirmable: CON (retransmitted until ACKed) or NON (over TCP: ignored).
            observe: add Observe=0 (unless `options` has Observe) and keep the observation
                live after a 2.xx response with Observe.
            mid: force the Message ID (UDP), e.g. to resend an exchange after a restart.
            token: force the token; it may equal a live observation's (to cancel it with
                Observe=1, RFC 7641 3.6) but not another outstanding request's.

        Returns:
            The request's token.

        Raises:
            LocalProtocolError: not a request code, or the forced token or Message ID is in use.
        """
        if not is_request(code):
            raise LocalProtocolError(f"code {code} is not a request code")
        by_token = self._by_token
        if token is None:
            token = self._new_token()
        elif by_token is not None and token in by_token:
            raise LocalProtocolError(f"token {token.hex()} belongs to an outstanding request")
        if observe and all(n != _OBSERVE for n, _ in options):
            options = sort_options((*options, (_OBSERVE, b"")))
        params = self.params
        if self.reliable:
            ex = Exchange(token, 0, b"", now, params.max_transmit_wait, 0, observe=observe)
            self._send(framing_tcp.encode(Message(0, code, 0, token, options, payload)))
        else:
            by_mid = self._by_mid
            if mid is None:
                mid = self._new_mid()
            elif by_mid is not None and mid in by_mid:
                raise LocalProtocolError(f"message ID {mid} is outstanding")
            if confirmable:
                datagram = encode(Message(_CON, code, mid, token, options, payload))
                timeout = first_timeout(params, self.rng)
                ex = Exchange(
                    token, mid, datagram, now, timeout, params.max_retransmit, observe=observe
                )
            else:
                datagram = encode(Message(_NON, code, mid, token, options, payload))
                ex = Exchange(token, mid, b"", now, params.max_transmit_wait, 0, observe=observe)
            if by_mid is None:
                self._by_mid = {mid: ex}
            else:
                by_mid[mid] = ex
            self._send(datagram)
        if by_token is None:
            self._by_token = {token: ex}
        else:
            by_token[token] = ex
        return token

    def respond(
        self,
        request: Message,
        code: int,
        options: tuple[Option, ...],
        payload: bytes,
        now: float,
    ) -> None:
        """Answer a request from the peer.

        A CON request gets a piggybacked response (an ACK with its Message ID and token), which
        is remembered so a duplicate request is answered again; a NON request gets a NON
        response with a new Message ID; over TCP the response is written once. `now` is
        accepted for uniformity with the other commands.

        Raises:
            LocalProtocolError: `request` is not a request, `code` is not a response code, or
                the CON request was already answered.
        """
        if not is_request(request.code) or not is_response(code):
            raise LocalProtocolError("respond() answers a request with a response code")
        if self.reliable:
            self._send(framing_tcp.encode(Message(0, code, 0, request.token, options, payload)))
            return
        if request.mtype == _CON:
            dedup = self._dedup
            if dedup is not None and dedup.reply(request.mid) is not None:
                raise LocalProtocolError(f"request {request.mid} was already answered")
            reply = encode(Message(_ACK, code, request.mid, request.token, options, payload))
            if dedup is not None:
                dedup.answer(request.mid, reply)
        else:
            reply = encode(Message(_NON, code, self._new_mid(), request.token, options, payload))
            if self._dedup is not None:
                self._dedup.answer(request.mid, b"")  # a duplicate NON is not answered again
        self._send(reply)

    def discard_unsent(self) -> None:
        """Drop what waits to be taken out: the transport it was meant for is gone (its
        exchanges fail with `peer_unreachable`; nothing of it may reach a new connection)."""
        self._out = None

    def rebase_unsent(self, now: float) -> None:
        """Our confirmable requests still waiting to be taken out (their sender held them
        back, e.g. until the store made their Message ID durable) are timed from `now`, the
        moment they really leave: their first retransmission comes ACK_TIMEOUT after it
        (RFC 7252 4.2), not at once. Call it just before `datagrams_to_send`."""
        out, by_mid = self._out, self._by_mid
        if not out or not by_mid:
            return
        waiting = {id(d) for d in out}
        for ex in by_mid.values():
            if ex.first_send < now and id(ex.datagram) in waiting and ex.datagram:
                ex.deadline += now - ex.first_send
                ex.first_send = now

    def answered(self, request: Message) -> bool:
        """True when a CON `request` from the peer was answered already (its Message ID is
        remembered with our reply); a request processed twice must not be answered twice."""
        dedup = self._dedup
        return (
            not self.reliable
            and request.mtype == _CON
            and dedup is not None
            and dedup.reply(request.mid) is not None
        )

    def notify(
        self,
        token: bytes,
        code: int,
        options: tuple[Option, ...],
        payload: bytes,
        now: float,
        *,
        confirmable: bool = False,
    ) -> None:
        """Send a notification on an observation the peer holds with `token` (RFC 7641 4.2).

        The caller puts the Observe sequence number in `options`. A confirmable notification
        is retransmitted until ACKed; a Reset or a timeout gives `NotificationFailed`. A
        non-confirmable one is fire-and-forget: a Reset to it is not reported.

        Raises:
            LocalProtocolError: `code` is not a response code.
        """
        if not is_response(code):
            raise LocalProtocolError(f"code {code} is not a response code")
        if self.reliable:
            self._send(framing_tcp.encode(Message(0, code, 0, token, options, payload)))
            return
        mid = self._new_mid()
        if confirmable:
            datagram = encode(Message(_CON, code, mid, token, options, payload))
            timeout = first_timeout(self.params, self.rng)
            ex = Exchange(
                token, mid, datagram, now, timeout, self.params.max_retransmit, notification=True
            )
            if self._by_mid is None:
                self._by_mid = {mid: ex}
            else:
                self._by_mid[mid] = ex
        else:
            datagram = encode(Message(_NON, code, mid, token, options, payload))
        self._send(datagram)

    def abandon(self, token: bytes) -> None:
        """Forget our outstanding request `token` without an event: it is not retransmitted,
        and a late answer to it is treated as unknown (Reset for a CON)."""
        by_token = self._by_token
        ex = None if by_token is None else by_token.get(token)
        if ex is not None:
            self._forget(ex)

    def cancel_observation(self, token: bytes) -> None:
        """Forget the observation `token`: later notifications on it are answered with Reset."""
        observations = self._observations
        if observations is not None:
            observations.discard(token)
            if not observations:
                self._observations = None

    # -- output ---------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, oldest first, or None."""
        events = self._events
        if events is None:
            return None
        event = events.pop(0)
        if not events:
            self._events = None
        return event

    def replies_to_send(self) -> list[bytes]:
        """Take out the datagrams (or TCP frames) ready to go that answer the peer: ACKs,
        Resets, responses (a NON request's NON response too); our own requests stay for
        `datagrams_to_send`."""
        out = self._out
        if out is None:
            return []
        if self.reliable:  # frames: a response's code is 2.xx-5.xx
            replies = [d for d in out if framing_tcp.frame_code(d) >= 64]
        else:  # datagrams: type 2 (ACK) or 3 (Reset), or a NON (type 1) with a response code
            replies = [d for d in out if d[0] & 0x20 or (d[0] & 0x30 == 0x10 and d[1] >= 64)]
        if replies:
            self._out = [d for d in out if d not in replies] or None
        return replies

    def datagrams_to_send(self) -> list[bytes]:
        """Everything to write to the peer, in order: datagrams, or RFC 8323 frames over TCP."""
        out = self._out
        if out is None:
            return []
        self._out = None
        return out

    def get_timer(self) -> float | None:
        """The earliest deadline to call `handle_timer` at; None when nothing is outstanding."""
        deadline: float | None = None
        if self._by_token is not None:
            deadline = min(ex.deadline for ex in self._by_token.values())
        if self._by_mid is not None:
            mid_deadline = min(ex.deadline for ex in self._by_mid.values())
            if deadline is None or mid_deadline < deadline:
                deadline = mid_deadline
        return deadline

    def has_observation(self, token: bytes) -> bool:
        """Whether `token` is a live observation of ours."""
        return self._observations is not None and token in self._observations

    # -- internals ------------------------------------------------------------------------

    def _receive_udp(self, msg: Message, now: float) -> None:
        mtype = msg.mtype
        if mtype >= _ACK:
            self._receive_ack_or_reset(msg)
            return
        c = msg.code
        if not c:
            if mtype == _CON:
                self._send(reset_for(msg.mid))  # CoAP ping (RFC 7252 4.3)
            return
        dedup = self._dedup
        if dedup is None:
            dedup = self._dedup = DedupCache(self.dedup_limit)
        params = self.params
        lifetime = params.exchange_lifetime if mtype == _CON else params.non_lifetime
        entry = dedup.seen(msg.mid, now, lifetime)
        if entry is BUSY:
            self._event(MessageRefused(msg.mid))
            return
        if entry is not None:
            if entry[1]:
                self._send(entry[1])
            return
        try:
            check_options(msg)
        except DecodeError as err:
            reply = reply_for(err)
            dedup.answer(msg.mid, b"" if reply is None else reply)
            if reply is not None:
                self._send(reply)
            return
        if is_request(c):
            self._event(RequestReceived(msg))  # in process until `respond`
            return
        # a separate response or a notification (decode admits no other code classes)
        if self._match_response(msg):
            if mtype != _CON:
                dedup.answer(msg.mid, b"")  # handled; nothing to send again
                return
            reply = empty_ack(msg.mid)
        else:
            reply = reset_for(msg.mid)  # unknown token, CON or NON (RFC 7641 3.6)
        dedup.answer(msg.mid, reply)
        self._send(reply)

    def _receive_ack_or_reset(self, msg: Message) -> None:
        by_mid = self._by_mid
        ex = None if by_mid is None else by_mid.get(msg.mid)
        if ex is None:
            return
        c = msg.code
        if msg.mtype == _RST:
            if not c:
                self._forget(ex)
                self._fail(ex, FailureReason.RESET)
            return
        if not ex.datagram:
            return  # nobody ACKs a NON message
        if not c:
            if ex.notification:
                self._forget(ex)
                return
            self._forget_mid(ex.mid)
            ex.acknowledge(self.params)
            self._event(RequestAcknowledged(ex.token))
            return
        if ex.notification or msg.token != ex.token or not is_response(c):
            return
        try:
            check_options(msg)
        except DecodeError:
            return  # RFC 7252 5.4.1: reject the piggybacked response; the request goes on
        self._complete(ex, msg)

    def _receive_stream(self, msg: Message) -> None:
        c = msg.code
        try:
            check_options(msg)
        except DecodeError:
            if is_request(c):
                bad = Message(0, Code.BAD_OPTION, 0, msg.token)
                self._send(framing_tcp.encode(bad))
            return
        if is_request(c):
            self._event(RequestReceived(msg))
        elif is_response(c):
            self._match_response(msg)  # an unknown token is ignored: TCP has no Reset

    def _match_response(self, msg: Message) -> bool:
        """Deliver a response that came on its own (not piggybacked); False if unknown."""
        token = msg.token
        by_token = self._by_token
        ex = None if by_token is None else by_token.get(token)
        if ex is not None:
            self._complete(ex, msg)
            return True
        observations = self._observations
        if observations is None or token not in observations:
            return False
        if msg.code >> 5 != 2 or msg.option(_OBSERVE) is None:
            self.cancel_observation(token)
        self._event(NotificationReceived(token, msg))
        return True

    def _complete(self, ex: Exchange, response: Message) -> None:
        self._forget(ex)
        token = ex.token
        if ex.observe and response.code >> 5 == 2 and response.option(_OBSERVE) is not None:
            if self._observations is None:
                self._observations = {token}
            else:
                self._observations.add(token)
        else:
            self.cancel_observation(token)  # a cancelling GET or a refused re-registration
        self._event(ResponseReceived(token, response))

    def _fail(self, ex: Exchange, reason: FailureReason) -> None:
        if ex.notification:
            self._event(NotificationFailed(ex.token, reason))
        else:
            self._event(RequestFailed(ex.token, reason))

    def _forget(self, ex: Exchange) -> None:
        """Drop an exchange from both tables (a no-op for tables it is no longer in)."""
        by_mid = self._by_mid
        if by_mid is not None and by_mid.get(ex.mid) is ex:
            self._forget_mid(ex.mid)
        by_token = self._by_token
        if by_token is not None and by_token.get(ex.token) is ex:
            del by_token[ex.token]
            if not by_token:
                self._by_token = None

    def _forget_mid(self, mid: int) -> None:
        by_mid = self._by_mid
        assert by_mid is not None
        del by_mid[mid]
        if not by_mid:
            self._by_mid = None

    def next_mid(self) -> int:
        """Allocate a Message ID for a request the caller will send with `send_request(mid=)`."""
        return self._new_mid()

    def next_token(self) -> bytes:
        """Allocate a token for a request the caller will send with `send_request(token=)`
        (e.g. once it has stored it)."""
        return self._new_token()

    def _new_mid(self) -> int:
        mid = self._mid
        by_mid = self._by_mid
        while by_mid is not None and mid in by_mid:
            mid = (mid + 1) & 0xFFFF
        self._mid = (mid + 1) & 0xFFFF
        return mid

    def _new_token(self) -> bytes:
        n = self._token_n
        by_token = self._by_token
        observations = self._observations
        while True:
            token = self._token_prefix + n.to_bytes(4, "big")
            n = (n + 1) & 0xFFFFFFFF
            if not (
                (by_token is not None and token in by_token)
                or (observations is not None and token in observations)
            ):
                break
        self._token_n = n
        return token

    def _send(self, data: bytes) -> None:
        out = self._out
        if out is None:
            self._out = [data]
        else:
            out.append(data)

    def _event(self, event: Event) -> None:
        events = self._events
        if events is None:
            self._events = [event]
        else:
            events.append(event)
