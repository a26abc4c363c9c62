"""The supervisor: the registry of device actors, the registrar, and the typed in-process API.

It routes what the transports receive (a known peer's datagram goes to its actor's mailbox, a
Register from anyone is handled here), spawns one actor task per registration in its nursery
and ends it on De-register or lifetime expiry, runs the sweeps (command expiry, lifetime), and
offers `submit` / `subscribe` to the API layer. Device-level failures are contained here; a
programming error propagates.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import re
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import msgspec
import trio
from sortedcontainers import SortedList

from dm_actor.actors.device import Address, DeviceActor, Signal, TcpConnection
from dm_actor.actors.events import Event, EventStream, Item
from dm_actor.actors.mailbox import MailboxClosed, Overloaded
from dm_actor.actors.persist import (
    address_from_text,
    command_from_record,
    command_record,
    registration_from_record,
    registration_record,
)
from dm_actor.coap import message as coap_message
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber, TransmissionParameters
from dm_actor.delivery.queue import Command, DeliveryPolicy, DeviceQueue, Verdict
from dm_actor.lwm2m import registration as reg_iface
from dm_actor.lwm2m.attributes import InvalidAttributes, parse_attributes
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.link_format import SHARED_ENTRIES
from dm_actor.lwm2m.path import parse as parse_path
from dm_actor.lwm2m.registration import Registration, RegistrationError
from dm_actor.store.base import EventRecord, PresubscriptionRecord, Snapshot, Store, StoreError
from dm_actor.store.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dm_actor.config import Settings
    from dm_actor.delivery.outcomes import Outcome
    from dm_actor.lwm2m.link_format import RegisteredObjects

log = logging.getLogger(__name__)

ASYNC_ID = re.compile(r"^[\w\-]{1,40}$", re.ASCII)
METHODS = frozenset(("GET", "PUT", "POST", "DELETE"))
MIN_EXPIRY, MAX_EXPIRY = 60, 2_592_000
MAX_RETRY = 10
_POST = Code.POST.value
_CON = MessageType.CON.value
_ASYNC = "async-responses"
_json = msgspec.json.Encoder().encode
#: new peers' Registers waiting to be taken; more get 5.03 at once
ADMISSION_LIMIT = 4096
#: a Register that waited longer gets 5.03 (its client has retransmitted meanwhile)
ADMISSION_WAIT = 0.5
#: seconds of registrations per scheduler pass before the receive loop and others run again
ADMISSION_BUDGET = 0.002
#: datagrams longer than this are dropped unread (counted as datagrams_too_large)
MAX_DATAGRAM = 4096
#: seconds between the log lines that sum up refusals (`Supervisor._report`)
REPORT_INTERVAL = 60
_REFUSALS = frozenset(
    ("registrations_shed", "mailbox_overloaded", "decode_errors", "peer_errors",
     "messages_refused", "frames_dropped", "datagrams_too_large", "blockwise_failures")
)  # fmt: skip
_SUBSCRIPTION_PREFIX = "sub:"  # cannot collide with an async-id (rule 1.1's pattern has no ':')


@dataclass(frozen=True, slots=True)
class Accepted:
    """202 Accepted; `duplicate` when the async-id was already accepted (rule 1.7)."""

    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Rejected:
    """The request was refused: `status` is the HTTP status, `code` the plain-string body."""

    status: int
    code: str


@dataclass(frozen=True, slots=True)
class Presubscription:
    """A pre-subscription (rule 9.2): patterns may end with `*`."""

    endpoint_name: str | None = None
    endpoint_type: str | None = None
    resource_paths: tuple[str, ...] = ()

    def matches_device(self, endpoint: str, endpoint_type: str | None = None) -> bool:
        """Both given patterns match (a pattern may end with `*`)."""
        if self.endpoint_name is not None and not _match(self.endpoint_name, endpoint):
            return False
        return self.endpoint_type is None or (
            endpoint_type is not None and _match(self.endpoint_type, endpoint_type)
        )


def _match(pattern: str, value: str) -> bool:
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


class Supervisor:
    """Owns every device actor. Start it with `await nursery.start(supervisor.run)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        events: EventStream | None = None,
        mailbox_size: int = 64,
        reply_cache_size: int = 65536,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        d = settings.delivery
        self.settings = settings
        self.store: Store = MemoryStore() if store is None else store
        self.events = EventStream() if events is None else events
        self.mailbox_size = mailbox_size
        self.registration_grace = settings.registration.expiry_grace
        self._wall_clock = wall_clock
        self.wall_offset = 0.0  # wall-clock minus Trio time; set when `run` starts
        self.params: TransmissionParameters = settings.transmission_parameters()
        # how long a device remembers a Message ID: ours, but at most RFC 7252's 247 s,
        # the default of the clients in the field
        self.resend_window = min(self.params.exchange_lifetime, 247.0)
        self.policy = DeliveryPolicy(
            queue_length=d.queue_length, awake_time=d.awake_time, resend_grace=d.resend_grace
        )
        self.by_endpoint: dict[str, DeviceActor] = {}
        # the registered endpoint names in order, for listing pages without sorting every
        # name per request (that sort was half of the server's CPU during a flood of 100k)
        self.endpoint_names: SortedList[str] = SortedList()
        self.by_reg_id: dict[str, DeviceActor] = {}
        self.by_addr: dict[Address, DeviceActor] = {}
        self.by_conn: dict[TcpConnection, DeviceActor] = {}
        self.presubscriptions: dict[str, list[Presubscription]] = {}  # owner -> list
        # replies to Registers from peers that had no actor yet, for retransmissions
        # (None while the answer waits for the store: retransmissions are dropped meanwhile)
        self._replies: OrderedDict[tuple[Address, int], tuple[float, bytes | None]] = OrderedDict()
        # answers waiting for `store.durable()`, with the device whose answer it is
        self._held: list[tuple[Callable[[], None], DeviceActor | None]] = []
        # beyond this many answers waiting for the store, or writes not yet committed (a
        # stalled disk), new Registers are shed and new commands refused until it catches up
        self._held_limit = 100_000
        self._awaiting = 0  # answers held or being committed
        self._held_wake = trio.Event()
        # Registers from peers without an actor, waiting for `_admit`: (arrived, msg, addr, conn)
        self._admission: deque[tuple[float, Message, Address | None, TcpConnection | None]] = (
            deque()
        )
        self._admission_limit = ADMISSION_LIMIT
        self._admission_wake = trio.Event()
        self._reply_cache_size = reply_cache_size
        self._lifetimes: list[tuple[float, str, str]] = []  # (expires_at, endpoint, reg_id)
        self._lifetime_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._rng = random.Random(secrets.randbits(64))  # one for all endpoints
        self._observe_counter = 0  # internal async-ids of Observe commands
        self._event_seq = 0  # numbers the durable events (AsyncIDResponses)
        # the events a restart owes the applications' channels (`restore`), until the hub
        # takes them (`NotificationHub.restore`): not through the bounded event stream
        self.owed_events: list[Event] = []
        self._non_mid = secrets.randbits(16)  # Message IDs of NON replies to unknown peers
        self._udp_send: Callable[[bytes, Address], None] | None = None
        self.statistics = {
            "registrations": 0,
            "registrations_shed": 0,
            "mailbox_overloaded": 0,
            "decode_errors": 0,
            "peer_errors": 0,  # exceptions contained at a peer's boundary (see `contain`)
            # messages dropped unread: the device's dedup window was full of requests whose
            # answers wait for the store (the device retransmits them)
            "messages_refused": 0,
            "frames_dropped": 0,  # to a TCP connection whose send queue was full, or closing
            "datagrams_too_large": 0,  # over MAX_DATAGRAM bytes: dropped unread
            "blockwise_failures": 0,  # answers or notifications in blocks a device broke
        }

    # -- wiring ---------------------------------------------------------------------------

    def attach_udp(self, send: Callable[[bytes, Address], None]) -> None:
        self._udp_send = send

    def new_coap_endpoint(self, *, reliable: bool, mid_start: int | None = None) -> CoapEndpoint:
        seed = secrets.randbits(32)
        return CoapEndpoint(
            self.params,
            reliable=reliable,
            rng=None if self.params.ack_random_factor == 1.0 else self._rng,
            mid_start=seed & 0xFFFF if mid_start is None else mid_start,
            token_seed=seed,
            dedup_limit=16,
        )

    def send_datagram(self, data: bytes, addr: Address) -> None:
        if self._udp_send is not None:
            try:
                self._udp_send(data, addr)
            except trio.ClosedResourceError:
                log.debug("UDP endpoint closed: a datagram to %s is dropped (shutdown)", addr)

    def send_frame(self, conn: TcpConnection, frame: bytes) -> None:
        try:
            conn.send_frame_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.statistics["frames_dropped"] += 1  # (summed up in `_report`, not a line each)
            log.debug("dropped a frame to %s: connection full or closing", conn.peer)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the sweeps and host the actors until cancelled."""
        self.wall_offset = self._wall_clock() - trio.current_time()
        # durable events are numbered from the wall clock (microseconds), so numbers (and the
        # uids made of them) are not reused after a restart
        self._event_seq = max(self._event_seq, int(self._wall_clock() * 1e6))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expiry_sweeper)
            nursery.start_soon(self._lifetime_sweeper)
            nursery.start_soon(self._release_replies)
            nursery.start_soon(self._admit)
            nursery.start_soon(self._report)
            task_status.started()

    def now(self) -> float:
        return trio.current_time()

    def persist_command(self, endpoint: str, cmd: Command) -> None:
        self.store.put_command(command_record(endpoint, cmd, self.wall_offset))

    def restore(self, snapshot: Snapshot) -> None:
        """Bring back what the store kept (call after `run` started, before serving).

        A UDP device comes back at its stored last address, believed reachable: a non-queue
        device is delivered to at once (a timeout or an ICMP error then makes it unreachable
        until its next contact, as always); a queue-mode device waits for its next contact
        (it sleeps). A TCP device cannot be reached until it connects again. A command that
        was attempted before the restart is sent at once, not after the resend grace (that
        grace is for devices that reconnect, not for the server's restart): within
        EXCHANGE_LIFETIME as the same exchange, with its Message ID and token (the device's
        deduplication answers); new requests take Message IDs from the device's stored
        reservation on, never one the old process may have sent within that lifetime.
        Expiry that passed while the server was down is caught by the sweeps.
        """
        now = self.now()
        offset = self.wall_offset
        for rec in snapshot.registrations:
            reg = registration_from_record(rec, offset)
            queue = DeviceQueue(self.policy, queue_mode=reg.queue_mode, now=now)
            addr = address_from_text(rec.address)
            queue.reachable = addr is not None
            queue.awake_until = 0.0
            actor = DeviceActor(self, reg, queue, None, None)
            if addr is not None:
                previous = self.by_addr.get(addr)
                if previous is None or previous.reg.updated_at <= reg.updated_at:
                    if previous is not None:  # it moved: the later registration has it now
                        previous.addr = None
                        previous.queue.reachable = False
                    actor.addr = addr
                    self.by_addr[addr] = actor
                else:
                    queue.reachable = False
            next_mid = snapshot.next_mids.get(reg.endpoint)
            if next_mid is not None:  # past every MID the old process may have sent it
                actor.coap = self.new_coap_endpoint(reliable=False, mid_start=next_mid)
            self.by_endpoint[reg.endpoint] = actor
            self.endpoint_names.add(reg.endpoint)
            self.by_reg_id[reg.reg_id] = actor
            self._watch_lifetime(reg)
            assert self._nursery is not None, "Supervisor.run() is not running"
            self._nursery.start_soon(actor.run, name="device")  # one shared name string
        for crec in snapshot.commands:
            restored = self.by_endpoint.get(crec.endpoint)
            if restored is not None:
                cmd = command_from_record(crec, offset)
                cmd.last_attempt_at = None  # no resend grace (its exchange_at stays)
                restored.queue.queue.append(cmd)
        for endpoint, entries in snapshot.subscriptions.items():
            restored = self.by_endpoint.get(endpoint)
            if restored is None:
                continue
            subscriptions = restored.subscriptions = {}
            for path, owner in entries:
                subscriptions.setdefault(path, set()).add(owner)
            for path in subscriptions:
                self._queue_observe(restored, path, now)  # the old observations are gone
        owed = self.owed_events
        for event in snapshot.events:  # events owed to a channel: owed again
            item = msgspec.json.decode(event.item)
            owed.append((event.kind, item, frozenset((event.owner,)), event.seq))
            self._event_seq = max(self._event_seq, event.seq)
        for owner, pres in snapshot.presubscriptions.items():
            self.presubscriptions[owner] = [
                Presubscription(p.endpoint_name, p.endpoint_type, tuple(p.resource_paths))
                for p in pres
            ]
        log.info(
            "restored %d registrations, %d commands",
            len(snapshot.registrations),
            len(snapshot.commands),
        )

    # -- transport callbacks ----------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """A UDP datagram arrived: to its device's actor, or here if it is a new peer's.

        Nothing a peer sends may end the server: an exception raised while handling it is
        contained (`contain`)."""
        if len(data) > MAX_DATAGRAM:
            # nothing LwM2M sends needs it (bodies go in blocks of at most 1024 bytes), and
            # decoding one packed with options costs ~30 ms (an attacker's finding)
            self.statistics["datagrams_too_large"] += 1
            return
        try:
            self._datagram(data, addr)
        except StoreError:
            raise
        except Exception as exc:
            self.contain(self.by_addr.get(addr), exc, f"a datagram from {addr}")

    def _datagram(self, data: bytes, addr: Address) -> None:
        replies = self._replies
        if replies and len(data) >= 4 and data[1] == _POST:
            cached = replies.get((addr, (data[2] << 8) | data[3]))
            if cached is not None and cached[0] > self.now():
                if cached[1] is not None:
                    self.send_datagram(cached[1], addr)
                return
        actor = self.by_addr.get(addr)
        if actor is not None:
            self._tell(actor, data)
            return
        try:
            msg = coap_message.decode(data)
            _check(msg)
        except DecodeError as exc:
            self.statistics["decode_errors"] += 1
            reply = coap_message.reply_for(exc)
            if reply is not None:
                self.send_datagram(reply, addr)
            return
        self._unknown_peer(msg, addr, None, data)

    def on_unreachable(self, addr: Address) -> None:
        actor = self.by_addr.get(addr)
        if actor is not None:
            self._tell(actor, Signal.UNREACHABLE)

    def on_tcp_message(
        self, conn: TcpConnection, msg: Message
    ) -> Callable[[], Awaitable[object]] | None:
        """A message on a CoAP-over-TCP connection (contained like `on_datagram`). None when
        it was taken; when its device's mailbox is full, what to await before offering it
        again (nothing is retransmitted over TCP: the connection waits instead of dropping)."""
        try:
            return self._tcp_message(conn, msg)
        except StoreError:
            raise
        except Exception as exc:
            self.contain(self.by_conn.get(conn), exc, f"a message from {conn.peer}")
        return None

    def _tcp_message(
        self, conn: TcpConnection, msg: Message
    ) -> Callable[[], Awaitable[object]] | None:
        actor = self.by_conn.get(conn)
        if actor is not None:
            try:
                actor.tell(msg)
            except Overloaded:
                return actor.mailbox.wait_room
            except MailboxClosed:
                pass
            return None
        try:
            _check(msg)
        except DecodeError as exc:
            self.statistics["decode_errors"] += 1
            if 1 <= msg.code <= 31:
                bad = Code.BAD_REQUEST if exc.reply is Reply.BAD_REQUEST else Code.BAD_OPTION
                self.send_frame(conn, _tcp_frame(Message(0, bad, 0, msg.token)))
            return None
        self._unknown_peer(msg, None, conn, None)
        return None

    def on_tcp_closed(self, conn: TcpConnection) -> None:
        actor = self.by_conn.pop(conn, None)
        if actor is not None and actor.conn is conn:
            try:
                actor.connection_lost(self.now())  # now: before a reconnect can be bound
            except StoreError:
                raise
            except Exception as exc:
                self.contain(actor, exc, f"the close of {conn.peer}")
            self._tell(actor, Signal.WAKE)  # its task re-arms its timer
        self.by_conn.pop(conn, None)  # (in case its last mail bound it again)
        admission = self._admission
        if admission and any(entry[3] is conn for entry in admission):
            # a Register that came on it and still waits for admission: a registration
            # bound to a closed connection would never hear of the close (no second one)
            kept = [entry for entry in admission if entry[3] is not conn]
            admission.clear()
            admission.extend(kept)

    def contain(self, actor: DeviceActor | None, exc: Exception, where: str) -> None:
        """The crash boundary: an exception raised while handling a peer's input (a bug, or
        a device-level `DecodeError`/`Lwm2mError`) ends at most that device's registration
        (its commands get their AsyncIDResponses, a `de-registrations` event is published),
        is logged once with its traceback and counted; never the server. A store failure is
        not a peer's doing and is never contained (`StoreError` propagates)."""
        self.statistics["peer_errors"] += 1
        name = "an unregistered peer" if actor is None else f"device {actor.endpoint}"
        log.error("handling %s of %s failed: %r; %s", where, name, exc,
                  "no registration to end" if actor is None else "its registration ends",
                  exc_info=exc)  # fmt: skip
        if actor is None or actor.mailbox.closed:
            return
        now = self.now()
        try:
            actor.end(now, expired=False)
        except StoreError:
            raise
        except Exception:  # its state is broken: end it without its help
            log.exception("device %s could not end cleanly", actor.endpoint)
            actor.mailbox.close()
            self.device_ended(actor, expired=False)

    def _tell(self, actor: DeviceActor, mail: bytes | Message | Signal) -> None:
        try:
            actor.tell(mail)
        except Overloaded:
            self.statistics["mailbox_overloaded"] += 1
        except MailboxClosed:
            pass

    def _unknown_peer(
        self, msg: Message, addr: Address | None, conn: TcpConnection | None, data: bytes | None
    ) -> None:
        """A message from a peer with no actor: Register, or an Update/De-register from a
        device whose address changed; anything else is refused."""
        kind = reg_iface.classify(msg)
        now = self.now()
        if kind == "register":
            admission = self._admission
            if self._store_behind() or len(admission) >= self._admission_limit:
                self._shed(msg, addr, conn)
                return
            if addr is not None:  # until it is answered, retransmissions are dropped
                self._cache_reply(addr, msg.mid, None)
            admission.append((now, msg, addr, conn))
            if len(admission) == 1:
                self._admission_wake.set()
            return
        if kind in ("update", "deregister"):
            # rule 0: the registration id it names is the device's proof of identity
            actor = self.by_reg_id.get(msg.uri_path[1])
            if actor is not None:
                self._bind(actor, addr, conn)
                self._tell(actor, msg if data is None else data)
                return
        if 1 <= msg.code <= 31:
            self._reply_direct(msg, addr, conn, Code.NOT_FOUND, (), cache=False)
        elif addr is not None and msg.mtype == _CON:
            self.send_datagram(coap_message.reset_for(msg.mid), addr)

    async def _admit(self) -> None:
        """Register new peers, at most `ADMISSION_BUDGET` seconds of CPU per scheduler pass.

        A Register from a peer without an actor costs ~60-100 µs; reading a datagram and
        routing a known device's costs a few. So the transport callbacks only queue new
        peers' Registers (bounded) and this task takes them in turns with everyone else: a
        flood of new devices no longer holds the socket's kernel queue full for seconds, in
        which a registered device's answers waited behind it (issue 10, item 7). A Register
        that waited longer than `ADMISSION_WAIT`, or finds the queue full, gets 5.03 with
        Max-Age (a few µs) so its client backs off instead of retransmitting into the flood.
        """
        admission = self._admission
        clock = time.perf_counter  # CPU budget only: no decision of the protocol reads it
        while True:
            await self._admission_wake.wait()
            self._admission_wake = trio.Event()
            while admission:
                stop = clock() + ADMISSION_BUDGET
                now = self.now()  # (once a pass: a pass is a few ms)
                behind = self._store_behind()
                while admission and clock() < stop:
                    queued_at, msg, addr, conn = admission.popleft()
                    if behind or now - queued_at > ADMISSION_WAIT:
                        self._shed(msg, addr, conn)
                        continue
                    try:
                        code, options = self._register(msg, addr, conn, now, via=None)
                        # (its retransmissions are dropped since it was queued: `_unknown_peer`)
                        self._after_durable(
                            partial(self._reply_direct, msg, addr, conn, code, options, cache=True)
                        )
                    except StoreError:
                        raise
                    except Exception as exc:
                        self.contain(self.by_addr.get(addr) if addr is not None else None,
                                     exc, "a Register")  # fmt: skip
                await trio.lowlevel.checkpoint()

    async def _report(self) -> None:
        """Once a minute at most, one log line with what was refused or dropped since the
        last one (no line per event: a flood must not flood the log too)."""
        last = dict(self.statistics)
        while True:
            await trio.sleep(REPORT_INTERVAL)
            now = dict(self.statistics)
            changed = {k: v - last.get(k, 0) for k, v in now.items() if k in _REFUSALS}
            if any(changed.values()):
                log.warning(
                    "devices, last %d s: %s",
                    REPORT_INTERVAL,
                    ", ".join(f"{k} +{v}" for k, v in changed.items() if v),
                )
            last = now

    def _answer_register(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        code: int,
        options: tuple[coap_message.Option, ...],
    ) -> None:
        """Answer a Register from here once the store holds it; until then its
        retransmissions are dropped, and after it they get the same answer."""
        if addr is not None:
            self._cache_reply(addr, request.mid, None)
        self._after_durable(
            lambda: self._reply_direct(request, addr, conn, code, options, cache=True)
        )

    def _reply_direct(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        code: int,
        options: tuple[coap_message.Option, ...],
        *,
        cache: bool,
    ) -> None:
        if conn is not None:
            self.send_frame(conn, _tcp_frame(Message(0, code, 0, request.token, options)))
            return
        if addr is None:
            return
        if request.mtype == _CON:
            reply = Message(MessageType.ACK, code, request.mid, request.token, options)
        else:
            self._non_mid = mid = (self._non_mid + 1) & 0xFFFF
            reply = Message(MessageType.NON, code, mid, request.token, options)
        data = coap_message.encode(reply)
        if cache:
            self._cache_reply(addr, request.mid, data)
        self.send_datagram(data, addr)

    def _cache_reply(self, addr: Address, mid: int, data: bytes | None) -> None:
        # an OrderedDict: with a plain dict, finding the oldest entry scans the deleted slots
        # at its front, ~63 us per Register once the cache is full (docs/benchmarks.md)
        replies = self._replies
        now = self.now()
        while replies:
            oldest = next(iter(replies.values()))
            if oldest[0] > now and len(replies) < self._reply_cache_size:
                break
            replies.popitem(last=False)
        replies[addr, mid] = (now + self.params.exchange_lifetime, data)

    # -- the registration interface --------------------------------------------------------

    def device_request(self, actor: DeviceActor, request: Message, now: float) -> None:
        """A request from a registered device, after its actor's deduplication."""
        kind = reg_iface.classify(request)
        coap, addr, conn = actor.coap, actor.addr, actor.conn  # what the request came on
        if kind == "register" and self._store_behind():
            self.statistics["registrations_shed"] += 1
            actor.coap.respond(request, Code.SERVICE_UNAVAILABLE, self._retry_after(), b"", now)
            actor.flush(now)
            return
        if kind == "register":
            code, options = self._register(request, addr, conn, now, via=actor)
            if not actor.has_transport() and (addr is not None or conn is not None):
                # another endpoint registered from this address or connection (NAT port
                # reuse, a proxy, a renamed device): it is that device's now, and the answer
                # goes out from here, cached for retransmissions like any new peer's
                self._answer_register(request, addr, conn, code, options)
                return
        elif kind == "update":
            code, options = self._update(actor, request, now)
        elif kind == "deregister":
            code, options = self._deregister(actor, request, now)
        else:
            code, options = Code.NOT_FOUND, ()
        store = self.store
        if (code == Code.CREATED or code == Code.DELETED or code == Code.CHANGED) and not (
            store.is_durable(store.mark())  # (already durable: the memory store)
        ):
            # the 2.01 / 2.02 / 2.04 promises what the store holds (an Update's lifetime and
            # address too: a restart must not expire what a 2.04 renewed): answer once durable,
            # on the transport the request came on
            def answer() -> None:
                later = self.now()
                if coap is not actor.coap or actor.addr != addr or actor.conn is not conn:
                    # the device moved meanwhile (another address, connection or endpoint):
                    # its new transport must not get an answer with the old one's Message ID
                    self._reply_direct(request, addr, conn, code, options, cache=True)
                elif not coap.answered(request):  # (taken twice: its entry expired meanwhile)
                    coap.respond(request, code, options, b"", later)
                    actor.flush(later)

            self._after_durable(answer, actor)
        else:
            actor.coap.respond(request, code, options, b"", now)
            actor.flush(now)

    def _shed(self, request: Message, addr: Address | None, conn: TcpConnection | None) -> None:
        """Refuse a Register the server cannot keep now (its store is behind or failing):
        5.03 Service Unavailable with Max-Age, so the client waits before it tries again
        (LwM2M clients then back off; without an answer they retransmit at once)."""
        self.statistics["registrations_shed"] += 1
        self._reply_direct(
            request, addr, conn, Code.SERVICE_UNAVAILABLE, self._retry_after(), cache=True
        )

    def _retry_after(self) -> tuple[coap_message.Option, ...]:
        return ((OptionNumber.MAX_AGE.value, uint_bytes(self.settings.registration.retry_after)),)

    def store_behind(self) -> bool:
        """Whether the API must refuse writes now (503 STORE_IS_BEHIND): see `_store_behind`."""
        return self._store_behind()

    def _store_behind(self) -> bool:
        """Whether new work must be refused: the store fails to write (a full disk, a
        read-only data directory: it retries) or is too far behind."""
        limit = self._held_limit
        store = self.store
        return not store.healthy() or self._awaiting >= limit or store.backlog() >= limit

    def _after_durable(self, send: Callable[[], None], actor: DeviceActor | None = None) -> None:
        """Run `send` once every write made so far is durable (one group commit for many);
        an exception it raises is contained at `actor`'s boundary (`contain`)."""
        self._held.append((send, actor))
        self._awaiting += 1
        self._held_wake.set()

    async def _release_replies(self) -> None:
        while True:
            await self._held_wake.wait()
            self._held_wake = trio.Event()
            batch, self._held = self._held, []
            await self.store.durable()
            self._awaiting -= len(batch)
            for send, actor in batch:
                try:
                    send()
                except StoreError:
                    raise
                except Exception as exc:
                    self.contain(actor, exc, "an answer held for the store")
            del batch  # do not keep the last batch's requests alive while waiting

    def _new_reg_id(self) -> str:
        """An unguessable registration id: it is what authorises Updates (rule 0)."""
        while (reg_id := secrets.token_hex(6)) in self.by_reg_id:
            pass
        return reg_id

    def _register(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        now: float,
        *,
        via: DeviceActor | None,
    ) -> reg_iface.Response:
        r = self.settings.registration
        parsed = reg_iface.parse_register(request, r.default_lifetime, r.max_lifetime, r.max_links)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if conn is None and "U" not in parsed.binding:  # (b=T or b=S over UDP)
            return Code.BAD_REQUEST, ()
        reg = Registration.from_request(parsed, self._new_reg_id(), now)
        actor = self.by_endpoint.get(reg.endpoint)
        if actor is not None:
            # bound first: a replaced connection's mail is handled now (`_bind`), and it may
            # hold a Register (handled in full, nested) or a De-register (the actor ends)
            self._bind(actor, addr, conn)
            if actor.mailbox.closed:
                actor = None
        if actor is None:
            actor = DeviceActor(
                self, reg, DeviceQueue(self.policy, queue_mode=reg.queue_mode, now=now), None, None
            )
            self.by_endpoint[reg.endpoint] = actor
            self.endpoint_names.add(reg.endpoint)
            self._bind(actor, addr, conn)
            assert self._nursery is not None, "Supervisor.run() is not running"
            self._nursery.start_soon(actor.run, name="device")  # one shared name string
            self._apply_presubscriptions(actor, now)
            if actor.reg is not reg:
                # binding handled the address's earlier mail, and a Register of this
                # endpoint in it (a later one, nested) made a registration already: it
                # stands, and this Register is answered with it (the device's last id)
                return reg_iface.created(actor.reg.reg_id)
        else:
            # rule 8.1: the same endpoint registers again; the queue is kept
            self.by_reg_id.pop(actor.reg.reg_id, None)
            actor.reg = reg
            actor.queue.queue_mode = reg.queue_mode
            actor.forget_observations()
            self.observe_again(actor, now)  # rule 9.3
            actor.queue.contact(now)
            if via is not actor:
                self._tell(actor, Signal.WAKE)
        self.by_reg_id[reg.reg_id] = actor
        self._watch_lifetime(reg)
        self.store.put_registration(registration_record(reg, self.wall_offset, actor.addr))
        self.statistics["registrations"] += 1
        self.events.publish("registrations", registration_item(reg))
        return reg_iface.created(reg.reg_id)

    def _bind(self, actor: DeviceActor, addr: Address | None, conn: TcpConnection | None) -> None:
        now = self.now()
        if (actor.addr is not None and actor.addr != addr) or (
            actor.conn is not None and actor.conn is not conn
        ):
            # what came on the old address or connection first (an answer, say; a request is
            # answered there) is handled while the actor still has it; nothing new starts
            actor.drain(now)
            if actor.mailbox.closed:
                return  # (a De-register was among it)
        if actor.addr is not None and actor.addr != addr and self.by_addr.get(actor.addr) is actor:
            del self.by_addr[actor.addr]
        replaced = actor.conn is not None and actor.conn is not conn
        if replaced:  # a new connection (or UDP) before the old one was seen to close
            assert actor.conn is not None
            self.by_conn.pop(actor.conn, None)
            actor.conn = None
        reliable = conn is not None
        if actor.coap.reliable != reliable:
            actor.coap = self.new_coap_endpoint(reliable=reliable)
            actor.abandon_attempt(now)
            replaced = True  # the old endpoint's observations are gone with it
        actor.addr = addr
        actor.conn = conn
        if replaced:
            actor.transport_lost(now)
        if addr is not None:
            previous = self.by_addr.get(addr)
            if previous is not None and previous is not actor:
                # another endpoint now speaks from its address: what came from there first
                # is handled (and answered) now; what it sent there fails and an attempt
                # not yet sent goes back to its queue (as on ICMP)
                previous.drain(now)
                previous.addr = None
                self._tell(previous, Signal.UNREACHABLE)
            self.by_addr[addr] = actor
        if conn is not None:
            previous = self.by_conn.get(conn)
            if previous is not None and previous is not actor:
                previous.drain(now)
                previous.conn = None  # what it sent on it fails on its next step
                self._tell(previous, Signal.UNREACHABLE)
            self.by_conn[conn] = actor

    def _update(self, actor: DeviceActor, request: Message, now: float) -> reg_iface.Response:
        r = self.settings.registration
        parsed = reg_iface.parse_update(request, r.max_lifetime, r.max_links)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if actor.conn is None and parsed.binding is not None and "U" not in parsed.binding:
            return Code.BAD_REQUEST, ()
        if parsed.reg_id != actor.reg.reg_id:
            return Code.NOT_FOUND, ()
        if self._store_behind():  # its 2.04 would promise what the store cannot keep now
            self.statistics["registrations_shed"] += 1
            return Code.SERVICE_UNAVAILABLE, self._retry_after()
        reg = actor.reg.apply_update(parsed, now)
        actor.reg = reg
        actor.queue.queue_mode = reg.queue_mode
        self._watch_lifetime(reg)
        self.store.put_registration(registration_record(reg, self.wall_offset, actor.addr))
        self.events.publish("reg-updates", registration_item(reg))
        return reg_iface.changed()

    def _deregister(self, actor: DeviceActor, request: Message, now: float) -> reg_iface.Response:
        parsed = reg_iface.parse_deregister(request)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if parsed.reg_id != actor.reg.reg_id:
            return Code.NOT_FOUND, ()
        if self._store_behind():  # its 2.02 would wait for the store: come back later
            self.statistics["registrations_shed"] += 1
            return Code.SERVICE_UNAVAILABLE, self._retry_after()
        actor.end(now, expired=False)
        return reg_iface.deleted()

    def device_ended(self, actor: DeviceActor, *, expired: bool) -> None:
        """Called by the actor as it ends (rules 8.2, 8.3)."""
        ep = actor.endpoint
        if self.by_endpoint.get(ep) is actor:
            del self.by_endpoint[ep]
            self.endpoint_names.discard(ep)
        self.by_reg_id.pop(actor.reg.reg_id, None)
        if actor.addr is not None and self.by_addr.get(actor.addr) is actor:
            del self.by_addr[actor.addr]
        if actor.conn is not None:
            self.by_conn.pop(actor.conn, None)
        self.store.delete_registration(ep)
        self.events.publish("registrations-expired" if expired else "de-registrations", ep)

    # -- sweeps -----------------------------------------------------------------------------

    async def _expiry_sweeper(self) -> None:
        """Rule 5.2: every `expiry_sweep_interval` seconds, expired commands finish."""
        interval = self.settings.delivery.expiry_sweep_interval
        while True:
            await trio.sleep(interval)
            for actor in self.by_endpoint.values():
                if actor.queue.queue:
                    self._tell(actor, Signal.SWEEP)

    def _watch_lifetime(self, reg: Registration) -> None:
        expires_at = reg.expires_at(self.registration_grace)
        heap = self._lifetimes
        if len(heap) > 2 * len(self.by_endpoint) + 1024:
            # every Update pushes an entry and the stale ones leave only when due: rebuild
            # from the live registrations (amortised O(1) per push; bounded whatever peers do)
            grace = self.registration_grace
            heap[:] = [
                (a.reg.expires_at(grace), ep, a.reg.reg_id) for ep, a in self.by_endpoint.items()
            ]
            heapq.heapify(heap)
        heapq.heappush(heap, (expires_at, reg.endpoint, reg.reg_id))
        scope = self._lifetime_scope
        if scope is not None and expires_at < scope.deadline:
            scope.deadline = expires_at

    async def _lifetime_sweeper(self) -> None:
        """Rule 8.3: a registration without an Update within its lifetime (+ grace) ends."""
        heap = self._lifetimes
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._lifetime_scope = scope
                await trio.sleep_forever()
            self._lifetime_scope = None
            now = self.now()
            while heap and heap[0][0] <= now:
                _, endpoint, reg_id = heapq.heappop(heap)
                actor = self.by_endpoint.get(endpoint)
                if actor is None or actor.reg.reg_id != reg_id:
                    continue
                if actor.reg.expires_at(self.registration_grace) <= now:
                    self._tell(actor, Signal.EXPIRED)

    # -- what the actors report -------------------------------------------------------------

    def command_finished(self, actor: DeviceActor, cmd: Command, outcome: Outcome) -> None:
        """The command ended: its AsyncIDResponse replaces it in the store, in the same
        commit, and goes to the channel once durable; the channel's delivery forgets it
        (`events_delivered`). A crash in between re-sends it after the restart, with the
        same `seq` (at least once; `include_uid` lets a client drop the repeat)."""
        self.store.delete_command(actor.endpoint, cmd.async_id)
        if cmd.observe:
            return
        item = outcome.as_async_response(cmd.async_id)
        self._event_seq += 1
        seq = self._event_seq
        owner = cmd.owner
        self.store.put_event(
            EventRecord(owner, seq, _ASYNC, _json(item), self.now() + self.wall_offset)
        )
        owners = frozenset((owner,))
        self._after_durable(lambda: self.events.publish(_ASYNC, item, owners, seq))

    def events_delivered(self, owner: str, seqs: list[int]) -> None:
        """`owner`'s channel delivered (or dropped) its stored events `seqs`: forget them."""
        self.store.delete_events(owner, seqs)

    def keep_event(self, owner: str, kind: str, item: Item) -> int:
        """Store an event that waits in `owner`'s channel (see `NotificationHub.spill`), so
        that it is still owed after a restart; returns its `seq`."""
        self._event_seq += 1
        seq = self._event_seq
        self.store.put_event(
            EventRecord(owner, seq, kind, _json(item), self.now() + self.wall_offset)
        )
        return seq

    def notification(self, actor: DeviceActor, uri: str, outcome: Outcome) -> None:
        item: dict[str, object] = {"ep": actor.endpoint, "path": uri}
        response = outcome.as_async_response("")
        for key in ("ct", "payload", "max-age"):
            if key in response:
                item[key] = response[key]
        item.setdefault("payload", "")
        owners = (actor.subscriptions or {}).get(uri)
        if owners:
            self.events.publish("notifications", item, frozenset(owners))

    # -- the in-process API -----------------------------------------------------------------

    async def submit(
        self,
        device_id: str,
        method: str,
        uri: str,
        *,
        async_id: str,
        payload: bytes = b"",
        content_format: int | None = None,
        accept: int | None = None,
        retry: int | None = None,
        expiry: int | None = None,
        owner: str = "",
    ) -> Accepted | Rejected:
        """Accept a device request (delivery.md section 1) or say why not.

        `owner` names the application whose notification channel gets the AsyncIDResponse.
        """
        if not ASYNC_ID.match(async_id):
            return Rejected(400, "MALFORMED_ASYNC_ID")
        if method not in METHODS:
            return Rejected(400, "MALFORMED_JSON_CONTENT")
        if retry is not None and not 0 <= retry <= MAX_RETRY:
            return Rejected(400, "MALFORMED_RETRY")
        if expiry is not None and not MIN_EXPIRY <= expiry <= MAX_EXPIRY:
            return Rejected(400, "MALFORMED_EXPIRY_SECONDS")
        actor = self.by_endpoint.get(device_id)
        if actor is None:
            return Rejected(404, "DEVICE_NOT_FOUND")
        checked = self._check_uri(actor, method, uri, payload)
        if isinstance(checked, Rejected):
            return checked
        if self._store_behind():
            return Rejected(503, "STORE_IS_BEHIND")  # nothing is accepted that it cannot keep
        now = self.now()
        cmd = self._command(actor, async_id, method, checked, payload, content_format, accept,
                            retry, expiry, now, owner=owner)  # fmt: skip
        verdict = actor.queue.submit(cmd, now)
        if verdict is Verdict.ASYNC_ID_IN_USE:
            return Rejected(409, "ASYNC_ID_IN_USE")
        if verdict is Verdict.QUEUE_IS_FULL:
            return Rejected(429, "QUEUE_IS_FULL")
        if verdict is Verdict.DUPLICATE:
            await self.store.durable()  # the first acceptance may still be on its way
            return Accepted(duplicate=True)
        if method == "GET" and accept is None and len(actor.queue) == 1:
            # only with nothing ahead of it: a queued PUT may change the value, and answers
            # must come in the order the commands were accepted
            fresh = actor.cached(cmd.uri, now)
            if fresh is not None:
                # answered from the cache: its AsyncIDResponse is written now and the 202
                # waits for it like any acceptance (a crash in between would lose it)
                actor.queue.finish_now(cmd, fresh, now)
                for done, outcome in actor.queue.take_finished():
                    self.command_finished(actor, done, outcome)
                await self.store.durable()
                return Accepted()
        if actor.start_now(cmd, now):  # one write: the command and its attempt's MID, token
            try:
                await self.store.durable()
                actor.flush(self.now())  # the request leaves with the 202
            finally:
                self._tell(actor, Signal.WAKE)
            return Accepted()
        self.persist_command(device_id, cmd)
        await self.store.durable()
        self._tell(actor, Signal.WAKE)
        return Accepted()

    def _check_uri(
        self, actor: DeviceActor, method: str, uri: str, payload: bytes
    ) -> str | Rejected:
        """Rules 1.2, 1.4 and 9.4: the normalised uri, or the rejection."""
        text, _, query = uri.partition("?")
        if not text.startswith("/"):
            text = "/" + text
        try:
            path = parse_path(text)
        except InvalidPath:
            return Rejected(400, "MALFORMED_JSON_CONTENT")
        if not actor.reg.objects.contains(path):
            return Rejected(404, "URI_PATH_DOES_NOT_EXISTS")
        if query and method == "PUT" and not payload:
            try:
                parse_attributes(query)
            except InvalidAttributes:
                return Rejected(400, "MALFORMED_NOTIFICATION_RULES")
        return f"{path}?{query}" if query else str(path)

    def _command(
        self,
        actor: DeviceActor,
        async_id: str,
        method: str,
        uri: str,
        payload: bytes,
        content_format: int | None,
        accept: int | None,
        retry: int | None,
        expiry: int | None,
        now: float,
        *,
        observe: bool = False,
        owner: str = "",
    ) -> Command:
        d = self.settings.delivery
        queue_mode = actor.reg.queue_mode
        if retry is None:
            retry = d.default_retry_queue_mode if queue_mode else d.default_retry
        if expiry is None:
            expiry = d.default_expiry_queue_mode if queue_mode else d.default_expiry
        return Command(async_id, method, uri, payload, content_format, accept, now,
                       now + expiry, 1 + retry, observe, owner)  # fmt: skip

    async def subscribe(self, device_id: str, path: str, owner: str = "") -> Accepted | Rejected:
        """Rule 9.1: observe `path` for `owner`; the subscription outlives registrations (9.3)."""
        actor = self.by_endpoint.get(device_id)
        if actor is None:
            return Rejected(404, "DEVICE_NOT_FOUND")
        checked = self._check_uri(actor, "GET", path, b"")
        if isinstance(checked, Rejected):
            return checked
        if self._store_behind():
            return Rejected(503, "STORE_IS_BEHIND")
        if self._add_subscription(actor, checked, owner, self.now()) is Verdict.QUEUE_IS_FULL:
            return Rejected(429, "QUEUE_IS_FULL")
        await self.store.durable()
        self._tell(actor, Signal.WAKE)
        return Accepted()

    def observe_again(self, actor: DeviceActor, now: float) -> None:
        """The device's observations are gone (it registered again, or its TCP connection
        closed): queue an Observe for every subscribed path (rule 9.3)."""
        for path in sorted(actor.subscriptions or ()):
            self._queue_observe(actor, path, now)

    def _add_subscription(self, actor: DeviceActor, path: str, owner: str, now: float) -> Verdict:
        subscriptions = actor.subscriptions
        if subscriptions is None:
            subscriptions = actor.subscriptions = {}
        owners = subscriptions.get(path)
        if owners is not None and owner in owners:
            return Verdict.DUPLICATE
        if owners is None:
            verdict = self._queue_observe(actor, path, now)
            if verdict is Verdict.QUEUE_IS_FULL:
                return verdict
            owners = subscriptions[path] = set()
        owners.add(owner)
        self.store.put_subscription(actor.endpoint, path, owner)
        return Verdict.ACCEPTED

    def _queue_observe(self, actor: DeviceActor, path: str, now: float) -> Verdict:
        queue = actor.queue
        pending = [queue.in_flight, *queue.queue]
        if path in actor.observed_paths() or any(
            c is not None and c.observe and c.uri == path for c in pending
        ):
            return Verdict.DUPLICATE
        self._observe_counter += 1
        async_id = f"{_SUBSCRIPTION_PREFIX}{self._observe_counter}"
        # an Observe waits for the device as long as the longest command may: a subscription
        # outlives registrations (rule 9.3) and a device away for days (after its connection
        # closed, say) is observed again when it is back
        cmd = self._command(actor, async_id, "GET", path, b"", None, None,
                            None, MAX_EXPIRY, now, observe=True)  # fmt: skip
        verdict = queue.submit(cmd, now)
        if verdict is Verdict.ACCEPTED:
            self.persist_command(actor.endpoint, cmd)
        return verdict

    def unsubscribe(self, device_id: str, path: str, owner: str = "") -> bool:
        """Remove `owner`'s subscription; the observation ends with the last subscriber."""
        actor = self.by_endpoint.get(device_id)
        text = path if path.startswith("/") else "/" + path
        owners = (
            None if actor is None or actor.subscriptions is None else actor.subscriptions.get(text)
        )
        if actor is None or owners is None or owner not in owners:
            return False
        owners.discard(owner)
        if not owners:
            assert actor.subscriptions is not None
            del actor.subscriptions[text]
            actor.cancel_observation(text)
        self.store.delete_subscription(device_id, text, owner)
        return True

    def subscriptions_of(self, device_id: str, owner: str | None = None) -> list[str] | None:
        """The paths `owner` (or anyone, for None) subscribed to; None for an unknown device."""
        actor = self.by_endpoint.get(device_id)
        if actor is None:
            return None
        subscriptions = actor.subscriptions or {}
        return sorted(p for p, owners in subscriptions.items() if owner is None or owner in owners)

    def set_presubscriptions(self, owner: str, presubscriptions: list[Presubscription]) -> None:
        """Replace `owner`'s pre-subscriptions; they apply to devices registering from now on."""
        if presubscriptions:
            self.presubscriptions[owner] = list(presubscriptions)
        else:
            self.presubscriptions.pop(owner, None)
        self.store.set_presubscriptions(
            owner,
            [
                PresubscriptionRecord(p.endpoint_name, p.endpoint_type, p.resource_paths)
                for p in presubscriptions
            ],
        )

    def _apply_presubscriptions(self, actor: DeviceActor, now: float) -> None:
        if not self.presubscriptions:
            return
        for owner, presubscriptions in self.presubscriptions.items():
            for pre in presubscriptions:
                if not pre.matches_device(actor.endpoint, actor.reg.endpoint_type):
                    continue
                for pattern in pre.resource_paths:
                    for path in self._expand(actor, pattern):
                        self._add_subscription(actor, path, owner, now)

    @staticmethod
    def _expand(actor: DeviceActor, pattern: str) -> list[str]:
        text = pattern if pattern.startswith("/") else "/" + pattern
        if not text.endswith("*"):
            try:
                path = parse_path(text)
            except InvalidPath:
                return []
            return [str(path)] if actor.reg.objects.contains(path) else []
        prefix = text[:-1]  # "/3/0/*" covers /3/0 itself: registrations name instances only
        return [str(p) for p in actor.reg.objects.paths() if f"{p}/".startswith(prefix)]


def _check(msg: Message) -> None:
    """Refuse what a peer without an actor sent wrongly (its actor's endpoint does this later).

    Raises:
        DecodeError: an unrecognised critical option, or a path or query that is not UTF-8.
    """
    coap_message.check_options(msg)
    if msg.code:
        msg.uri_path  # noqa: B018
        msg.uri_query  # noqa: B018


def _resources(objects: RegisteredObjects) -> list[dict[str, object]]:
    """`EndpointData.resources` of an object list (shared by devices of one kind; read-only;
    a long list is built each time, not kept: see `link_format.SHARED_ENTRIES`)."""
    if len(objects.paths()) > SHARED_ENTRIES:
        return _build_resources(objects)
    return _shared_resources(objects)


def _build_resources(objects: RegisteredObjects) -> list[dict[str, object]]:
    return [{"path": str(p), "obs": True} for p in objects.paths()]


_shared_resources = lru_cache(maxsize=256)(_build_resources)


def registration_item(reg: Registration) -> dict[str, object]:
    """The Pelion `EndpointData` of a registration event."""
    item: dict[str, object] = {"ep": reg.endpoint, "original-ep": reg.endpoint}
    if reg.endpoint_type is not None:
        item["ept"] = reg.endpoint_type
    item["q"] = reg.queue_mode
    item["resources"] = _resources(reg.objects)
    return item


def _tcp_frame(msg: Message) -> bytes:
    from dm_actor.coap.framing_tcp import encode

    return encode(msg)
