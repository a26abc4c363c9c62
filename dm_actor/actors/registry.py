"""The registry: what every part of the supervisor shares, and the bottom of the actor package.

It owns the index maps of the device actors (by endpoint name, registration id, address and
TCP connection), the counters (`statistics`), the durability gate (answers held until the
store has committed what they promise, and the refusal of new work while it is behind), the
way out (`send_datagram` / `send_frame`), the crash boundary (`contain`) and the settings,
store and event stream. It never decides anything of the protocol: routing, registration,
commands and subscriptions are the files above it (`router`, `registrar`, `commands`,
`subscriptions`), which share it and never import each other downwards-up.
"""

from __future__ import annotations

import logging
import random
import secrets
from typing import TYPE_CHECKING, Protocol

import trio
from sortedcontainers import SortedList

from dm_actor.actors.directory import Directory
from dm_actor.actors.mailbox import MailboxClosed, Overloaded
from dm_actor.actors.persist import command_record, registration_record
from dm_actor.address import SESSION_HOST
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.framing_tcp import BASE_MAX_MESSAGE_SIZE
from dm_actor.delivery.queue import DeliveryPolicy
from dm_actor.device.machine import MachineConfig
from dm_actor.histogram import LATENCY_BOUNDS, Histogram
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.actors.device import DeviceActor, Signal
    from dm_actor.actors.events import EventStream
    from dm_actor.actors.host import TcpConnection
    from dm_actor.address import Address
    from dm_actor.coap.message import Message
    from dm_actor.coap.numbers import TransmissionParameters
    from dm_actor.config import Settings
    from dm_actor.delivery.queue import Command
    from dm_actor.lwm2m.registration import Registration
    from dm_actor.store.base import RegistrationRecord, Store

log = logging.getLogger(__name__)


class ClusterHooks(Protocol):
    """What the device layer asks cluster mode (`dm_actor.node.ClusterNode` answers)."""

    def token_prefix(self, endpoint: str) -> bytes:
        """The bytes every token sent to `endpoint` starts with (its slot)."""
        ...

    def reg_id(self, endpoint: str) -> str:
        """A new registration id for `endpoint`, naming its slot."""
        ...

    def egress(self, data: bytes, addr: Address) -> bool:
        """True when this datagram to a device was taken care of here: dropped because the
        node is past its lease deadline, or sent back out through the node it came in by."""
        ...

    def ingress_of(self, addr: Address) -> str | None:
        """The node a device at `addr` talks to, when not this one (stored with its
        registration, so that a new owner sends through it too)."""
        ...

    def adopted(self, addr: Address, ingress: str) -> None:
        """A device adopted from the store talks to node `ingress`: send through it."""
        ...


def _plain(addr: Address) -> str | None:
    """No DTLS: every address is plain CoAP's."""
    return None


def _frame_limit(conn: object) -> int:
    """The largest frame a TCP connection takes: its peer's CSM Max-Message-Size (the
    transport's `TcpConnection.max_message_size`; RFC 8323's base 1152 before a CSM)."""
    limit = getattr(conn, "max_message_size", BASE_MAX_MESSAGE_SIZE)
    return limit if isinstance(limit, int) else BASE_MAX_MESSAGE_SIZE


