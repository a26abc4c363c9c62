"""The device actor: one Trio task that owns everything about one registered device.

It owns the device's registration, its `DeviceQueue` (delivery decisions), its `CoapEndpoint`
(message layer), its observations and a small cache of fresh values. Other tasks reach it
through its mailbox (`tell`), or through the supervisor's synchronous calls, which never
await: `submit`'s `start_now`/`flush`, and `connection_lost`/`transport_lost` when its
transport goes away (handled at once, so a reconnect is never confused with the old
connection). The loop is short: wait for mail or the CoAP timer, feed everything to the
sans-IO machines, send what they decided, once the store holds what must be durable first.
It holds no timer while idle.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio

from dm_actor.actors.mailbox import Mailbox
from dm_actor.coap.blockwise import (
    Ask,
    Block,
    Block2Assembler,
    Complete,
    Failed,
    get_block,
    get_size,
)
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.events import (
    MessageRefused,
    NotificationReceived,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from dm_actor.coap.message import Message, Option, query_options, uint_bytes
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.coap.observe import NotificationOrder
from dm_actor.delivery.outcomes import INCOMPLETE, Outcome, from_response
from dm_actor.delivery.queue import Command, DeviceQueue, Failure
from dm_actor.lwm2m import path as lwm2m_path
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from dm_actor.actors.supervisor import Supervisor
    from dm_actor.lwm2m.registration import Registration

log = logging.getLogger(__name__)

#: A UDP peer's socket address, as the transport reports it.
Address = tuple[Any, ...]


class TcpConnection(Protocol):
    """What the actors need of a CoAP-over-TCP connection (the transport provides it)."""

    @property
    def peer(self) -> Address: ...

    def send_frame_nowait(self, frame: bytes) -> None: ...


_METHODS = {"GET": Code.GET.value, "PUT": Code.PUT.value, "POST": Code.POST.value,
            "DELETE": Code.DELETE.value}  # fmt: skip
_CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
_ACCEPT = OptionNumber.ACCEPT.value
_BLOCK2 = OptionNumber.BLOCK2.value
_ETAG = OptionNumber.ETAG.value
_SIZE2 = OptionNumber.SIZE2.value
_BLOCK_SZX = 6  # ask for blocks of at most 1024 bytes
_RST = 3
_CACHE_LIMIT = 8
#: Message IDs are reserved in the store this many at a time (one write per block), so that
#: after a restart a device's new requests start past every MID the old process may have
#: sent it: a reused MID would be answered from the device's deduplication cache.
MID_BLOCK = 256


def _related(a: str, b: str) -> bool:
    """Whether one of two paths contains the other (`/3/0` and `/3/0/1`)."""
    return a.startswith(b + "/") or b.startswith(a + "/")


class Signal(enum.Enum):
    """Mail that is not a message from the device."""

    WAKE = "wake"  # something was submitted: try to deliver
    SWEEP = "sweep"  # finish expired commands (rule 5.2)
    UNREACHABLE = "unreachable"  # ICMP port-unreachable for a datagram we sent
    EXPIRED = "expired"  # the registration's lifetime ran out (rule 8.3)


Mail = bytes | Message | Signal


class _Transfer:
    """A body that arrives in blocks (RFC 7959 2.4): the answer to the attempt in flight, or
    a notification (RFC 7959 2.6) whose rest is fetched with GETs."""

    __slots__ = ("assembler", "first", "token", "uri")

    def __init__(self, first: Message, uri: str = "") -> None:
        self.assembler = Block2Assembler(szx=_BLOCK_SZX)
        self.first = first  # the first block's response: its code, Observe, Content-Format
        self.token = b""  # the exchange that asked for the latest block
        self.uri = uri  # a notification's observed path (its observation's token: `first`)

    def feed(self, response: Message) -> Complete | Ask | Failed:
        """Take one response; an error answer to a later block fails the transfer."""
        code = response.code
        if code >> 5 != 2 and response is not self.first:
            return Failed(f"a later block was answered {code >> 5}.{code & 31:02d}")
        try:
            block = get_block(response, _BLOCK2)
        except DecodeError as exc:
            return Failed(str(exc))
        etag, size2 = response.option(_ETAG), get_size(response, _SIZE2)
        return self.assembler.feed(block, response.payload, etag, size2)


class DeviceActor:
    """One registered device. Create it with the supervisor; run `run()` in its nursery."""

    __slots__ = (
        "_cache",
        "_fetches",
        "_hold",
        "_mid_limit",
        "_observations",
        "_pending",
        "_stepping",
        "_transfer",
        "addr",
        "coap",
        "conn",
        "mailbox",
        "queue",
        "reg",
        "subscriptions",
        "sup",
    )

    def __init__(
        self,
        sup: Supervisor,
        reg: Registration,
        queue: DeviceQueue,
        addr: Address | None,
        conn: TcpConnection | None,
    ) -> None:
        self.sup = sup
        self.reg = reg
        self.queue = queue
        self.addr = addr
        self.conn = conn
        self.coap = sup.new_coap_endpoint(reliable=conn is not None)
        self.mailbox: Mailbox[Mail] = Mailbox(sup.mailbox_size)
        self.subscriptions: dict[str, set[str]] | None = None  # path -> owners
        self._observations: dict[bytes, tuple[str, NotificationOrder]] | None = None
        self._cache: dict[str, tuple[float, Outcome]] | None = None
        # the store mark an attempt's Message ID and token were written at: nothing is sent
        # to the device until that write is durable, so a restart can resend the same
        # exchange (exactly once across a crash)
        self._hold: int | None = None
        self._pending: Command | None = None  # that attempt: decided and stored, not yet sent
        self._mid_limit: int | None = None  # the first Message ID not reserved in the store
        self._transfer: _Transfer | None = None
        self._stepping = False  # in `step`: a drain from inside it (a rebinding) waits
        # notifications whose rest is being fetched, by the fetching exchange's token
        self._fetches: dict[bytes, tuple[bytes, _Transfer]] | None = None

    @property
    def endpoint(self) -> str:
        return self.reg.endpoint

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the registration ends (De-register, lifetime expiry) or shutdown.

        The crash boundary: any exception but a store failure (a `DecodeError` or
        `Lwm2mError` the device's bytes caused, or a bug they reached) ends this device's
        registration, never the server (`Supervisor.contain`).
        """
        try:
            await self._serve()
        except StoreError:
            raise
        except Exception as exc:
            self.sup.contain(self, exc, "its input")

    async def _serve(self) -> None:
        mailbox = self.mailbox
        store = self.sup.store
        self.pump(trio.current_time())  # pre-subscriptions, restored commands
        while not mailbox.closed:
            if self._hold is not None:
                await store.durable(self._hold)
                self.flush(trio.current_time())
            timer = self.coap.get_timer()  # not cached: a new transport replaces the endpoint
            if timer is None:
                await mailbox.wait()
            else:
                with trio.move_on_at(timer):
                    await mailbox.wait()
            self.step(trio.current_time())

    def step(self, now: float, *, start: bool = True) -> None:
        """Feed everything that arrived to the machines and act on their decisions (and
        start the next attempt, if `start` and the rules allow).

        Not re-entrant: a drain asked for while this actor's own step runs (its mail made
        the supervisor rebind it or take its address) returns at once; the step it
        interrupted goes on, and hands what is no longer its own to the new owner."""
        if self._stepping:
            return
        self._stepping = True
        try:
            self._step(now, start)
        finally:
            self._stepping = False

    def _step(self, now: float, start: bool) -> None:
        coap = self.coap
        timer = coap.get_timer()
        if timer is not None and timer <= now:
            coap.handle_timer(now)
            self._handle_events(now)
        contact = False
        # where the mail came from (see `Supervisor._bind`): every datagram from `addr`,
        # every message on `conn`
        addr, conn = self.addr, self.conn
        for mail in self.mailbox.take():
            # each message is handled before the next is read, as it would be alone: a burst
            # read in one step must not fill the deduplication window with requests whose
            # answers are only one call away
            if self.mailbox.closed:
                # the registration ended with an earlier message (a De-register, expiry):
                # the rest is not this device's to answer (an Update now gets 4.04)
                if type(mail) is bytes and addr is not None:
                    self.sup.on_datagram(mail, addr)
                elif isinstance(mail, Message) and conn is not None:
                    self._hand_on(conn, mail)
                continue
            if type(mail) is bytes and addr is not None and self.addr != addr:
                # another endpoint registered from this address while its mail was read: the
                # rest is the address's new owner's (or a new peer's)
                self.sup.on_datagram(mail, addr)
                continue
            if isinstance(mail, Message) and conn is not None and self.conn is not conn:
                self._hand_on(conn, mail)  # (the same, for a connection taken)
                continue
            if type(mail) is bytes:
                # any message but a Reset is a contact (a Reset fails the attempt, rule 3.4)
                if len(mail) > 0 and (mail[0] >> 4) & 3 != _RST:
                    contact = True
                    self.queue.contact(now)
                self.coap.receive_datagram(mail, now)
            elif isinstance(mail, Message):
                contact = True
                self.queue.contact(now)
                self.coap.receive_message(mail, now)
            elif mail is Signal.SWEEP:
                self.queue.sweep(now)
            elif mail is Signal.UNREACHABLE:
                self.coap.peer_unreachable(now)
                self._fail_pending(now)
            elif (
                mail is Signal.EXPIRED  # (an Update read before it may have renewed it)
                and self.reg.expires_at(self.sup.registration_grace) <= now
            ):
                self.end(now, expired=True)
            self._handle_events(now)
        self.pump(now, on_contact=contact, start=start)

    def _hand_on(self, conn: TcpConnection, msg: Message) -> None:
        """Give a message read on `conn` to the supervisor to route anew; if its new owner's
        mailbox is full it is lost (its reader already handed it over): counted."""
        if self.sup.on_tcp_message(conn, msg) is not None:
            self.sup.statistics["mailbox_overloaded"] += 1

    def tell(self, mail: Mail) -> None:
        """Queue mail for the actor (raises `Overloaded` when the mailbox is full)."""
        self.mailbox.put(mail)

    # -- decisions ------------------------------------------------------------------------

    def pump(self, now: float, *, on_contact: bool = False, start: bool = True) -> bool:
        """Start the next attempt if the rules allow, publish what finished, send what may go.

        Returns:
            True when an attempt started. It is sent (and anything after it) once the store
            says its Message ID and token are durable: `flush` then, or the task does when
            it next waits.
        """
        queue = self.queue
        started = False
        if start and queue.queue and (self.conn is not None or self.addr):
            cmd = queue.next_attempt(now, on_contact=on_contact)
            if cmd is not None:
                self._start_attempt(cmd, now)
                self._hold = self.sup.store.mark()
                started = True
        for cmd, outcome in queue.take_finished():
            self.sup.command_finished(self, cmd, outcome)
        self.flush(now)
        return started

    def start_now(self, cmd: Command, now: float) -> bool:
        """`cmd` was just queued: start its attempt at once if the rules allow (see `pump`).

        The submitter calls this before its own write, so the acceptance record already
        holds the attempt's Message ID and token and one commit serves both. Once that is
        durable it calls `flush` (which sends the request), then wakes the task (which arms
        the retransmission timer, and sends the request itself if the submitter was
        cancelled first). Only an idle actor with nothing else queued (no mail, nothing held
        back) is started from outside: otherwise its task decides, in the order the mail
        arrived.

        Returns:
            True when `cmd` itself is the attempt that started.
        """
        mailbox = self.mailbox
        queue = self.queue
        if mailbox or mailbox.closed or self._hold is not None or queue.in_flight is not None:
            return False
        if len(queue.queue) != 1 or queue.queue[0] is not cmd:
            return False
        return self.pump(now) and queue.in_flight is cmd

    def flush(self, now: float) -> None:
        """Send what the endpoint has ready, unless it waits behind an attempt not yet
        durable; the attempt itself first, if it is still the one in flight."""
        hold = self._hold
        if hold is not None:
            if not self.sup.store.is_durable(hold):
                # answers to the device's own messages need no durable write: they leave now,
                # to the address they answer (the device may move before the hold clears)
                conn = self.conn
                if conn is not None:
                    for reply in self.coap.replies_to_send():
                        self.sup.send_frame(conn, reply)
                elif self.addr is not None:
                    for reply in self.coap.replies_to_send():
                        self.sup.send_datagram(reply, self.addr)
                return
            self._hold = None
        pending = self._pending  # (set only with a hold: durable once the hold is gone)
        if pending is not None and self.has_transport():  # (else it keeps its retry)
            self._pending = None
            if self.queue.in_flight is not pending:
                pass  # it ended before it could leave
            elif pending.expired(now):  # (the store took longer than the command may wait)
                self.queue.expire_unsent(now)
                for cmd, outcome in self.queue.take_finished():
                    self.sup.command_finished(self, cmd, outcome)
            else:
                self._transmit(pending, now)
        out = self.coap.datagrams_to_send()
        if not out:
            return
        conn = self.conn
        if conn is not None:
            for frame in out:
                self.sup.send_frame(conn, frame)
        elif self.addr is not None:
            for datagram in out:
                self.sup.send_datagram(datagram, self.addr)

    def cached(self, uri: str, now: float) -> Outcome | None:
        """A fresh value for a GET of `uri` (Max-Age not passed), else None."""
        cache = self._cache
        if cache is None:
            return None
        hit = cache.get(uri)
        if hit is None:
            return None
        if hit[0] <= now:
            del cache[uri]
            return None
        return hit[1]

    def _remember(self, uri: str, outcome: Outcome, now: float) -> None:
        if not outcome.max_age or outcome.status != 200:
            return
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        cache.pop(uri, None)
        cache[uri] = (now + outcome.max_age, outcome)
        if len(cache) > _CACHE_LIMIT:
            del cache[next(iter(cache))]

    def _forget_cached(self, uri: str) -> None:
        """A write, execute or delete of `uri` succeeded: values cached for it, its parents
        and its children are stale (issue 13: a GET after a PUT returned the old value)."""
        cache = self._cache
        if cache:
            for key in [k for k in cache if k == uri or _related(k, uri)]:
                del cache[key]

    def _request_options(self, cmd: Command) -> tuple[Option, ...]:
        uri, _, query = cmd.uri.partition("?")
        path = lwm2m_path.parse(uri)
        options = path.uri_path_options(self.reg.objects.alt_path)
        if query:
            options += query_options(query)
        if cmd.content_format is not None:
            options += ((_CONTENT_FORMAT, uint_bytes(cmd.content_format)),)
        if cmd.accept is not None:
            options += ((_ACCEPT, uint_bytes(cmd.accept)),)
        return options

    def _start_attempt(self, cmd: Command, now: float) -> None:
        """Decide the attempt's exchange and store it; `flush` sends it once durable."""
        coap = self.coap
        if (
            cmd.token is None
            or cmd.exchange_at is None
            or (now - cmd.exchange_at >= self.sup.resend_window)
            or (cmd.mid is None and not coap.reliable)  # decided for TCP, now over UDP
        ):
            cmd.exchange_at = now
            cmd.mid = None if coap.reliable else self._new_mid()
            cmd.token = coap.next_token()
        # else the same exchange again: same Message ID and token (see Command.mid)
        self.sup.persist_command(self.endpoint, cmd)
        self._pending = cmd

    def _transmit(self, cmd: Command, now: float) -> None:
        self.coap.send_request(
            _METHODS[cmd.method],
            tuple(sorted(self._request_options(cmd), key=lambda o: o[0])),
            cmd.payload,
            now,
            observe=cmd.observe,
            mid=cmd.mid,
            token=cmd.token,
        )

    def _fail_pending(self, now: float) -> None:
        """The device became unreachable before the stored attempt could leave: it goes
        back to the queue without using up a retry (rule 3.4)."""
        cmd = self._pending
        if cmd is not None and self.queue.in_flight is cmd:
            self._pending = None
            self.queue.attempt_not_sent()

    def _new_mid(self) -> int:
        mid = self.coap.next_mid()
        limit = self._mid_limit
        if limit is None or not 0 < (limit - mid) & 0xFFFF <= MID_BLOCK:
            limit = self._mid_limit = (mid + MID_BLOCK) & 0xFFFF
            store = self.sup.store
            store.put_next_mid(self.endpoint, limit)
            self._hold = store.mark()  # nothing with a MID of the new block before it is stored
        return mid

    def _handle_events(self, now: float) -> None:
        coap = self.coap
        while (event := coap.next_event()) is not None:
            fetches = self._fetches
            if fetches and isinstance(event, ResponseReceived | RequestFailed):
                fetch = fetches.pop(event.token, None)
                if fetch is not None:
                    if isinstance(event, ResponseReceived):
                        self._fetched(fetch[0], fetch[1], event.response, now)
                    else:
                        log.info("%s: fetching the rest of a notification of %s failed: %s",
                                 self.endpoint, fetch[1].uri, event.reason)  # fmt: skip
                    continue
            if isinstance(event, ResponseReceived):
                self._response(event.token, event.response, now)
            elif isinstance(event, NotificationReceived):
                self._notification(event.token, event.notification, now)
            elif isinstance(event, RequestFailed):
                cmd = self.queue.in_flight
                transfer = self._transfer
                if cmd is not None and (
                    cmd.token == event.token
                    or (transfer is not None and transfer.token == event.token)
                ):
                    if transfer is not None:  # a retry asks from the first block again
                        self._transfer = None
                        self._forget_observation(cmd)
                    self.queue.attempt_failed(Failure(event.reason), now)
            elif isinstance(event, RequestReceived):
                self.sup.device_request(self, event.request, now)
            elif isinstance(event, MessageRefused):
                self.sup.statistics["messages_refused"] += 1
            # RequestAcknowledged: the separate response will follow; nothing to do.

    def _response(self, token: bytes, response: Message, now: float) -> None:
        cmd = self.queue.in_flight
        if cmd is None:
            return
        transfer = self._transfer
        if token != cmd.token and (transfer is None or token != transfer.token):
            return
        if transfer is not None or response.option(_BLOCK2) is not None:
            whole = self._reassemble(cmd, response, now)
            if whole is None:
                return  # the next block was asked for, or the transfer failed
            response = whole
            if cmd.token is not None:
                token = cmd.token  # the observation (if any) is the first exchange's
        outcome = from_response(
            response.code, response.payload, response.content_format, response.max_age
        )
        self.queue.attempt_succeeded(outcome, now)
        uri = cmd.uri
        if cmd.observe:
            if outcome.status == 200 and response.observe is not None:
                observations = self._observations
                if observations is None:
                    observations = self._observations = {}
                order = NotificationOrder()
                order.accept(response.observe, now)
                observations[token] = (uri, order)
                self.sup.notification(self, uri, outcome)
            else:
                log.info("%s refused to be observed on %s: %d", self.endpoint, uri, outcome.status)
        if cmd.method == "GET" and "?" not in uri and cmd.accept is None:
            # (only what a request without Accept got is served again from the cache: the
            # cache is looked up for those alone, and a TLV answer is not a text one)
            self._remember(uri, outcome, now)
        elif cmd.method != "GET" and outcome.status < 300:
            self._forget_cached(uri.partition("?")[0])

    def _reassemble(self, cmd: Command, response: Message, now: float) -> Message | None:
        """Feed one block of the answer; the whole answer once the last block arrived.

        The next block is asked for with the same request plus Block2, as a new exchange
        (its Message ID and token are the transfer's, not the command's: a retry after a
        crash resends the command's first exchange, whose answer the device has cached).
        A transfer the device breaks (wrong offsets, a changing body, an error on a later
        block, a body over 1 MiB) ends the command with 502 BLOCKWISE_TRANSFER_FAILED.
        """
        transfer = self._transfer
        if transfer is None:
            transfer = self._transfer = _Transfer(response)
        step = transfer.feed(response)
        if isinstance(step, Ask):
            transfer.token = self._ask_block(cmd, step.block, now)
            return None
        self._transfer = None
        if isinstance(step, Complete):
            return transfer.first._replace(payload=step.body)
        self.sup.statistics["blockwise_failures"] += 1  # (summed up once a minute)
        log.debug("%s: block-wise answer to %s failed: %s", self.endpoint, cmd.uri, step.reason)
        self._forget_observation(cmd)
        self.queue.attempt_succeeded(INCOMPLETE, now)
        return None

    def _forget_observation(self, cmd: Command) -> None:
        """An Observe whose first answer never came whole: the endpoint may already hold the
        observation (the first block had Observe); drop it, or it would stay live unseen."""
        if cmd.observe and cmd.token is not None:
            self.coap.cancel_observation(cmd.token)

    def _ask_block(self, cmd: Command, block: Block, now: float) -> bytes:
        """The next block of the answer to `cmd`: the same request with Block2 and, as in
        RFC 7959's examples, without the request's body (a POST is not sent again whole)."""
        options = self._request_options(cmd)
        if cmd.payload:
            options = tuple(o for o in options if o[0] != _CONTENT_FORMAT)
        return self._send_block_request(_METHODS[cmd.method], options, block, now)

    def _send_block_request(
        self, code: int, options: tuple[Option, ...], block: Block, now: float
    ) -> bytes:
        coap = self.coap
        return coap.send_request(
            code,
            tuple(sorted((*options, block.option(_BLOCK2)), key=lambda o: o[0])),
            b"",
            now,
            mid=None if coap.reliable else self._new_mid(),
        )

    def _fetch_rest(self, observation: bytes, uri: str, message: Message, now: float) -> None:
        """A notification came in blocks: fetch the rest with GETs (RFC 7959 2.6) and notify
        the whole value then. A newer notification of the same path replaces the fetch."""
        fetches = self._fetches
        if fetches is None:
            fetches = self._fetches = {}
        if len(fetches) >= _CACHE_LIMIT:
            oldest = next(iter(fetches))
            gone = fetches.pop(oldest)
            self.coap.abandon(oldest)  # (its GET stops too: no retransmissions for nothing)
            log.info("%s: too many notifications in blocks: %s not completed", self.endpoint,
                     gone[1].uri)  # fmt: skip
        self._fetched(observation, _Transfer(message, uri), message, now)

    def _drop_fetches(self, observation: bytes) -> None:
        """A newer notification (or the observation's end) makes a fetch of an older one
        pointless: it must never be notified after the newer value."""
        fetches = self._fetches
        if fetches:
            for token, (obs, _) in list(fetches.items()):
                if obs == observation:
                    del fetches[token]
                    self.coap.abandon(token)  # its GET is not sent again

    def _fetched(
        self, observation: bytes, transfer: _Transfer, response: Message, now: float
    ) -> None:
        step = transfer.feed(response)
        uri = transfer.uri
        if isinstance(step, Ask):
            options = lwm2m_path.parse(uri).uri_path_options(self.reg.objects.alt_path)
            token = self._send_block_request(_METHODS["GET"], options, step.block, now)
            fetches = self._fetches
            assert fetches is not None
            fetches[token] = (observation, transfer)
            return
        if isinstance(step, Failed):
            self.sup.statistics["blockwise_failures"] += 1
            log.debug("%s: a notification of %s in blocks failed: %s", self.endpoint, uri,
                        step.reason)  # fmt: skip
            return
        first = transfer.first
        outcome = from_response(first.code, step.body, first.content_format, first.max_age)
        self._remember(uri, outcome, now)
        self.sup.notification(self, uri, outcome)

    def _notification(self, token: bytes, message: Message, now: float) -> None:
        observations = self._observations
        entry = None if observations is None else observations.get(token)
        if entry is None:
            return
        uri, order = entry
        seq = message.observe
        if seq is not None and not self.conn and not order.accept(seq, now):
            return  # stale (RFC 7641 3.4, rule 9.5)
        outcome = from_response(
            message.code, message.payload, message.content_format, message.max_age
        )
        if outcome.status != 200 or seq is None:
            assert observations is not None
            del observations[token]
        self._drop_fetches(token)  # this one is newer than any being fetched
        if message.option(_BLOCK2) is not None and outcome.status == 200:
            self._fetch_rest(token, uri, message, now)  # never notify or cache a part
            return
        self._remember(uri, outcome, now)
        self.sup.notification(self, uri, outcome)

    def connection_lost(self, now: float) -> None:
        """The TCP connection closed. The supervisor calls this at once, before a reconnect
        can be bound, so nothing of it can be mistaken for the new connection's: what
        arrived on it is handled first, what was sent on it fails (rule 3.4), the device is
        unreachable until its next contact, and its observations die with the connection
        (RFC 8323) and are made again then."""
        self.conn = None  # first: nothing may start on (or be answered over) the closed one
        self.drain(now)
        if self.mailbox.closed or self.has_transport():
            return  # (ended, or its last mail bound it anew)
        self.queue.disconnected()
        self.transport_lost(now)

    def drain(self, now: float) -> None:
        """Handle the mail that came before the transport changed (outside the task: the
        supervisor calls it when a connection closes or is replaced, or the address moves);
        no attempt starts on the transport that is going away."""
        try:
            self.step(now, start=False)
        except StoreError:
            raise
        except Exception as exc:  # as in `run`
            self.sup.contain(self, exc, "its input")

    def has_transport(self) -> bool:
        return self.conn is not None or self.addr is not None

    def transport_lost(self, now: float) -> None:
        """The connection requests were sent on is gone (closed, or replaced by another
        connection or by UDP): they fail now (rule 3.4), an attempt not yet sent waits for
        the next transport, and observations are made again (RFC 8323: they die with it)."""
        self.coap.peer_unreachable(now)
        self._fail_pending(now)
        self._fetches = None
        self._handle_events(now)
        if self._observations:
            self.forget_observations()
            self.sup.observe_again(self, now)
        self.pump(now)

    def abandon_attempt(self, now: float) -> None:
        """The transport changed under an attempt in flight: it can no longer succeed (one
        not yet sent keeps its retry, rule 3.4)."""
        pending, self._pending = self._pending, None
        self._transfer = None
        self._fetches = None
        in_flight = self.queue.in_flight
        if in_flight is not None:
            if in_flight is pending:
                self.queue.attempt_not_sent()
            else:
                self.queue.attempt_failed(Failure.UNREACHABLE, now)

    # -- observations ---------------------------------------------------------------------

    def observed_paths(self) -> set[str]:
        if self._observations is None:
            return set()
        return {uri for uri, _ in self._observations.values()}

    def cancel_observation(self, uri: str) -> None:
        observations = self._observations
        if observations is None:
            return
        for token, (observed, _) in list(observations.items()):
            if observed == uri:
                del observations[token]
                self.coap.cancel_observation(token)
                self._drop_fetches(token)

    def forget_observations(self) -> None:
        """The device re-registered: its observations are gone (rule 9.3)."""
        if self._observations is not None:
            for token in self._observations:
                self.coap.cancel_observation(token)
            self._observations = None
        for token in self._fetches or ():
            self.coap.abandon(token)
        self._fetches = None

    # -- the end --------------------------------------------------------------------------

    def end(self, now: float, *, expired: bool) -> None:
        """The registration ended: finish every command (rules 8.2, 8.3) and stop."""
        self.queue.remove_all(now)
        for cmd, outcome in self.queue.take_finished():
            self.sup.command_finished(self, cmd, outcome)
        self.flush(now)
        self.mailbox.close()
        self.sup.device_ended(self, expired=expired)
