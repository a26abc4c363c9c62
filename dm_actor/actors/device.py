"""The device actor: one Trio task per registered device, a short loop around its machine.

Every decision about the device is its `DeviceMachine`'s (`dm_actor/device/`, sans-IO). The
actor owns the task and the mailbox: it waits for mail or the machine's timer, feeds the
machine one message at a time, carries out what the machine asks in order (send, store,
publish through its `DeviceHost`), and, after a `Hold`, lets nothing but answers leave until
the store says the writes are durable. It holds no timer while idle.

Other tasks reach it through its mailbox (`tell`) or through its synchronous operations
(`submit`, `respond`, `bind`, `connection_lost`, `lose_transport`, `reregistered`, `end`),
which never await: each feeds the machine, carries out its effects and wakes the task, which
re-arms its timer and starts the next attempt. No caller has to remember to wake it.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, cast

import trio

from dm_actor.actors.mailbox import Mailbox, MailboxClosed, Overloaded
from dm_actor.coap.message import Message
from dm_actor.device.effects import (
    Count,
    DeviceRequest,
    Finished,
    Hold,
    Notified,
    ObserveAgain,
    ReserveMids,
    Send,
    StoreCommand,
)
from dm_actor.store.base import StoreError

if TYPE_CHECKING:
    from dm_actor.actors.host import DeviceHost, TcpConnection
    from dm_actor.address import Address
    from dm_actor.coap.endpoint import CoapEndpoint
    from dm_actor.coap.message import Option
    from dm_actor.delivery.outcomes import Outcome
    from dm_actor.delivery.queue import Command, DeviceQueue, Verdict
    from dm_actor.device.machine import DeviceMachine
    from dm_actor.lwm2m.registration import Registration


class Signal(enum.Enum):
    """Mail that is not a message from the device."""

    SWEEP = "sweep"  # finish expired commands (rule 5.2)
    UNREACHABLE = "unreachable"  # ICMP port-unreachable, or its address or connection taken
    EXPIRED = "expired"  # the registration's lifetime ran out (rule 8.3)


Mail = bytes | Message | Signal


class DeviceActor:
    """One registered device. Create it with its machine; run `run()` in a nursery."""

    __slots__ = ("_mark", "_stepping", "host", "machine", "mailbox", "subscriptions")

    def __init__(self, host: DeviceHost[DeviceActor], machine: DeviceMachine, mailbox_size: int):
        self.host = host
        self.machine = machine
        self.mailbox: Mailbox[Mail] = Mailbox(mailbox_size)
        self.subscriptions: dict[str, set[str]] | None = None  # path -> owners
        self._mark: int | None = None  # the store mark the machine's hold waits for
        self._stepping = False  # in `step`: a drain from inside it (a rebinding) waits

    # -- the read model -----------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.machine.reg.endpoint

    @property
    def reg(self) -> Registration:
        return self.machine.reg

    @property
    def queue(self) -> DeviceQueue:
        return self.machine.queue

    @property
    def coap(self) -> CoapEndpoint:
        return self.machine.coap

    @property
    def addr(self) -> Address | None:
        return self.machine.addr

    @property
    def conn(self) -> TcpConnection | None:
        return cast("TcpConnection | None", self.machine.conn)

    def has_transport(self) -> bool:
        return self.machine.has_transport()

    def cached(self, uri: str, now: float) -> Outcome | None:
        return self.machine.cached(uri, now)

    def observed_paths(self) -> set[str]:
        return self.machine.observed_paths()

    # -- the task -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the registration ends (De-register, lifetime expiry) or shutdown.

        The crash boundary: any exception but a store failure (a `DecodeError` or
        `Lwm2mError` the device's bytes caused, or a bug they reached) ends this device's
        registration, never the server (`DeviceHost.contain`).
        """
        try:
            await self._serve()
        except StoreError:
            raise
        except Exception as exc:
            self.host.contain(self, exc, "its input")

    async def _serve(self) -> None:
        mailbox = self.mailbox
        machine = self.machine
        store = self.host.store
        now = trio.current_time()
        machine.pump(now)  # pre-subscriptions, restored commands
        self._carry_out(now)
        while not mailbox.closed:
            timer = machine.get_timer()
            mark = self._mark
            if mark is not None:
                # mail is read during a hold too (answers to the device leave; a request of
                # ours waits): whichever comes first, the store's commit, mail or the timer
                if not mailbox and not mailbox.closed:  # (mail that came meanwhile: read it)
                    with trio.CancelScope(deadline=math.inf if timer is None else timer) as sc:
                        mailbox.interrupt = sc
                        await store.durable(mark)
                    mailbox.interrupt = None
                self._release(trio.current_time())
            elif timer is None:
                await mailbox.wait()
            else:
                with trio.move_on_at(timer):
                    await mailbox.wait()
            self.step(trio.current_time())

    def step(self, now: float, *, start: bool = True) -> None:
        """Feed what arrived to the machine, one message at a time, and carry out its
        decisions (and start the next attempt, if `start` and the rules allow).

        Not re-entrant: a drain asked for while this actor's own step runs (its mail made
        the registrar rebind it or take its address) returns at once; the step it
        interrupted goes on, and hands what is no longer its own to the new owner."""
        if self._stepping:
            return
        self._stepping = True
        try:
            self._step(now, start)
        finally:
            self._stepping = False

    def _step(self, now: float, start: bool) -> None:
        machine = self.machine
        mailbox = self.mailbox
        if machine.handle_timer(now):
            self._carry_out(now)
        # where the mail came from (see `bind`): every datagram from `addr`, every message on
        # `conn`
        addr, conn = machine.addr, machine.conn
        for mail in mailbox.take():
            # each message is handled before the next is read, as it would be alone: a burst
            # read in one step must not fill the deduplication window with requests whose
            # answers are only one call away
            if mailbox.closed:
                # the registration ended with an earlier message (a De-register, expiry):
                # the rest is not this device's to answer (an Update now gets 4.04)
                self._hand_on(mail, addr, conn)
                continue
            if type(mail) is bytes:
                if addr is not None and machine.addr != addr:
                    # another endpoint registered from this address while its mail was read:
                    # the rest is the address's new owner's (or a new peer's)
                    self._hand_on(mail, addr, conn)
                    continue
                machine.receive_datagram(mail, now)
            elif isinstance(mail, Message):
                if conn is not None and machine.conn is not conn:
                    self._hand_on(mail, addr, conn)  # (the same, for a connection taken)
                    continue
                machine.receive_message(mail, now)
            elif mail is Signal.SWEEP:
                machine.sweep(now)
            elif mail is Signal.UNREACHABLE:
                machine.unreachable(now)
            elif mail is Signal.EXPIRED and machine.lifetime_over(now):
                # (an Update read before it may have renewed it)
                self.end(now, expired=True)
                continue
            self._carry_out(now)
        machine.settle(now, start=start)
        self._carry_out(now)

    def _hand_on(self, mail: Mail, addr: Address | None, conn: object | None) -> None:
        """Give mail that is no longer this actor's to the router to deliver anew; if its
        new owner's mailbox is full a TCP message is lost (its reader already handed it
        over): counted."""
        if type(mail) is bytes and addr is not None:
            self.host.on_datagram(mail, addr)
        elif (
            isinstance(mail, Message)
            and conn is not None
            and self.host.on_tcp_message(cast("TcpConnection", conn), mail) is not None
        ):
            self.host.statistics["mailbox_overloaded"] += 1

    def _carry_out(self, now: float) -> None:
        """Do what the machine decided, in order; a hold whose writes are already durable
        (the memory store) is released at once."""
        machine = self.machine
        host = self.host
        store = host.store
        while True:
            for effect in machine.effects():
                kind = type(effect)  # (the common ones first: an answer, a device's request)
                if kind is Send:
                    data, addr, conn = cast("Send", effect)
                    if conn is not None:
                        host.send_frame(cast("TcpConnection", conn), data)
                    elif addr is not None:
                        host.send_datagram(data, addr)
                elif kind is DeviceRequest:
                    host.device_request(self, cast("DeviceRequest", effect).request, now)
                elif kind is Hold:
                    self._mark = store.mark()
                elif kind is StoreCommand:
                    host.persist_command(self.endpoint, cast("StoreCommand", effect).command)
                elif kind is Finished:
                    cmd, outcome = cast("Finished", effect)
                    host.command_finished(self, cmd, outcome)
                elif kind is Notified:
                    uri, value = cast("Notified", effect)
                    host.notification(self, uri, value)
                elif kind is ReserveMids:
                    store.put_next_mid(self.endpoint, cast("ReserveMids", effect).limit)
                elif kind is ObserveAgain:
                    host.observe_again(self, now)
                elif kind is Count:
                    host.statistics[cast("Count", effect).name] += 1
            mark = self._mark
            if mark is None or not store.is_durable(mark):
                return
            self._mark = None
            machine.durable(now)

    def _release(self, now: float) -> None:
        mark = self._mark
        if mark is not None and self.host.store.is_durable(mark):
            self._mark = None
            self.machine.durable(now)
            self._carry_out(now)

    def _done(self, now: float) -> None:
        """After an operation from outside the task: carry out, and wake the task (it
        re-arms its timer, waits for a hold, starts the next attempt)."""
        self._carry_out(now)
        self.mailbox.poke()

    # -- operations for other tasks ------------------------------------------------------

    def tell(self, mail: Mail) -> None:
        """Queue mail for the actor (raises `Overloaded` when the mailbox is full)."""
        self.mailbox.put(mail)

    def submit(
        self, cmd: Command, now: float, *, start: bool = True, caller_waits: bool = False
    ) -> Verdict:
        """Queue an accepted command (`DeviceMachine.submit`). Only an idle actor with no
        mail waiting starts it from here (one write then holds the command and its
        attempt); otherwise its task decides, in the order the mail arrived. The caller
        awaits the store's durability before it answers 202.

        `caller_waits`: the caller awaits that durability anyway and then calls `released`
        (in a `finally`): while the machine holds, the task is not woken to wait for the
        store too; `released` lets the attempt go and wakes it once, to arm its timer (one
        task switch per command instead of two; docs/benchmarks.md, "Issue 12")."""
        verdict = self.machine.submit(cmd, now, start=start and not self.mailbox)
        self._carry_out(now)
        if not caller_waits or self._mark is None:
            self.mailbox.poke()
        return verdict

    def released(self, now: float) -> None:
        """After `submit(caller_waits=True)`, once the caller's wait for the store ended
        (durable, or cancelled): carry out what the hold kept back if it is durable, and wake
        the task (its timer, or its own wait for the store). Nothing when the task released
        the hold itself meanwhile (mail woke it)."""
        if self._mark is not None:
            self._release(now)
            self.mailbox.poke()

    def respond(self, request: Message, code: int, options: tuple[Option, ...], now: float) -> None:
        """Answer a request of the device's (`DeviceRequest`)."""
        self.machine.respond(request, code, options, now)
        if self._stepping:  # (from its own step, which goes on: no wake-up needed)
            self._carry_out(now)
        else:
            self._done(now)

    def bind(
        self, addr: Address | None, conn: TcpConnection | None, now: float
    ) -> tuple[Address | None, TcpConnection | None] | None:
        """The device speaks from `addr` or on `conn` from now on (`DeviceMachine.bind`).
        What came on the old address or connection first (an answer, say; a request is
        answered there) is handled while the actor still has it, and nothing new starts on
        it. Returns the address and connection it had (for the caller's indexes), or None
        when that mail ended the registration (a De-register was among it)."""
        machine = self.machine
        if (machine.addr is not None and machine.addr != addr) or (
            machine.conn is not None and machine.conn is not conn
        ):
            self.drain(now)
            if self.mailbox.closed:
                return None
        old = machine.addr, self.conn
        machine.bind(addr, conn, now)
        self._done(now)
        return old

    def connection_lost(self, now: float) -> None:
        """The TCP connection closed. Called at once, before a reconnect can be bound, so
        nothing of it can be mistaken for the new connection's: what arrived on it is
        handled first, what was sent on it fails (rule 3.4), the device is unreachable until
        its next contact, and its observations die with the connection (RFC 8323) and are
        made again then."""
        self.machine.lose_connection()  # first: nothing may start on (or answer over) it
        self.drain(now)
        if self.mailbox.closed:
            return
        self.machine.connection_closed(now)
        self._done(now)

    def lose_transport(self, now: float) -> None:
        """Another device now speaks from this one's address or on its connection: what
        came from there first is handled (and answered) now; then what it sent there fails
        and an attempt not yet sent goes back to its queue (as on ICMP), in mail order."""
        self.drain(now)
        machine = self.machine
        if machine.conn is not None:
            machine.lose_connection()
        else:
            machine.lose_address()
        try:
            self.mailbox.put(Signal.UNREACHABLE)
        except Overloaded:
            self.host.statistics["mailbox_overloaded"] += 1
        except MailboxClosed:
            pass

    def drain(self, now: float) -> None:
        """Handle the mail that came before the transport changes (outside the task); no
        attempt starts on the transport that is going away."""
        try:
            self.step(now, start=False)
        except StoreError:
            raise
        except Exception as exc:  # as in `run`
            self.host.contain(self, exc, "its input")

    def reregistered(self, reg: Registration, now: float) -> None:
        """The endpoint registered again (rule 8.1): see `DeviceMachine.reregistered`."""
        self.machine.reregistered(reg, now)
        self._done(now)

    def answer_pending(self) -> None:
        """A Register's answer waits for the store: none of our requests leaves before it."""
        self.machine.answer_pending()

    def answer_sent(self, now: float) -> None:
        """That answer left: our requests may go (the task starts the next attempt, if
        there is one: a new device's task is not woken for nothing)."""
        machine = self.machine
        machine.answer_sent(now)
        if machine.queue.queue:
            self._done(now)

    def updated(self, reg: Registration) -> None:
        self.machine.updated(reg)

    def cancel_observation(self, uri: str) -> None:
        self.machine.cancel_observation(uri)

    def end(self, now: float, *, expired: bool) -> None:
        """The registration ended: finish every command (rules 8.2, 8.3) and stop."""
        self.machine.end(now)
        self._carry_out(now)
        self.mailbox.close()
        self.host.device_ended(self, expired=expired)
