"""The device machine: every decision about one registered device, sans-IO.

`DeviceMachine` owns, for one registration: its `DeviceQueue` (the delivery rules), its
`CoapEndpoint` (the message layer), the attempt in flight and the transport under it (the
tables of `device/attempt.py`), block-wise answers and the fetching of notifications that
came in blocks, observations and their ordering, the fresh-value cache, and the
reservation of Message IDs in the store. aioquic's shape one layer up: inputs are method
calls with `now`; what to do comes out of `effects()` in order (send, store, hold until
durable, publish); `get_timer()` says when to call `handle_timer`. It never reads a clock,
never touches a socket or the store, never awaits: `actors/device.py` carries out the
effects and feeds the inputs.

Durability: an attempt's Message ID and token are stored before the request may leave
(`Hold`), so a restart can resend the same exchange (exactly once across a crash). Until
the actor reports `durable`, only answers to the device's own messages leave.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dm_actor.coap.blockwise import (
    Ask,
    Block,
    Block1Sender,
    Complete,
    Failed,
    Send as BlockSend,
    get_block,
    get_size,
    size_option,
)
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.events import (
    FailureReason,
    MessageRefused,
    NotificationReceived,
    RequestAcknowledged,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from dm_actor.coap.message import Message, Option, query_options, uint_bytes
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.coap.observe import NotificationOrder
from dm_actor.delivery.outcomes import INCOMPLETE, Outcome, from_response
from dm_actor.delivery.queue import Command, DeviceQueue, Verdict
from dm_actor.device.attempt import (
    AttemptInput,
    AttemptState,
    Link,
    LinkInput,
    next_attempt_state,
    next_link,
)
from dm_actor.device.cache import ValueCache
from dm_actor.device.effects import (
    HOLD,
    OBSERVE_AGAIN,
    Count,
    DeviceRequest,
    Effect,
    Finished,
    Notified,
    ReserveMids,
    Send,
    StoreCommand,
)
from dm_actor.device.transfer import Answer, Block1Pool, Incoming, Transfer, Upload, intake
from dm_actor.lwm2m import path as lwm2m_path

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.address import Address
    from dm_actor.coap.endpoint import CoapEndpoint
    from dm_actor.lwm2m.registration import Registration

log = logging.getLogger(__name__)

_METHODS = {"GET": Code.GET.value, "PUT": Code.PUT.value, "POST": Code.POST.value,
            "DELETE": Code.DELETE.value}  # fmt: skip
_CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
_ACCEPT = OptionNumber.ACCEPT.value
_BLOCK1 = OptionNumber.BLOCK1.value
_BLOCK2 = OptionNumber.BLOCK2.value
_SIZE1 = OptionNumber.SIZE1.value
_TOO_LARGE = Code.REQUEST_ENTITY_TOO_LARGE.value
#: room for a request's header, token and options in a TCP frame beside a block's payload
_FRAME_OVERHEAD = 128
_RST = 3
_FETCH_LIMIT = 8  # notifications being fetched in blocks at once, per device
#: Message IDs are reserved in the store this many at a time (one write per block), so that
#: after a restart a device's new requests start past every MID the old process may have
#: sent it: a reused MID would be answered from the device's deduplication cache.
MID_BLOCK = 256
_S, _I = AttemptState, AttemptInput
_NO_EFFECTS: list[Effect] = []


@dataclass(frozen=True, slots=True, kw_only=True)
class MachineConfig:
    """What every device machine of a server shares."""

    #: a new message layer: `(reliable, first Message ID or None for a random one, the
    #: device's endpoint name)`
    new_endpoint: Callable[[bool, int | None, str], CoapEndpoint]
    #: how long a device remembers a Message ID (an attempt within it resends the exchange)
    resend_window: float
    #: seconds a registration outlives its lifetime before it ends (rule 8.3)
    registration_grace: float
    #: the largest block we send or ask for, as an SZX (6: 1024 bytes; a 1024-byte block
    #: and its header fit an IPv6 minimum-MTU path, 1280 bytes)
    block_szx: int = 6
    #: the largest request body a device may send in blocks (a Register of many links)
    max_body_in: int = 64 * 1024
    #: the shared bound on requests being reassembled
    block1_pool: Block1Pool = field(default_factory=lambda: Block1Pool(256, 60.0))
    #: the largest frame a TCP connection takes (its CSM's Max-Message-Size)
    frame_limit: Callable[[object], int] = lambda conn: 1152
    #: Max-Age of a 5.03 (the client waits that long before it tries again)
    retry_after: int = 60


class _Rare:
    """What few devices need, made on first use: a request being reassembled from blocks,
    the block size a device asked for (4.13), and answers that must leave before anything
    of ours (a wake-up Register's 2.01)."""

    __slots__ = ("answering", "incoming", "szx")

    def __init__(self) -> None:
        self.incoming: Incoming | None = None
        self.szx: int | None = None
        self.answering = 0  # Register answers held for the store: our requests wait


class DeviceMachine:
    """One registered device's decisions. See the module docstring."""

    __slots__ = (
        "_cache",
        "_contact",
        "_fetches",
        "_held",
        "_mid_limit",
        "_observations",
        "_out",
        "_rare",
        "_transfer",
        "addr",
        "attempt",
        "coap",
        "config",
        "conn",
        "link",
        "link_id",
        "queue",
        "reg",
    )

    def __init__(
        self,
        config: MachineConfig,
        reg: Registration,
        queue: DeviceQueue,
        *,
        addr: Address | None = None,
        conn: object | None = None,
        mid_start: int | None = None,
    ) -> None:
        self.config = config
        self.reg = reg
        self.queue = queue
        self.addr = addr
        self.conn = conn  # the TCP connection, opaque here: effects name it, the actor uses it
        self.coap = config.new_endpoint(conn is not None, mid_start, reg.endpoint)
        self.attempt = AttemptState.IDLE
        self.link = Link.TCP if conn is not None else Link.UDP if addr is not None else Link.NONE
        # changes whenever the address, the connection or the message layer does: an answer
        # held for the store goes to the device's new transport only if this is unchanged
        self.link_id = 0
        self._out: list[Effect] | None = None
        self._held = False  # a write the next request depends on is not durable yet
        self._contact = False  # a message since the last `settle` (rule 7.1's resend)
        self._observations: dict[bytes, tuple[str, NotificationOrder]] | None = None
        self._cache: ValueCache | None = None
        # the first Message ID not reserved in the store (restored: the stored one, so a
        # move to TCP and back continues past it too)
        self._mid_limit: int | None = mid_start
        # the attempt's body going out in blocks, or its answer coming in blocks
        self._transfer: Transfer | Upload | None = None
        self._rare: _Rare | None = None
        # notifications whose rest is being fetched, by the fetching exchange's token
        self._fetches: dict[bytes, tuple[bytes, Transfer]] | None = None

    # -- reading ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.reg.endpoint

    @property
    def held(self) -> bool:
        """Whether requests wait for the store (answers to the device still leave)."""
        return self._held

    def has_transport(self) -> bool:
        return self.conn is not None or self.addr is not None

    def get_timer(self) -> float | None:
        """When `handle_timer` must be called next (None: never, until new input). While
        held, none: nothing of ours leaves, so no retransmission clock runs (requests
        already out would otherwise pile up their retransmissions, or time out unsent)."""
        return None if self._held else self.coap.get_timer()

    def effects(self) -> list[Effect]:
        """What to do, in order, since the last call (carry out every one)."""
        out = self._out
        if out is None:
            return _NO_EFFECTS
        self._out = None
        return out

    def cached(self, uri: str, now: float) -> Outcome | None:
        """A fresh value for a GET of `uri` without Accept, else None."""
        cache = self._cache
        return None if cache is None else cache.get(uri, now)

    def observed_paths(self) -> set[str]:
        if self._observations is None:
            return set()
        return {uri for uri, _ in self._observations.values()}

    def observing(self, path: str) -> bool:
        """Whether `path` is observed, or an Observe of it waits or is in flight."""
        queue = self.queue
        return path in self.observed_paths() or any(
            c is not None and c.observe and c.uri == path for c in (queue.in_flight, *queue.queue)
        )

    def lifetime_over(self, now: float) -> bool:
        """Whether the registration outlived its lifetime and grace (rule 8.3)."""
        return self.reg.expires_at(self.config.registration_grace) <= now

    # -- inputs from the device -------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        """A datagram from the device's address (any but a Reset is a contact; a Reset
        fails the attempt, rule 3.4)."""
        if len(data) > 0 and (data[0] >> 4) & 3 != _RST:
            self._contact = True
            self.queue.contact(now)
        self.coap.receive_datagram(data, now)
        self._handle_events(now)
        self._flush(now)

    def receive_message(self, msg: Message, now: float) -> None:
        """A message on the device's TCP connection (always a contact)."""
        self._contact = True
        self.queue.contact(now)
        self.coap.receive_message(msg, now)
        self._handle_events(now)
        self._flush(now)

    def handle_timer(self, now: float) -> bool:
        """Retransmit or time out what is due (call at `get_timer()` or later); whether
        anything was."""
        coap = self.coap
        timer = coap.get_timer()
        if timer is None or timer > now or self._held:
            return False
        retransmitted, timed_out = coap.handle_timer(now)
        for _ in range(retransmitted):
            self._emit(Count("retransmissions"))
        for _ in range(timed_out):
            self._emit(Count("coap_timeouts"))
        self._handle_events(now)
        self._flush(now)
        return True

    def unreachable(self, now: float) -> None:
        """An ICMP error for a datagram we sent, or the address was taken by another device:
        what was sent fails; an attempt not yet sent keeps its retry (rule 3.4)."""
        self.coap.peer_unreachable(now)
        self._fail_decided()
        self._handle_events(now)
        self._flush(now)

    # -- inputs from the server -------------------------------------------------------------

    def submit(self, cmd: Command, now: float, *, start: bool = True) -> Verdict:
        """Queue a command (rules 1.5-1.7), answer it from the cache (a GET without Accept,
        alone in the queue, whose value is fresh), or start its attempt at once if `start`
        and the device is idle and reachable: its acceptance then already holds the
        attempt's Message ID and token (one write serves both). Either way the write is
        among the effects; nothing is accepted that is not stored."""
        queue = self.queue
        verdict = queue.submit(cmd, now)
        if verdict is not Verdict.ACCEPTED:
            return verdict
        if self.link is Link.ENDED:  # (rule 8.2: it ends at once, and is never sent)
            queue.remove_all(now)
            self._finished()
            return verdict
        if cmd.method == "GET" and cmd.accept is None and not cmd.observe and len(queue) == 1:
            # (only with nothing ahead of it: a queued PUT may change the value, and answers
            # must come in the order the commands were accepted)
            fresh = self.cached(cmd.uri, now)
            if fresh is not None:
                queue.finish_now(cmd, fresh, now)
                self._finished()
                return verdict
        if start and not self._held and queue.in_flight is None and len(queue.queue) == 1:
            self.pump(now)
            if self.queue.in_flight is cmd:  # (started: stored with its attempt)
                return verdict
        self._emit(StoreCommand(cmd))
        return verdict

    def settle(self, now: float, *, start: bool = True) -> None:
        """The mail that arrived was fed: start the next attempt if `start` and the rules
        allow (a contact in that mail allows a resend after the grace, rule 7.1)."""
        on_contact, self._contact = self._contact, False
        self.pump(now, on_contact=on_contact, start=start)

    def pump(self, now: float, *, on_contact: bool = False, start: bool = True) -> None:
        """Start the next attempt if the rules allow, report what finished, send what may go."""
        queue = self.queue
        rare = self._rare
        if (
            start
            and queue.queue
            and (self.conn is not None or self.addr)
            and (rare is None or not rare.answering)
        ):
            cmd = queue.next_attempt(now, on_contact=on_contact)
            if cmd is not None:
                self._start_attempt(cmd, now)
                self._hold()
        self._finished()
        self._flush(now)

    def durable(self, now: float) -> None:
        """Every write asked for so far is durable: the decided attempt leaves (or, if it
        expired while the store took its time, finishes unsent: rule 5.2)."""
        self._held = False
        self.coap.rebase_unsent(now)  # (what waited leaves now: its clock starts now)
        self._flush(now)

    def respond(self, request: Message, code: int, options: tuple[Option, ...], now: float) -> None:
        """Answer a request the device sent (`DeviceRequest`), unless it was answered."""
        coap = self.coap
        if not coap.answered(request):  # (taken twice: its entry expired meanwhile)
            block1 = request.option(_BLOCK1)
            if block1 is not None:  # the last block of a request in blocks: echoed (2.5)
                options = tuple(sorted((*options, (_BLOCK1, block1)), key=lambda o: o[0]))
            coap.respond(request, code, options, b"", now)
        self._flush(now)

    def answer_pending(self) -> None:
        """A Register's answer waits for the store: none of our requests leaves before it
        (a client ignores requests until it is registered; issue 13 item 5)."""
        self._rare_state().answering += 1

    def answer_sent(self, now: float) -> None:
        """That answer left (or will never leave): our requests may go again."""
        rare = self._rare
        if rare is not None and rare.answering:
            rare.answering -= 1
            if not rare.answering and rare.incoming is None and rare.szx is None:
                self._rare = None  # (every new device passes here: it keeps no object)

    def sweep(self, now: float) -> None:
        """Finish every expired command not in flight (rule 5.2)."""
        self.queue.sweep(now)
        self._finished()

    def reregistered(self, reg: Registration, now: float) -> None:
        """The same endpoint registered again (rule 8.1): the queue is kept, the
        observations are gone (rule 9.3: the caller queues them again), it is a contact."""
        self.reg = reg
        self.queue.queue_mode = reg.queue_mode
        self.forget_observations()
        self.queue.contact(now)

    def updated(self, reg: Registration) -> None:
        self.reg = reg
        self.queue.queue_mode = reg.queue_mode

    def end(self, now: float) -> None:
        """The registration ended: every command finishes (rules 8.2, 8.3)."""
        queue, coap = self.queue, self.coap
        in_flight, transfer = queue.in_flight, self._transfer
        for ours in (in_flight and in_flight.token, transfer and transfer.token):
            if ours:
                coap.abandon(ours)  # nothing more is sent to the device, nor retransmitted
        self.forget_observations()
        if self._rare is not None and self._rare.incoming is not None:
            self._rare.incoming = None
            self.config.block1_pool.release(self)
        queue.remove_all(now)
        self._to(_I.ENDED)
        self._transfer = None
        self._finished()
        self._flush(now)
        self.link = next_link(self.link, LinkInput.ENDED)

    # -- the transport ----------------------------------------------------------------------

    def bind(self, addr: Address | None, conn: object | None, now: float) -> None:
        """The device speaks from `addr` (UDP) or on `conn` (TCP) from now on. A new
        connection, or a move between UDP and TCP, loses what was sent on the old transport
        (rule 3.4: failed; an attempt not yet sent keeps its retry) and the observations
        (RFC 8323: they die with the connection; `ObserveAgain`)."""
        reliable = conn is not None
        replaced = self.conn is not None and self.conn is not conn
        moved = replaced or self.addr != addr or self.conn is not conn
        if self.coap.reliable != reliable:
            # back on UDP: Message IDs go on past every one reserved (and so maybe sent)
            # before, which the device may still remember (its deduplication)
            self.coap = self.config.new_endpoint(
                reliable, None if reliable else self._mid_limit, self.reg.endpoint
            )
            self._abandon_attempt(now)
            replaced = moved = True  # the old endpoint's observations are gone with it
        self.addr = addr
        self.conn = conn
        self.link = next_link(self.link, LinkInput.TCP_BOUND if reliable else LinkInput.UDP_BOUND)
        if moved:
            self.link_id += 1
        if replaced:
            self._transport_lost(now)

    def lose_connection(self) -> None:
        """The TCP connection closed: nothing more goes out on it. The actor then feeds what
        came on it, and `connection_closed`."""
        self.conn = None
        self.link = next_link(self.link, LinkInput.LOST)
        self.link_id += 1

    def connection_closed(self, now: float) -> None:
        """After `lose_connection` and the mail that came before the close: unless that mail
        bound it anew (or ended it), the device is unreachable until it connects again and
        what was sent on the connection fails (rule 3.4)."""
        if self.link is Link.ENDED or self.has_transport():
            return
        self.queue.disconnected()
        self._transport_lost(now)

    def lose_address(self) -> None:
        """Another device took this one's address: nothing more goes there (the actor then
        reports it `unreachable`, in order with its mail)."""
        self.addr = None
        self.link = next_link(self.link, LinkInput.LOST)
        self.link_id += 1

    # -- observations -----------------------------------------------------------------------

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
        """The device re-registered or lost its transport: its observations are gone."""
        if self._observations is not None:
            for token in self._observations:
                self.coap.cancel_observation(token)
            self._observations = None
        for token in self._fetches or ():
            self.coap.abandon(token)
        self._fetches = None

    # -- internals: attempts ----------------------------------------------------------------

    def _to(self, event: AttemptInput) -> None:
        state = self.attempt
        self.attempt = nxt = next_attempt_state(state, event)
        log.debug("%s: attempt %s --%s--> %s", self.reg.endpoint, state.value, event.value,
                  nxt.value)  # fmt: skip

    def _emit(self, effect: Effect) -> None:
        out = self._out
        if out is None:
            self._out = [effect]
        else:
            out.append(effect)

    def _hold(self) -> None:
        self._held = True
        self._emit(HOLD)

    def _finished(self) -> None:
        for cmd, outcome in self.queue.take_finished():
            self._emit(Finished(cmd, outcome))

    def _flush(self, now: float) -> None:
        """Hand over what the endpoint has ready: everything, or while held only answers to
        the device's own messages (to the transport they answer: it may move before the
        hold clears)."""
        if self.attempt is _S.DECIDED and not self._held and self.has_transport():
            self._leave(now)
        coap = self.coap
        out = coap.replies_to_send() if self._held else coap.datagrams_to_send()
        if out and (self.conn is not None or self.addr is not None):
            addr, conn = self.addr, self.conn
            for data in out:
                self._emit(Send(data, addr, conn))

    def _start_attempt(self, cmd: Command, now: float) -> None:
        """Decide the attempt's exchange and store it; `durable` sends it."""
        coap = self.coap
        if (
            cmd.token is None
            or cmd.exchange_at is None
            or (now - cmd.exchange_at >= self.config.resend_window)
            or (cmd.mid is None and not coap.reliable)  # decided for TCP, now over UDP
        ):
            cmd.exchange_at = now
            cmd.mid = None if coap.reliable else self._new_mid()
            cmd.token = coap.next_token()
        # else the same exchange again: same Message ID and token (see Command.mid)
        self._emit(StoreCommand(cmd))
        self._to(_I.STARTED)

    def _leave(self, now: float) -> None:
        """The decided attempt is durable and has a transport: it is sent, or, if it expired
        while the store took its time, it finishes unsent (rule 5.2)."""
        queue = self.queue
        cmd = queue.in_flight
        assert cmd is not None
        if cmd.expired(now):
            queue.expire_unsent(now)
            self._to(_I.EXPIRED)
            self._finished()
        else:
            self._transmit(cmd, now)
            self._to(_I.DURABLE)

    def _transmit(self, cmd: Command, now: float) -> None:
        """Send the decided attempt: its stored exchange (Message ID, token); a body larger
        than a block goes in blocks, block 0 on that exchange (RFC 7959 2.5)."""
        options = self._request_options(cmd)
        payload = cmd.payload
        szx = self._block_szx()
        if len(payload) > 16 << szx:
            sender = Block1Sender(payload, szx)
            first = sender.current
            options += (first.block.option(_BLOCK1), size_option(_SIZE1, len(payload)))
            payload = first.payload
            assert cmd.token is not None
            self._transfer = Upload(sender, cmd.token)
        self.coap.send_request(
            _METHODS[cmd.method],
            tuple(sorted(options, key=lambda o: o[0])),
            payload,
            now,
            observe=cmd.observe,
            mid=cmd.mid,
            token=cmd.token,
        )

    def _block_szx(self) -> int:
        """The block size for this device: ours, or smaller where it asked (4.13) or its TCP
        frames are small (CSM Max-Message-Size)."""
        szx = self.config.block_szx
        rare = self._rare
        if rare is not None and rare.szx is not None:
            szx = min(szx, rare.szx)
        conn = self.conn
        if conn is not None:
            room = self.config.frame_limit(conn) - _FRAME_OVERHEAD
            while szx > 0 and 16 << szx > room:
                szx -= 1
        return szx

    def _uploaded(self, cmd: Command, upload: Upload, response: Message, now: float) -> bool:
        """Take the answer to a block of the request body: True when it is the final
        answer; else the next block was sent, or the upload failed (the command ends 502).
        (A 4.13 to block 0 is `_smaller_blocks`'s, before this.)"""
        code = response.code
        try:
            block1 = get_block(response, _BLOCK1)
        except DecodeError as exc:
            return self._upload_failed(cmd, str(exc), now)
        sender = upload.sender
        step = sender.on_response(code, block1)
        if isinstance(step, Failed):
            return self._upload_failed(cmd, step.reason, now)
        if not isinstance(step, BlockSend):  # (Done: this answer is the final one)
            return True
        upload.token = self._send_upload_block(cmd, sender, now)
        self._to(_I.BLOCK_SENT)
        return False

    def _smaller_blocks(self, cmd: Command, response: Message, now: float) -> bool:
        """The device answered 4.13 to the whole body, or to block 0 of it: send the body
        again in smaller blocks (RFC 7959 2.9.3), as a new exchange, if a smaller block fits
        what it said — the block size of its Block1, or its Size1 as the most it takes at
        once; a bare 4.13 (Anjay: the datagram was over its input buffer) halves the size,
        down to 16 bytes. The size is kept for the device's next bodies. False when no
        smaller block is possible: the 4.13 is the answer."""
        transfer = self._transfer
        if transfer is None:  # the whole body was sent: a block must be smaller than it
            top, limit = self._block_szx(), len(cmd.payload) - 1
        elif type(transfer) is Upload and transfer.sender.current.block.num == 0:
            szx = transfer.sender.current.block.szx
            top, limit = szx - 1, (16 << szx) - 1
        else:
            return False
        try:
            block1 = get_block(response, _BLOCK1)
            size1 = get_size(response, _SIZE1)
        except DecodeError:
            block1 = size1 = None
        if block1 is not None:
            limit = min(limit, 16 << block1.szx)
        elif size1 is not None:
            limit = min(limit, size1)
        szx = max((x for x in range(top + 1) if 16 << x <= limit), default=-1)
        if szx < 0:
            return False
        self._rare_state().szx = szx
        sender = Block1Sender(cmd.payload, szx)
        self._transfer = upload = Upload(sender, b"")
        upload.token = self._send_upload_block(cmd, sender, now)
        self._to(_I.BLOCK_SENT)
        return True

    def _upload_failed(self, cmd: Command, reason: str, now: float) -> bool:
        self._transfer = None
        self._emit(Count("blockwise_failures"))
        log.debug("%s: sending %s in blocks failed: %s", self.reg.endpoint, cmd.uri, reason)
        self.queue.attempt_succeeded(INCOMPLETE, now)
        self._to(_I.ANSWERED)
        return False

    def _send_upload_block(self, cmd: Command, sender: Block1Sender, now: float) -> bytes:
        """The current block of the body, as a new exchange (block 0 again after a 4.13
        carries Size1 again)."""
        step = sender.current
        options = (*self._request_options(cmd), step.block.option(_BLOCK1))
        if step.block.num == 0:
            options += (size_option(_SIZE1, len(cmd.payload)),)
        coap = self.coap
        return coap.send_request(
            _METHODS[cmd.method],
            tuple(sorted(options, key=lambda o: o[0])),
            step.payload,
            now,
            observe=cmd.observe,
            mid=None if coap.reliable else self._new_mid(),
        )

    def _incoming_block(self, request: Message, now: float) -> Message | None:
        """One block of a request the device sends in blocks (RFC 7959 2.5): answered 2.31
        until the last, which comes back whole (its Block1 is echoed by `respond`); see
        `transfer.intake` for the refusals."""
        rare = self._rare_state()
        config = self.config
        rare.incoming, result = intake(
            rare.incoming,
            self,
            request,
            config.block1_pool,
            szx=config.block_szx,
            max_body=config.max_body_in,
            retry_after=config.retry_after,
            now=now,
        )
        if isinstance(result, Answer):
            self.coap.respond(request, result.code, result.options, b"", now)
            return None
        return result

    def _rare_state(self) -> _Rare:
        rare = self._rare
        if rare is None:
            rare = self._rare = _Rare()
        return rare

    def _request_options(self, cmd: Command) -> tuple[Option, ...]:
        uri, _, query = cmd.uri.partition("?")
        path = lwm2m_path.parse(uri)
        options = path.uri_path_options(self.reg.objects.alt_path)
        if query:
            options += query_options(query)
        if cmd.content_format is not None:
            options += ((_CONTENT_FORMAT, uint_bytes(cmd.content_format)),)
        accept = cmd.accept
        if accept is None and cmd.method == "GET":  # (Read, Observe: issue 13 item 4)
            accept = self.reg.preferred_accept(path)  # what the device announced, or None
        if accept is not None:
            options += ((_ACCEPT, uint_bytes(accept)),)
        return options

    def _fail_decided(self) -> None:
        """The device became unreachable before the decided attempt could leave: it goes
        back to the queue without using up a retry (rule 3.4)."""
        if self.attempt is _S.DECIDED:
            self.queue.attempt_not_sent()
            self._to(_I.TRANSPORT_LOST)

    def _abandon_attempt(self, now: float) -> None:
        """The message layer is replaced under the attempt: it can no longer be answered."""
        self._transfer = None
        self._fetches = None
        state = self.attempt
        if state is _S.DECIDED:
            self.queue.attempt_not_sent()
        elif state is not _S.IDLE:
            self.queue.attempt_failed(FailureReason.UNREACHABLE, now)
        self._to(_I.TRANSPORT_LOST)

    def _transport_lost(self, now: float) -> None:
        """What was sent on the transport fails now (rule 3.4), an attempt not yet sent
        waits for the next transport, and observations are made again (RFC 8323)."""
        coap = self.coap
        coap.discard_unsent()  # (held back for the old transport: never for a new one)
        coap.peer_unreachable(now)
        self._fail_decided()
        self._fetches = None
        self._handle_events(now)
        if self._observations:
            self.forget_observations()
            self._emit(OBSERVE_AGAIN)
        self._finished()
        self._flush(now)

    def _new_mid(self) -> int:
        mid = self.coap.next_mid()
        limit = self._mid_limit
        if limit is None or not 0 < (limit - mid) & 0xFFFF <= MID_BLOCK:
            limit = self._mid_limit = (mid + MID_BLOCK) & 0xFFFF
            self._emit(ReserveMids(limit))
            self._hold()  # nothing with a MID of the new block leaves before it is stored
        return mid

    # -- internals: what the message layer reports -----------------------------------------

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
                                 self.reg.endpoint, fetch[1].uri, event.reason)  # fmt: skip
                    continue
            if isinstance(event, ResponseReceived):
                self._response(event.token, event.response, now)
            elif isinstance(event, NotificationReceived):
                self._notification(event.token, event.notification, now)
            elif isinstance(event, RequestFailed):
                if self._ours(event.token):
                    if self._transfer is not None:  # a retry asks from the first block again
                        self._transfer = None
                        self._forget_observation()
                    self.queue.attempt_failed(event.reason, now)
                    self._to(_I.FAILED)
            elif isinstance(event, RequestReceived):
                request: Message | None = event.request
                if request is not None and request.option(_BLOCK1) is not None:
                    request = self._incoming_block(request, now)
                if request is not None:
                    self._emit(DeviceRequest(request))
            elif isinstance(event, RequestAcknowledged):
                if self._ours(event.token):
                    self._to(_I.ACKED)  # the separate response will follow
            elif isinstance(event, MessageRefused):
                self._emit(Count("messages_refused"))
        self._finished()

    def _ours(self, token: bytes) -> bool:
        """Whether an exchange `token` belongs to the attempt in flight (sent, not only
        decided: an older send of the same exchange is not this attempt's)."""
        state = self.attempt
        if state is _S.IDLE or state is _S.DECIDED:
            return False
        cmd = self.queue.in_flight
        transfer = self._transfer
        return cmd is not None and (
            cmd.token == token or (transfer is not None and transfer.token == token)
        )

    def _response(self, token: bytes, response: Message, now: float) -> None:
        if not self._ours(token):
            return
        cmd = self.queue.in_flight
        assert cmd is not None
        transfer = self._transfer
        if response.code == _TOO_LARGE and cmd.payload and self._smaller_blocks(cmd, response, now):
            return  # sent again in (smaller) blocks
        if type(transfer) is Upload:
            if not self._uploaded(cmd, transfer, response, now):
                return  # the next block was sent, or the upload failed
            self._transfer = transfer = None
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
        self._to(_I.ANSWERED)
        uri = cmd.uri
        stale = False
        if cmd.observe:
            if outcome.status == 200 and response.observe is not None:
                observations = self._observations
                if observations is None:
                    observations = self._observations = {}
                entry = observations.get(token)
                if entry is None:
                    order = NotificationOrder()
                    order.accept(response.observe, now)
                    observations[token] = (uri, order)
                    self._emit(Notified(uri, outcome))
                elif self.conn is None and entry[1].accept(response.observe, now):
                    self._emit(Notified(uri, outcome))
                else:  # a newer notification came while it was in blocks (RFC 7641 3.4)
                    stale = True
            else:
                log.info("%s refused to be observed on %s: %d", self.reg.endpoint, uri,
                         outcome.status)  # fmt: skip
        if cmd.method == "GET" and "?" not in uri and cmd.accept is None and not stale:
            # (only what a request without Accept got is served again from the cache: the
            # cache is looked up for those alone, and a TLV answer is not a text one)
            self._remember(uri, outcome, now)
        elif cmd.method != "GET" and outcome.status < 300 and self._cache is not None:
            self._cache.forget(uri.partition("?")[0])

    def _remember(self, uri: str, outcome: Outcome, now: float) -> None:
        if outcome.max_age and outcome.status == 200:
            cache = self._cache
            if cache is None:
                cache = self._cache = ValueCache()
            cache.remember(uri, outcome, now)

    def _reassemble(self, cmd: Command, response: Message, now: float) -> Message | None:
        """Feed one block of the answer; the whole answer once the last block arrived.

        The next block is asked for with the same request plus Block2, as a new exchange
        (its Message ID and token are the transfer's, not the command's: a retry after a
        crash resends the command's first exchange, whose answer the device has cached).
        A transfer the device breaks (wrong offsets, a changing body, an error on a later
        block, a body over 1 MiB) ends the command with 502 BLOCKWISE_TRANSFER_FAILED.
        """
        transfer = self._transfer
        if not isinstance(transfer, Transfer):
            transfer = self._transfer = Transfer(response)
        step = transfer.feed(response)
        if isinstance(step, Ask):
            transfer.token = self._ask_block(cmd, step.block, now)
            self._to(_I.BLOCK_ASKED)
            return None
        self._transfer = None
        if isinstance(step, Complete):
            return transfer.first._replace(payload=step.body)
        self._emit(Count("blockwise_failures"))
        log.debug("%s: block-wise answer to %s failed: %s", self.reg.endpoint, cmd.uri,
                  step.reason)  # fmt: skip
        self._forget_observation()
        self.queue.attempt_succeeded(INCOMPLETE, now)
        self._to(_I.ANSWERED)
        return None

    def _forget_observation(self) -> None:
        """An Observe whose first answer never came whole: the endpoint may already hold the
        observation (the first block had Observe), and a notification that came meanwhile
        made ours; drop both, or it would stay live unseen (and the path would look
        observed, so no new Observe would be queued for it)."""
        cmd = self.queue.in_flight
        token = None if cmd is None or not cmd.observe else cmd.token
        if token is not None:
            self.coap.cancel_observation(token)
            if self._observations is not None:
                self._observations.pop(token, None)
            self._drop_fetches(token)

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

    # -- internals: notifications ----------------------------------------------------------

    def _notification(self, token: bytes, message: Message, now: float) -> None:
        observations = self._observations
        entry = None if observations is None else observations.get(token)
        if entry is None:
            cmd = self.queue.in_flight
            if cmd is None or cmd.token != token or self.attempt is not _S.IN_BLOCKS:
                return
            # the observation's first answer still comes in blocks: this one is newer, and
            # the first answer will not be notified after it (RFC 7641 3.4)
            if observations is None:
                observations = self._observations = {}
            entry = observations[token] = (cmd.uri, NotificationOrder())
        uri, order = entry
        seq = message.observe
        if seq is not None and self.conn is None and not order.accept(seq, now):
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
        self._emit(Notified(uri, outcome))

    def _fetch_rest(self, observation: bytes, uri: str, message: Message, now: float) -> None:
        """A notification came in blocks: fetch the rest with GETs (RFC 7959 2.6) and notify
        the whole value then. A newer notification of the same path replaces the fetch."""
        fetches = self._fetches
        if fetches is None:
            fetches = self._fetches = {}
        if len(fetches) >= _FETCH_LIMIT:
            oldest = next(iter(fetches))
            gone = fetches.pop(oldest)
            self.coap.abandon(oldest)  # (its GET stops too: no retransmissions for nothing)
            log.info("%s: too many notifications in blocks: %s not completed",
                     self.reg.endpoint, gone[1].uri)  # fmt: skip
        self._fetched(observation, Transfer(message, uri), message, now)

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
        self, observation: bytes, transfer: Transfer, response: Message, now: float
    ) -> None:
        step = transfer.feed(response)
        uri = transfer.uri
        if isinstance(step, Ask):
            options = lwm2m_path.parse(uri).uri_path_options(self.reg.objects.alt_path)
            token = self._send_block_request(_METHODS["GET"], options, step.block, now)
            fetches = self._fetches
            if fetches is None:
                fetches = self._fetches = {}
            fetches[token] = (observation, transfer)
            return
        if isinstance(step, Failed):
            self._emit(Count("blockwise_failures"))
            log.debug("%s: a notification of %s in blocks failed: %s", self.reg.endpoint,
                      uri, step.reason)  # fmt: skip
            return
        first = transfer.first
        outcome = from_response(first.code, step.body, first.content_format, first.max_age)
        self._remember(uri, outcome, now)
        self._emit(Notified(uri, outcome))