class Registry:
    """The device actors' indexes, counters, durability gate and way out (one per server)."""

    def __init__(
        self, settings: Settings, *, store: Store, events: EventStream, mailbox_size: int
    ) -> None:
        d = settings.delivery
        self.settings = settings
        self.store: Store = store
        self.events = events
        self.mailbox_size = mailbox_size
        self.registration_grace = settings.registration.expiry_grace
        self.wall_offset = 0.0  # wall-clock minus Trio time; set when `Supervisor.run` starts
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
        # the devices that left, still listed as `deregistered` for a while (bounded)
        r = settings.registration
        self.directory = Directory(r.directory_retention, r.directory_max)
        self.by_reg_id: dict[str, DeviceActor] = {}
        self.by_addr: dict[Address, DeviceActor] = {}
        self.by_conn: dict[TcpConnection, DeviceActor] = {}
        # answers waiting for `store.durable()`, with the device whose answer it is
        self._held: list[tuple[Callable[[], None], DeviceActor | None]] = []
        # beyond this many answers waiting for the store, or writes not yet committed (a
        # stalled disk), new Registers are shed and new commands refused until it catches up
        self.held_limit = 100_000
        self.awaiting = 0  # answers held or being committed
        self._held_wake = trio.Event()
        self.nursery: trio.Nursery | None = None  # the actors' (set by `Supervisor.run`)
        #: cluster mode's hooks (`dm_actor.node`), None on a single node
        self.cluster: ClusterHooks | None = None
        self._rng = random.Random(secrets.randbits(64))  # one for all endpoints
        self._udp_send: Callable[[bytes, Address], None] | None = None
        self._dtls_send: Callable[[bytes, Address], None] | None = None
        self._dtls_release: Callable[[Address], None] | None = None
        #: the PSK identity of a DTLS session's address (`address.session_address`), None
        #: for plain CoAP (set by `attach_dtls`)
        self.identity_of: Callable[[Address], str | None] = _plain
        # what every device machine shares
        self.machine_config = MachineConfig(
            new_endpoint=self._machine_endpoint,
            resend_window=self.resend_window,
            registration_grace=self.registration_grace,
            frame_limit=_frame_limit,
            retry_after=settings.registration.retry_after,
        )
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
            # what /metrics reads (dm_actor.api.metrics), never logged by `_report`
            "updates": 0,
            "deregistrations": 0,
            "expirations": 0,
            "commands_accepted": 0,
            "retransmissions": 0,  # CoAP requests sent again (no ACK in time)
            "coap_timeouts": 0,  # CoAP requests given up after the last retransmission
        }
        # commands finished, by (status, error), and their 202-to-AsyncIDResponse latency
        self.outcomes: dict[tuple[int, str | None], int] = {}
        self.delivery_latency = Histogram(LATENCY_BOUNDS)

    # -- wiring ---------------------------------------------------------------------------

    def attach_udp(self, send: Callable[[bytes, Address], None]) -> None:
        self._udp_send = send

    def attach_dtls(
        self,
        send: Callable[[bytes, Address], None],
        identity_of: Callable[[Address], str | None],
        release: Callable[[Address], None],
    ) -> None:
        """Datagrams to session addresses go out through `send` (the DTLS transport's); a
        session whose registration ended is `release`d."""
        self._dtls_send = send
        self._dtls_release = release
        self.identity_of = identity_of

    def new_coap_endpoint(
        self, *, reliable: bool, mid_start: int | None = None, token_prefix: bytes = b""
    ) -> CoapEndpoint:
        seed = secrets.randbits(32)
        return CoapEndpoint(
            self.params,
            reliable=reliable,
            rng=None if self.params.ack_random_factor == 1.0 else self._rng,
            mid_start=seed & 0xFFFF if mid_start is None else mid_start,
            token_seed=seed,
            dedup_limit=16,
            token_prefix=token_prefix,
        )

    def _machine_endpoint(
        self, reliable: bool, mid_start: int | None, endpoint: str
    ) -> CoapEndpoint:
        prefix = b"" if self.cluster is None else self.cluster.token_prefix(endpoint)
        return self.new_coap_endpoint(reliable=reliable, mid_start=mid_start, token_prefix=prefix)

    def new_reg_id(self, endpoint: str) -> str:
        """An unguessable registration id: it is what authorises Updates (rule 0). In
        cluster mode it names the endpoint's slot (`ClusterHooks.reg_id`)."""
        cluster = self.cluster
        while True:
            reg_id = secrets.token_hex(6) if cluster is None else cluster.reg_id(endpoint)
            if reg_id not in self.by_reg_id:
                return reg_id

    def record(self, actor: DeviceActor, reg: Registration) -> RegistrationRecord:
        """What the store keeps of `actor`'s registration `reg` (with the cluster node its
        datagrams come in by, in cluster mode)."""
        cluster, addr = self.cluster, actor.addr
        ingress = None if cluster is None or addr is None else cluster.ingress_of(addr)
        return registration_record(reg, self.wall_offset, addr, ingress)

    def send_datagram(self, data: bytes, addr: Address) -> None:
        cluster = self.cluster
        if cluster is not None and cluster.egress(data, addr):
            return  # (held back past the lease deadline, or sent back through its ingress)
        send = self._dtls_send if addr[0] == SESSION_HOST else self._udp_send
        if send is not None:
            try:
                send(data, addr)
            except trio.ClosedResourceError:
                log.debug("UDP endpoint closed: a datagram to %s is dropped (shutdown)", addr)

    def send_frame(self, conn: TcpConnection, frame: bytes) -> None:
        try:
            conn.send_frame_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.statistics["frames_dropped"] += 1  # (summed up in `_report`, not a line each)
            log.debug("dropped a frame to %s: connection full or closing", conn.peer)

    def now(self) -> float:
        return trio.current_time()

    def persist_command(self, endpoint: str, cmd: Command) -> None:
        self.store.put_command(command_record(endpoint, cmd, self.wall_offset))

    def tell(self, actor: DeviceActor, mail: bytes | Message | Signal) -> None:
        try:
            actor.tell(mail)
        except Overloaded:
            self.statistics["mailbox_overloaded"] += 1
        except MailboxClosed:
            pass

    # -- the crash boundary -----------------------------------------------------------------

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

    def device_ended(self, actor: DeviceActor, *, expired: bool) -> None:
        """Called by the actor as it ends (rules 8.2, 8.3)."""
        ep = actor.endpoint
        if self.by_endpoint.get(ep) is actor:
            del self.by_endpoint[ep]
            self.endpoint_names.discard(ep)
            self.directory.retain(actor.reg, self.now())
        self.by_reg_id.pop(actor.reg.reg_id, None)
        addr = actor.addr
        if addr is not None and self.by_addr.get(addr) is actor:
            del self.by_addr[addr]
            if addr[0] == SESSION_HOST and self._dtls_release is not None:
                self._dtls_release(addr)  # (its DTLS session closes a little later)
        if actor.conn is not None:
            self.by_conn.pop(actor.conn, None)
        self.store.delete_registration(ep)
        self.statistics["expirations" if expired else "deregistrations"] += 1
        self.events.publish("registrations-expired" if expired else "de-registrations", ep)

    # -- the durability gate ----------------------------------------------------------------

    def store_behind(self) -> bool:
        """Whether new work must be refused (the API answers 503 STORE_IS_BEHIND): the store
        fails to write (a full disk, a read-only data directory: it retries) or is too far
        behind."""
        limit = self.held_limit
        store = self.store
        return not store.healthy() or self.awaiting >= limit or store.backlog() >= limit

    def after_durable(self, send: Callable[[], None], actor: DeviceActor | None = None) -> None:
        """Run `send` once every write made so far is durable (one group commit for many);
        an exception it raises is contained at `actor`'s boundary (`contain`)."""
        self._held.append((send, actor))
        self.awaiting += 1
        self._held_wake.set()

    async def release_replies(self) -> None:
        while True:
            await self._held_wake.wait()
            self._held_wake = trio.Event()
            batch, self._held = self._held, []
            await self.store.durable()
            self.awaiting -= len(batch)
            for send, actor in batch:
                try:
                    send()
                except StoreError:
                    raise
                except Exception as exc:
                    self.contain(actor, exc, "an answer held for the store")
            del batch  # do not keep the last batch's requests alive while waiting
