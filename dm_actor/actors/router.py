"""The router: where what the transports receive goes.

It holds one rule: a known peer's bytes go to its actor's mailbox, undecoded. A datagram or
message from a peer without an actor is decoded and checked here: a retransmitted Register
gets its cached answer, a new Register waits in the bounded admission queue (served by the
`admit` task a few milliseconds per scheduler pass, or shed with 5.03), an Update or
De-register naming a known registration id re-binds its device, anything else is refused. It
also carries an ICMP error or a TCP close to the actor concerned. Every exception a peer's
input raises is contained at that peer's boundary (`Registry.contain`). It never registers
a device itself (the registrar does) and never decodes a known device's datagrams.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import trio

from dm_actor.actors.device import Signal
from dm_actor.actors.mailbox import MailboxClosed, Overloaded
from dm_actor.actors.registrar import tcp_frame
from dm_actor.coap import message as coap_message
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, MessageType, OptionNumber, code_str
from dm_actor.device.transfer import Answer, Incoming, intake
from dm_actor.lwm2m import registration as reg_iface
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dm_actor.actors.host import TcpConnection
    from dm_actor.actors.registrar import Registrar
    from dm_actor.actors.registry import Registry
    from dm_actor.address import Address

_POST = Code.POST.value
_BLOCK1 = OptionNumber.BLOCK1.value
_CON = MessageType.CON.value
_BAD_REQUEST = Code.BAD_REQUEST.value
_UNAVAILABLE = Code.SERVICE_UNAVAILABLE.value
#: new peers' Registers waiting to be taken; more get 5.03 at once
ADMISSION_LIMIT = 4096
#: a Register that waited longer gets 5.03 (its client has retransmitted meanwhile)
ADMISSION_WAIT = 0.5
#: seconds of registrations per scheduler pass before the receive loop and others run again
ADMISSION_BUDGET = 0.002
#: datagrams longer than this are dropped unread (counted as datagrams_too_large)
MAX_DATAGRAM = 4096


class Router:
    """Routes the transports' input to the device actors, or to the registrar."""

    def __init__(self, registry: Registry, registrar: Registrar) -> None:
        self.registry = registry
        self.registrar = registrar
        # Registers from peers without an actor, waiting for `admit`: (arrived, msg, addr, conn)
        self.admission: deque[tuple[float, Message, Address | None, TcpConnection | None]] = deque()
        self.admission_limit = ADMISSION_LIMIT
        self._admission_wake = trio.Event()
        # Registers in blocks from peers without an actor, by peer (bounded by the pool)
        self._blocks: dict[object, Incoming] = {}

    # -- transport callbacks ----------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """A UDP datagram arrived: to its device's actor, or here if it is a new peer's.

        Nothing a peer sends may end the server: an exception raised while handling it is
        contained (`contain`)."""
        if len(data) > MAX_DATAGRAM:
            # nothing LwM2M sends needs it (bodies go in blocks of at most 1024 bytes), and
            # decoding one packed with options costs ~30 ms (an attacker's finding)
            self.registry.statistics["datagrams_too_large"] += 1
            why = f"{len(data)} bytes, over {MAX_DATAGRAM}"
            self.registrar.refusals.refuse("a datagram", None, addr, None, "dropped", why)
            return
        try:
            self._datagram(data, addr)
        except StoreError:
            raise
        except Exception as exc:
            self.registry.contain(self.registry.by_addr.get(addr), exc, f"a datagram from {addr}")

    def _datagram(self, data: bytes, addr: Address) -> None:
        registry = self.registry
        replies = self.registrar.replies
        if replies and len(data) >= 4 and data[1] == _POST:
            cached = replies.get((addr, (data[2] << 8) | data[3]))
            if cached is not None and cached[0] > registry.now():
                if cached[1] is not None:
                    registry.send_datagram(cached[1], addr)
                return
        actor = registry.by_addr.get(addr)
        if actor is not None:
            registry.tell(actor, data)
            return
        try:
            msg = coap_message.decode(data)
            _check(msg)
        except DecodeError as exc:
            registry.statistics["decode_errors"] += 1
            reply = coap_message.reply_for(exc)
            if reply is not None:
                registry.send_datagram(reply, addr)
            answer = "dropped" if reply is None else "Reset" if not reply[1] else code_str(reply[1])
            mid = -1 if exc.mid is None else exc.mid
            refusals = self.registrar.refusals
            refusals.refuse("a malformed datagram", None, addr, None, answer, str(exc), mid=mid)
            return
        self._unknown_peer(msg, addr, None, data)

    def on_unreachable(self, addr: Address) -> None:
        actor = self.registry.by_addr.get(addr)
        if actor is not None:
            self.registry.tell(actor, Signal.UNREACHABLE)

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
            self.registry.contain(
                self.registry.by_conn.get(conn), exc, f"a message from {conn.peer}"
            )
        return None

    def _tcp_message(
        self, conn: TcpConnection, msg: Message
    ) -> Callable[[], Awaitable[object]] | None:
        actor = self.registry.by_conn.get(conn)
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
            self.registry.statistics["decode_errors"] += 1
            answer: int | str = "dropped"
            if 1 <= msg.code <= 31:
                bad = Code.BAD_REQUEST if exc.reply is Reply.BAD_REQUEST else Code.BAD_OPTION
                self.registry.send_frame(conn, tcp_frame(Message(0, bad, 0, msg.token)))
                answer = bad
            refusals = self.registrar.refusals
            refusals.refuse("a malformed message", None, None, conn, answer, str(exc))
            return None
        self._unknown_peer(msg, None, conn, None)
        return None

    def on_tcp_closed(self, conn: TcpConnection) -> None:
        registry = self.registry
        actor = registry.by_conn.pop(conn, None)
        if actor is not None and actor.conn is conn:
            try:
                actor.connection_lost(registry.now())  # now: before a reconnect can be bound
            except StoreError:
                raise
            except Exception as exc:
                registry.contain(actor, exc, f"the close of {conn.peer}")
        registry.by_conn.pop(conn, None)  # (in case its last mail bound it again)
        if self._blocks.pop(("peer", conn), None) is not None:  # (a Register in blocks on it)
            registry.machine_config.block1_pool.release(("peer", conn))
        admission = self.admission
        if admission and any(entry[3] is conn for entry in admission):
            # a Register that came on it and still waits for admission: a registration
            # bound to a closed connection would never hear of the close (no second one)
            kept = [entry for entry in admission if entry[3] is not conn]
            admission.clear()
            admission.extend(kept)

    # -- peers without an actor -------------------------------------------------------------

    def _unknown_peer(
        self, msg: Message, addr: Address | None, conn: TcpConnection | None, data: bytes | None
    ) -> None:
        """A message from a peer with no actor: Register, or an Update/De-register from a
        device whose address changed; anything else is refused."""
        registry, registrar = self.registry, self.registrar
        kind = reg_iface.classify(msg)
        now = registry.now()
        if kind == "register" and msg.option(_BLOCK1) is not None:
            whole = self._reassembled(msg, addr, conn, now)
            if whole is None:
                return  # (answered: 2.31 for the next block, or why not)
            msg = whole
        if kind == "register":
            admission = self.admission
            if registry.store_behind() or len(admission) >= self.admission_limit:
                why = "the store is behind" if registry.store_behind() else "admission is full"
                registrar.refusals.refuse("Register", msg, addr, conn, _UNAVAILABLE, why)
                registrar.shed(msg, addr, conn)
                return
            if addr is not None:  # until it is answered, retransmissions are dropped
                registrar.cache_reply(addr, msg.mid, None)
            admission.append((now, msg, addr, conn))
            if len(admission) == 1:
                self._admission_wake.set()
            return
        if kind in ("update", "deregister"):
            # rule 0: the registration id it names is the device's proof of identity
            actor = registry.by_reg_id.get(msg.uri_path[1])
            if actor is not None:
                refusal = registrar.session_refusal(actor, addr)
                if refusal is not None:  # (a device with credentials: only on its session)
                    registrar.reply_direct(msg, addr, conn, refusal[0], (), cache=False)
                    why = "its endpoint has credentials: only its DTLS session may"
                    registrar.refusals.refuse(None, msg, addr, conn, refusal[0], why)
                    return
                registrar.bind(actor, addr, conn)
                registry.tell(actor, msg if data is None else data)
                return
        if 1 <= msg.code <= 31:
            registrar.reply_direct(msg, addr, conn, Code.NOT_FOUND, (), cache=False)
            known = kind in ("update", "deregister")
            why = "no such registration" if known else "the peer is not registered"
            registrar.refusals.refuse(None, msg, addr, conn, Code.NOT_FOUND, why)
        elif addr is not None and msg.mtype == _CON:
            registry.send_datagram(coap_message.reset_for(msg.mid), addr)
            what = f"a CON {code_str(msg.code)}"
            registrar.refusals.refuse(what, msg, addr, conn, "Reset", "the peer is not registered")

    def _reassembled(
        self, msg: Message, addr: Address | None, conn: TcpConnection | None, now: float
    ) -> Message | None:
        """A Register in blocks from a peer without an actor (Anjay with a small buffer):
        put back together (`device.transfer.intake`, within the pool every device shares),
        each block answered 2.31 from here and cached for its retransmissions; None until
        the last block, then the whole Register (its Block1 echoed in the 2.01)."""
        registry, registrar = self.registry, self.registrar
        config = registry.machine_config
        pool = config.block1_pool
        owner = ("peer", addr if conn is None else conn)
        blocks = self._blocks
        incoming, result = intake(
            blocks.pop(owner, None),
            owner,
            msg,
            pool,
            szx=config.block_szx,
            max_body=config.max_body_in,
            retry_after=config.retry_after,
            now=now,
        )
        if incoming is not None:
            blocks[owner] = incoming
            if len(blocks) > 2 * pool.limit:  # (places given away leave their entries)
                for key in [k for k, v in blocks.items() if v.receiver is None]:
                    del blocks[key]
        if isinstance(result, Answer):
            registrar.reply_direct(msg, addr, conn, result.code, result.options, cache=True)
            return None
        return result

    async def admit(self) -> None:
        """Register new peers, at most `ADMISSION_BUDGET` seconds of CPU per scheduler pass.

        A Register from a peer without an actor costs ~60-100 µs; reading a datagram and
        routing a known device's costs a few. So the transport callbacks only queue new
        peers' Registers (bounded) and this task takes them in turns with everyone else: a
        flood of new devices no longer holds the socket's kernel queue full for seconds, in
        which a registered device's answers waited behind it (issue 10, item 7). A Register
        that waited longer than `ADMISSION_WAIT`, or finds the queue full, gets 5.03 with
        Max-Age (a few µs) so its client backs off instead of retransmitting into the flood.
        """
        registry, registrar = self.registry, self.registrar
        admission = self.admission
        clock = time.perf_counter  # CPU budget only: no decision of the protocol reads it
        while True:
            await self._admission_wake.wait()
            self._admission_wake = trio.Event()
            while admission:
                stop = clock() + ADMISSION_BUDGET
                now = registry.now()  # (once a pass: a pass is a few ms)
                behind = registry.store_behind()
                while admission and clock() < stop:
                    queued_at, msg, addr, conn = admission.popleft()
                    if behind or now - queued_at > ADMISSION_WAIT:
                        why = "the store is behind" if behind else "waited too long for admission"
                        registrar.refusals.refuse("Register", msg, addr, conn, _UNAVAILABLE, why)
                        registrar.shed(msg, addr, conn)
                        continue
                    try:
                        code, options = registrar.register(msg, addr, conn, now, via=None)
                        if code >= _BAD_REQUEST:  # one log line with the reason
                            registrar.refusals.registration("register", msg, addr, conn, code, None)
                        # (its retransmissions are dropped since it was queued: `_unknown_peer`)
                        registrar.answer_held(msg, addr, conn, code, options, None, 0)
                    except StoreError:
                        raise
                    except Exception as exc:
                        registry.contain(registry.by_addr.get(addr) if addr is not None else None,
                                         exc, "a Register")  # fmt: skip
                await trio.lowlevel.checkpoint()


def _check(msg: Message) -> None:
    """Refuse what a peer without an actor sent wrongly (its actor's endpoint does this later).

    Raises:
        DecodeError: an unrecognised critical option, or a path or query that is not UTF-8.
    """
    coap_message.check_options(msg)
    if msg.code:
        msg.uri_path  # noqa: B018
        msg.uri_query  # noqa: B018
