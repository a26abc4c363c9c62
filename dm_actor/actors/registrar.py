"""The registrar: the LwM2M registration interface (Register, Update, De-register) on the server.

It owns what a registration request does to the registry: a new device actor (spawned in the
actors' nursery) or a registration renewed on the existing one (rule 8.1, its queue kept),
the binding of a device to the address or TCP connection it last spoke from (rule 0: the
registration id is the proof), the lifetime heap and its sweeper (rule 8.3), the answers to
peers that have no actor yet (and their cache, for retransmissions) and the 5.03 that sheds a
Register the server cannot keep now. It never routes a datagram (the router gives it the
requests) and never touches a command or a subscription beyond asking `subscriptions` to
observe again.
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections import OrderedDict
from typing import TYPE_CHECKING

import trio

from dm_actor.actors.device import Signal
from dm_actor.actors.provisioning import IdentityRules
from dm_actor.actors.refusals import Refusals
from dm_actor.coap import framing_tcp, message as coap_message
from dm_actor.coap.message import Message, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.credentials import Credentials
from dm_actor.delivery.queue import DeviceQueue
from dm_actor.lwm2m import registration as reg_iface, send as lwm2m_send
from dm_actor.lwm2m.registration import Registration, RegistrationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.host import TcpConnection
    from dm_actor.actors.registry import Registry
    from dm_actor.actors.subscriptions import Subscriptions
    from dm_actor.address import Address

_CON = MessageType.CON.value
_BLOCK1 = OptionNumber.BLOCK1.value


class Registrar(IdentityRules):
    """Registers, updates and de-registers devices, and ends those whose lifetime passed."""

    def __init__(
        self,
        registry: Registry,
        subscriptions: Subscriptions,
        new_actor: Callable[[Registration, DeviceQueue], DeviceActor],
        *,
        reply_cache_size: int,
    ) -> None:
        self.registry = registry
        self.subscriptions = subscriptions
        self._new_actor = new_actor  # (the supervisor's: the actor is given its host)
        # replies to Registers from peers that had no actor yet, for retransmissions
        # (None while the answer waits for the store: retransmissions are dropped meanwhile)
        self.replies: OrderedDict[tuple[Address, int], tuple[float, bytes | None]] = OrderedDict()
        self.reply_cache_size = reply_cache_size
        self.lifetimes: list[tuple[float, str, str]] = []  # (expires_at, endpoint, reg_id)
        self._lifetime_scope: trio.CancelScope | None = None
        self._non_mid = secrets.randbits(16)  # Message IDs of NON replies to unknown peers
        self.refusals = Refusals(registry)  # refusals in the log, once each (the router's too)
        # the devices' PSK identities (issue 15): an endpoint listed here is refused over
        # plain CoAP (`admit`); written by `Provisioning` only
        self.credentials = Credentials()

    # -- the registration interface --------------------------------------------------------

    def device_request(self, actor: DeviceActor, request: Message, now: float) -> None:
        """A request from a registered device, after its actor's deduplication."""
        registry = self.registry
        kind = reg_iface.classify(request)
        addr, conn = actor.addr, actor.conn  # what the request came on
        link = actor.machine.link_id
        if kind == "register" and registry.store_behind():
            registry.statistics["registrations_shed"] += 1
            self.refusals.registration(kind, request, addr, conn, Code.SERVICE_UNAVAILABLE, actor)
            actor.respond(request, Code.SERVICE_UNAVAILABLE, self._retry_after(), now)
            return
        if kind == "register":
            code, options = self.register(request, addr, conn, now, via=actor)
            if not actor.has_transport() and (addr is not None or conn is not None):
                # another endpoint registered from this address or connection (NAT port
                # reuse, a proxy, a renamed device): it is that device's now, and the answer
                # goes out from here, cached for retransmissions like any new peer's
                self.answer_held(request, addr, conn, code, options, None, 0)
                return
        elif kind == "update":
            code, options = self._update(actor, request, now)
        elif kind == "deregister":
            code, options = self._deregister(actor, request, now)
        elif kind == "send":
            # LwM2M Send: nothing of it is stored, so its answer waits for no commit
            actor.respond(request, *self.send(actor, request, now), now)
            return
        else:
            code, options = Code.NOT_FOUND, ()
        if code >= Code.BAD_REQUEST:  # refused: one log line with the reason (refusals.py)
            self.refusals.registration(kind, request, addr, conn, code, actor)
        store = registry.store
        if (code == Code.CREATED or code == Code.DELETED or code == Code.CHANGED) and not (
            store.is_durable(store.mark())  # (already durable: the memory store)
        ):
            # the 2.01 / 2.02 / 2.04 promises what the store holds (an Update's lifetime and
            # address too: a restart must not expire what a 2.04 renewed): answer once durable,
            # on the transport the request came on
            self.answer_held(request, addr, conn, code, options, actor, link)
        else:
            actor.respond(request, code, options, now)

    def send(
        self, actor: DeviceActor, request: Message, now: float, *, body: bytes | None = None
    ) -> reg_iface.Response:
        """An LwM2M Send (`POST /dp`, SenML JSON or CBOR) of a registered device: its values
        go to the applications subscribed to their paths as `notifications`, and the answer
        is 2.04; refused with 4.15 (another format), 4.00 (a malformed body), 4.13 (too
        large), 4.05/4.04 (not `POST /dp`), logged and counted. `body`: the whole body of a
        Send that came in Block1 blocks (`request` is then its last block)."""
        registry = self.registry
        wall = registry.wall_offset + now
        if body is None:
            parsed = lwm2m_send.parse_send(request, wall)
        else:
            parsed = lwm2m_send.parse_body(request.content_format, body, wall)
        stats = registry.statistics
        if isinstance(parsed, lwm2m_send.SendError):
            stats["sends_refused"] = stats.get("sends_refused", 0) + 1
            self.refusals.refuse("Send", request, actor.addr, actor.conn, parsed.code,
                                 parsed.reason)  # fmt: skip
            return parsed.code, ()
        stats["sends"] = stats.get("sends", 0) + 1
        self.subscriptions.sent(actor, parsed)
        return Code.CHANGED, ()

    def shed(self, request: Message, addr: Address | None, conn: TcpConnection | None) -> None:
        """Refuse a Register the server cannot keep now (its store is behind or failing):
        5.03 Service Unavailable with Max-Age, so the client waits before it tries again
        (LwM2M clients then back off; without an answer they retransmit at once)."""
        self.registry.statistics["registrations_shed"] += 1
        self.reply_direct(
            request, addr, conn, Code.SERVICE_UNAVAILABLE, self._retry_after(), cache=True
        )

    def _retry_after(self) -> tuple[coap_message.Option, ...]:
        retry_after = self.registry.settings.registration.retry_after
        return ((OptionNumber.MAX_AGE.value, uint_bytes(retry_after)),)

    def register(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        now: float,
        *,
        via: DeviceActor | None,
    ) -> reg_iface.Response:
        registry = self.registry
        # the PSK identity of the DTLS session it came over (None: plain CoAP)
        identity = None if addr is None else registry.identity_of(addr)
        r = registry.settings.registration
        parsed = reg_iface.parse_register(request, r.default_lifetime, r.max_lifetime, r.max_links)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if (refusal := self.identity_refusal(parsed.endpoint, identity)) is not None:
            return refusal
        if conn is None and "U" not in parsed.binding:  # (b=T or b=S over UDP)
            return Code.BAD_REQUEST, ()
        reg = Registration.from_request(parsed, registry.new_reg_id(parsed.endpoint), now)
        actor = registry.by_endpoint.get(reg.endpoint)
        # bound first: a replaced connection's mail is handled now (`bind`), and it may hold
        # a Register (handled in full, nested) or a De-register (the actor ends)
        if actor is not None and not self.bind(actor, addr, conn):
            actor = None
        if actor is None:
            actor = self._new_actor(
                reg, DeviceQueue(registry.policy, queue_mode=reg.queue_mode, now=now)
            )
            registry.by_endpoint[reg.endpoint] = actor
            registry.endpoint_names.add(reg.endpoint)
            registry.directory.revive(reg.endpoint)  # (its entry as a device that left)
            self.bind(actor, addr, conn)
            assert registry.nursery is not None, "Supervisor.run() is not running"
            registry.nursery.start_soon(actor.run, name="device")  # one shared name string
            self.subscriptions.apply_presubscriptions(actor, now)
            if actor.reg is not reg:
                # binding handled the address's earlier mail, and a Register of this
                # endpoint in it (a later one, nested) made a registration already: it
                # stands, and this Register is answered with it (the device's last id)
                return reg_iface.created(actor.reg.reg_id)
        else:
            # rule 8.1: the same endpoint registers again; the queue is kept
            registry.by_reg_id.pop(actor.reg.reg_id, None)
            actor.reregistered(reg, now)
            self.subscriptions.observe_again(actor, now)  # rule 9.3
        registry.by_reg_id[reg.reg_id] = actor
        self.watch_lifetime(reg)
        registry.store.put_registration(registry.record(actor, reg))
        registry.statistics["registrations"] += 1
        self.publish_registration("registrations", reg)
        return reg_iface.created(reg.reg_id)

    def bind(self, actor: DeviceActor, addr: Address | None, conn: TcpConnection | None) -> bool:
        """Bind `actor` to `addr` or `conn` (`DeviceActor.bind`) and update the indexes; a
        device that spoke from there before loses it (`DeviceActor.lose_transport`). False
        when the actor's earlier mail ended its registration (a De-register was among it)."""
        registry = self.registry
        by_addr, by_conn = registry.by_addr, registry.by_conn
        now = registry.now()
        old = actor.bind(addr, conn, now)
        if old is None:
            return False
        old_addr, old_conn = old
        if old_addr is not None and old_addr != addr and by_addr.get(old_addr) is actor:
            del by_addr[old_addr]
        if old_conn is not None and old_conn is not conn:
            by_conn.pop(old_conn, None)
        if addr is not None:
            previous = by_addr.get(addr)
            if previous is not None and previous is not actor:
                previous.lose_transport(now)
            by_addr[addr] = actor
        if conn is not None:
            previous = by_conn.get(conn)
            if previous is not None and previous is not actor:
                previous.lose_transport(now)
            by_conn[conn] = actor
        return True

    def _update(self, actor: DeviceActor, request: Message, now: float) -> reg_iface.Response:
        registry = self.registry
        r = registry.settings.registration
        parsed = reg_iface.parse_update(request, r.max_lifetime, r.max_links)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if actor.conn is None and parsed.binding is not None and "U" not in parsed.binding:
            return Code.BAD_REQUEST, ()
        if parsed.reg_id != actor.reg.reg_id:
            return Code.NOT_FOUND, ()
        if (refusal := self.session_refusal(actor, actor.addr)) is not None:
            return refusal
        if registry.store_behind():  # its 2.04 would promise what the store cannot keep now
            registry.statistics["registrations_shed"] += 1
            return Code.SERVICE_UNAVAILABLE, self._retry_after()
        reg = actor.reg.apply_update(parsed, now)
        actor.updated(reg)
        self.watch_lifetime(reg)
        registry.store.put_registration(registry.record(actor, reg))
        registry.statistics["updates"] += 1
        self.publish_registration("reg-updates", reg)
        return reg_iface.changed()

    def _deregister(self, actor: DeviceActor, request: Message, now: float) -> reg_iface.Response:
        parsed = reg_iface.parse_deregister(request)
        if isinstance(parsed, RegistrationError):
            return reg_iface.error(parsed)
        if parsed.reg_id != actor.reg.reg_id:
            return Code.NOT_FOUND, ()
        if self.registry.store_behind():  # its 2.02 would wait for the store: come back later
            self.registry.statistics["registrations_shed"] += 1
            return Code.SERVICE_UNAVAILABLE, self._retry_after()
        actor.end(now, expired=False)
        return reg_iface.deleted()

    # -- answers to peers without an actor --------------------------------------------------

    def answer_held(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        code: int,
        options: tuple[coap_message.Option, ...],
        actor: DeviceActor | None,
        link: int,
    ) -> None:
        """Answer once the store holds what the answer promises: through `actor`, if it
        still speaks on the transport the request came on (`link`), else from here (cached
        for retransmissions, which are dropped until then). A device registered by it hears
        its 2.01 before any request of ours (Wakaama ignores requests until registered; a
        waking Anjay registers anew from a new port: issue 13 item 5)."""
        registry = self.registry
        if actor is None and addr is not None:
            self.cache_reply(addr, request.mid, None)
        registered = None
        if code == Code.CREATED:
            registered = registry.by_conn.get(conn) if conn is not None else None
            if registered is None and addr is not None:
                registered = registry.by_addr.get(addr)
            if registered is not None:
                registered.answer_pending()

        def answer() -> None:
            try:
                if actor is None or actor.machine.link_id != link:
                    # (the device moved meanwhile: its new transport must not get an answer
                    # with the old one's Message ID)
                    self.reply_direct(request, addr, conn, code, options, cache=True)
                else:
                    actor.respond(request, code, options, registry.now())
            finally:
                if registered is not None:
                    registered.answer_sent(registry.now())

        registry.after_durable(answer, actor)

    def reply_direct(
        self,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        code: int,
        options: tuple[coap_message.Option, ...],
        *,
        cache: bool,
    ) -> None:
        block1 = request.option(_BLOCK1)
        if block1 is not None and code != Code.CONTINUE:  # (a request in blocks: echoed, 2.5)
            options = coap_message.sort_options((*options, (_BLOCK1, block1)))
        if conn is not None:
            self.registry.send_frame(conn, tcp_frame(Message(0, code, 0, request.token, options)))
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
            self.cache_reply(addr, request.mid, data)
        self.registry.send_datagram(data, addr)

    def cache_reply(self, addr: Address, mid: int, data: bytes | None) -> None:
        # an OrderedDict: with a plain dict, finding the oldest entry scans the deleted slots
        # at its front, ~63 us per Register once the cache is full (docs/benchmarks.md)
        replies = self.replies
        now = self.registry.now()
        while replies:
            oldest = next(iter(replies.values()))
            if oldest[0] > now and len(replies) < self.reply_cache_size:
                break
            replies.popitem(last=False)
        replies[addr, mid] = (now + self.registry.params.exchange_lifetime, data)

    # -- lifetimes --------------------------------------------------------------------------

    def watch_lifetime(self, reg: Registration) -> None:
        registry = self.registry
        expires_at = reg.expires_at(registry.registration_grace)
        heap = self.lifetimes
        if len(heap) > 2 * len(registry.by_endpoint) + 1024:
            # every Update pushes an entry and the stale ones leave only when due: rebuild
            # from the live registrations (amortised O(1) per push; bounded whatever peers do)
            grace = registry.registration_grace
            heap[:] = [
                (a.reg.expires_at(grace), ep, a.reg.reg_id)
                for ep, a in registry.by_endpoint.items()
            ]
            heapq.heapify(heap)
        heapq.heappush(heap, (expires_at, reg.endpoint, reg.reg_id))
        scope = self._lifetime_scope
        if scope is not None and expires_at < scope.deadline:
            scope.deadline = expires_at

    async def lifetime_sweeper(self) -> None:
        """Rule 8.3: a registration without an Update within its lifetime (+ grace) ends."""
        registry = self.registry
        heap = self.lifetimes
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._lifetime_scope = scope
                await trio.sleep_forever()
            self._lifetime_scope = None
            now = registry.now()
            while heap and heap[0][0] <= now:
                _, endpoint, reg_id = heapq.heappop(heap)
                actor = registry.by_endpoint.get(endpoint)
                if actor is None or actor.reg.reg_id != reg_id:
                    continue
                if actor.reg.expires_at(registry.registration_grace) <= now:
                    registry.tell(actor, Signal.EXPIRED)


def tcp_frame(msg: Message) -> bytes:
    return framing_tcp.encode(msg)
