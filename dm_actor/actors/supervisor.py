"""The supervisor: the device actors' host, composing the registry and the parts above it.

It builds the shared `Registry` and the parts that split the work by concern: `Commands`
(submission, the events commands end in), `Subscriptions` (rule 9), `Registrar` (the
registration interface, lifetimes) and `Router` (what the transports receive). It runs
their tasks and the sweeps in its nursery, where one actor task per registration is spawned
(and ended on De-register or lifetime expiry), brings back what the store kept (`restore`),
and offers one facade (`submit` / `subscribe`, the transport callbacks, the indexes, the
counters) to the API layer, the composition root and the device actors. It decides nothing
itself: each decision lives in the part that owns it. Device-level failures are contained
(`Registry.contain`); a programming error propagates.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, cast

import msgspec
import trio

from dm_actor.actors.commands import METHODS, Accepted, Commands, Rejected
from dm_actor.actors.device import DeviceActor, Signal
from dm_actor.actors.events import ChannelEvent, EventStream
from dm_actor.actors.persist import (
    SECURED,
    address_from_text,
    command_from_record,
    registration_from_record,
)
from dm_actor.actors.provisioning import Provisioning
from dm_actor.actors.registrar import Registrar
from dm_actor.actors.registry import Registry
from dm_actor.actors.router import MAX_DATAGRAM, Router
from dm_actor.actors.subscriptions import Presubscription, Subscriptions
from dm_actor.delivery.queue import DeviceQueue
from dm_actor.device.machine import DeviceMachine
from dm_actor.store.memory import MemoryStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.actors.events import Kind
    from dm_actor.config import Settings
    from dm_actor.lwm2m.registration import Registration
    from dm_actor.store.base import Snapshot, Store

__all__ = ["MAX_DATAGRAM", "METHODS", "Accepted", "Presubscription", "Rejected", "Supervisor"]

log = logging.getLogger(__name__)

#: seconds between the log lines that sum up refusals (`Supervisor._report`)
REPORT_INTERVAL = 60
_REFUSALS = frozenset(
    ("registrations_shed", "mailbox_overloaded", "decode_errors", "peer_errors",
     "messages_refused", "frames_dropped", "datagrams_too_large", "blockwise_failures")
)  # fmt: skip


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
        self._wall_clock = wall_clock
        self.registry = registry = Registry(
            settings,
            store=MemoryStore() if store is None else store,
            events=EventStream() if events is None else events,
            mailbox_size=mailbox_size,
        )
        self.commands = commands = Commands(registry)
        self.subscriptions = subscriptions = Subscriptions(registry, commands)
        self.registrar = registrar = Registrar(
            registry, subscriptions, self._new_actor, reply_cache_size=reply_cache_size
        )
        self.router = router = Router(registry, registrar)
        # device credentials (issue 15): the index (the DTLS layer's PSK lookup is
        # `credentials.psk`) and its writer, which ends the registrations they change
        self.credentials = registrar.credentials
        self.provisioning = Provisioning(registry, registrar.credentials)
        # the events a restart owes the applications' channels (`restore`), until the hub
        # takes them (`NotificationHub.restore`): not through the bounded event stream
        self.owed_events: list[ChannelEvent] = []

        # -- the facade: what the API, the app, the device actors and the tests reach -------
        # (plain aliases of the parts' objects and methods; none is ever rebound)
        self.settings = settings
        self.store: Store = registry.store
        self.events = registry.events
        self.mailbox_size = registry.mailbox_size
        self.registration_grace = registry.registration_grace
        self.params = registry.params
        self.resend_window = registry.resend_window
        self.policy = registry.policy
        self.statistics = registry.statistics
        self.by_endpoint = registry.by_endpoint
        self.endpoint_names = registry.endpoint_names
        self.by_reg_id = registry.by_reg_id
        self.by_addr = registry.by_addr
        self.by_conn = registry.by_conn
        self.now = registry.now
        self.attach_udp = registry.attach_udp
        self.attach_dtls = registry.attach_dtls
        self.new_coap_endpoint = registry.new_coap_endpoint
        self.send_datagram = registry.send_datagram
        self.send_frame = registry.send_frame
        self.persist_command = registry.persist_command
        self.device_ended = registry.device_ended
        self.store_behind = registry.store_behind
        # commands
        self.submit = commands.submit
        self.command_finished = subscriptions.command_finished  # (an Observe's: rule 9.1)
        self.events_delivered = commands.events_delivered
        self.keep_event = commands.keep_event
        # subscriptions
        self.presubscriptions = subscriptions.presubscriptions
        self.subscribe = subscriptions.subscribe
        self.unsubscribe = subscriptions.unsubscribe
        self.subscriptions_of = subscriptions.subscriptions_of
        self.set_presubscriptions = subscriptions.set_presubscriptions
        self.observe_again = subscriptions.observe_again
        self.notification = subscriptions.notification
        # the registrar
        self.device_request = registrar.device_request
        self._replies = registrar.replies
        self._lifetimes = registrar.lifetimes
        # the router
        self.on_datagram = router.on_datagram
        self.on_tcp_message = router.on_tcp_message
        self.on_tcp_closed = router.on_tcp_closed
        self.on_unreachable = router.on_unreachable
        self._admission = router.admission

    @property
    def wall_offset(self) -> float:
        """Wall-clock minus Trio time; set when `run` starts."""
        return self.registry.wall_offset

    @property
    def _held_limit(self) -> int:
        """Answers held, or writes not committed, beyond which new work is refused."""
        return self.registry.held_limit

    @_held_limit.setter
    def _held_limit(self, limit: int) -> None:
        self.registry.held_limit = limit

    @property
    def _awaiting(self) -> int:
        return self.registry.awaiting

    @property
    def _reply_cache_size(self) -> int:
        return self.registrar.reply_cache_size

    def contain(self, actor: DeviceActor | None, exc: Exception, where: str) -> None:
        """`Registry.contain`, which every part calls (patch that one to watch them all)."""
        self.registry.contain(actor, exc, where)

    def _new_actor(self, reg: Registration, queue: DeviceQueue) -> DeviceActor:
        return DeviceActor(self, DeviceMachine(self.registry.machine_config, reg, queue),
                           self.mailbox_size)  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the sweeps and host the actors until cancelled."""
        registry, commands = self.registry, self.commands
        registry.wall_offset = self._wall_clock() - trio.current_time()
        # durable events are numbered from the wall clock (microseconds), so numbers (and the
        # uids made of them) are not reused after a restart
        commands.event_seq = max(commands.event_seq, int(self._wall_clock() * 1e6))
        async with trio.open_nursery() as nursery:
            registry.nursery = nursery
            nursery.start_soon(self._expiry_sweeper)
            nursery.start_soon(self.registrar.lifetime_sweeper)
            nursery.start_soon(registry.release_replies)
            nursery.start_soon(self.router.admit)
            nursery.start_soon(self._report)
            task_status.started()

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
        self.provisioning.restore(snapshot.credentials)
        self.adopt(snapshot)
        owed = self.owed_events
        commands = self.commands
        for event in snapshot.events:  # events owed to a channel: owed again
            item = msgspec.json.decode(event.item)
            kind = cast("Kind", event.kind)  # (the store keeps the kind it was given)
            owed.append(ChannelEvent(kind, item, frozenset((event.owner,)), event.seq))
            commands.event_seq = max(commands.event_seq, event.seq)
        for owner, pres in snapshot.presubscriptions.items():
            self.presubscriptions[owner] = [
                Presubscription(p.endpoint_name, p.endpoint_type, tuple(p.resource_paths))
                for p in pres
            ]
        # (credentials added, replaced or removed while stopped)
        secured = [r.endpoint for r in snapshot.registrations if r.address == SECURED]
        self.provisioning.end_older_registrations(secured)
        log.info(
            "restored %d registrations, %d commands",
            len(snapshot.registrations),
            len(snapshot.commands),
        )

    def adopt(self, snapshot: Snapshot) -> None:
        """Bring back the devices `snapshot` holds (their registrations, commands, Message
        ID reservations, subscriptions and remembered answers), as `restore` does after a
        restart; in cluster mode, the devices of slots this node just took over
        (`dm_actor.node`): they are delivered to at once at their stored last address."""
        now = self.now()
        offset = self.wall_offset
        for rec in snapshot.registrations:
            reg = registration_from_record(rec, offset)
            queue = DeviceQueue(self.policy, queue_mode=reg.queue_mode, now=now)
            addr = address_from_text(rec.address)
            queue.reachable = addr is not None
            queue.awake_until = 0.0
            if addr is not None:
                previous = self.by_addr.get(addr)
                if previous is None or previous.reg.updated_at <= reg.updated_at:
                    if previous is not None:  # it moved: the later registration has it now
                        previous.machine.lose_address()
                        previous.queue.reachable = False
                else:
                    queue.reachable = False
                    addr = None
            machine = DeviceMachine(
                self.registry.machine_config,
                reg,
                queue,
                addr=addr,
                # past every MID the old process may have sent it (None: a random start)
                mid_start=snapshot.next_mids.get(reg.endpoint),
            )
            actor = DeviceActor(self, machine, self.mailbox_size)
            if addr is not None:
                self.by_addr[addr] = actor
                cluster = self.registry.cluster
                if rec.ingress is not None and cluster is not None:
                    cluster.adopted(addr, rec.ingress)
            self.by_endpoint[reg.endpoint] = actor
            self.endpoint_names.add(reg.endpoint)
            self.by_reg_id[reg.reg_id] = actor
            self.registrar.watch_lifetime(reg)
            nursery = self.registry.nursery
            assert nursery is not None, "Supervisor.run() is not running"
            nursery.start_soon(actor.run, name="device")  # one shared name string
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
                self.subscriptions.queue_observe(
                    restored, path, now
                )  # the old observations are gone
        self.commands.restore(snapshot)  # the async-ids it knows (rule 1.7)

    def release(self, leaving: Callable[[str], bool]) -> int:
        """Forget, without a trace in the store or on the channels, every device whose
        endpoint name `leaving` selects: in cluster mode another node takes them over from
        the store (a planned handover, `dm_actor.node`). Their tasks end; what they wrote
        commits as usual (the caller waits for `store.durable()` before handing over).
        Returns how many were released."""
        registry = self.registry
        gone = [a for ep, a in registry.by_endpoint.items() if leaving(ep)]
        directory = registry.directory  # (the devices that left are listed by no one now:
        for ep in [ep for ep in directory.gone if leaving(ep)]:  # the new owner may list
            directory.revive(ep)  # the same device registered again)
        unindex = self.commands.unindex
        for actor in gone:
            ep = actor.endpoint
            del registry.by_endpoint[ep]
            registry.endpoint_names.discard(ep)
            if registry.by_reg_id.get(actor.reg.reg_id) is actor:
                del registry.by_reg_id[actor.reg.reg_id]
            addr = actor.addr
            if addr is not None and registry.by_addr.get(addr) is actor:
                del registry.by_addr[addr]
            if actor.conn is not None:
                registry.by_conn.pop(actor.conn, None)
            for cmd in actor.queue.queue:
                unindex(cmd.owner, cmd.async_id, ep)
            actor.mailbox.close()
        return len(gone)

    # -- sweeps -----------------------------------------------------------------------------

    async def _expiry_sweeper(self) -> None:
        """Rule 5.2: every `expiry_sweep_interval` seconds, expired commands finish."""
        interval = self.settings.delivery.expiry_sweep_interval
        tell = self.registry.tell
        while True:
            await trio.sleep(interval)
            for actor in self.by_endpoint.values():
                if actor.queue.queue:
                    tell(actor, Signal.SWEEP)
            self.commands.forget_expired_answers()  # (rule 1.7's windows)

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
