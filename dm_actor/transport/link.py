"""The internal link between cluster nodes: datagrams for another node's slot go to their
owner with the device's original address, and the owner's datagrams to that device go back
out through the node that received them (Californium's cluster forwarding and backwarding).

Every datagram the device-facing CoAP socket receives in cluster mode passes `on_datagram`:

- it names a slot (`dm_actor.cluster.route.slot_named`: a Register's endpoint, an Update's
  registration id, a response's token) that this node serves: handled here (`local_datagram`);
- a slot another node owns: sent to that node's link as a FORWARD frame, and the device's
  address remembered with the slot (`peers`), so that what it sends next naming no slot (an
  empty ACK, a Reset) follows;
- a slot nobody serves (a failover's gap, or this node's lease past its deadline): a Register
  gets 5.03 with Max-Age from here (the device waits, then retries), anything else is dropped
  and counted (the device retransmits; a lease's TTL is well inside CoAP's 45 s);
- no slot: where `peers` says (the slot's owner now, or a node while it is up), else here.

On the owner, a FORWARD frame's datagram is handled as if it had arrived on the CoAP socket
from the device's address, and that address is remembered with the node it came through
(`ingress`): `egress`, the owner's way out to devices, sends datagrams to such an address as
BACKWARD frames to that node, which sends them out of its CoAP socket (a device behind a NAT
or a load balancer hears its answers from the address it talked to). A datagram from the
device that arrives directly forgets the entry, and so does a node that is gone (not among
the view's live nodes, or its link answered a frame with an ICMP error less than
`DOWN_TIME` ago): the owner's datagrams then go out directly, rather than into a dead node. An
ICMP error the ingress node sees for a device another node owns is sent to the owner as
UNREACHABLE.

Frames are authenticated (`dm_actor.cluster.wire`: HMAC-SHA-256 keyed by the cluster secret).
Nothing a peer sends raises out of the callbacks: a frame that does not decode or
authenticate, comes from this node's own name or from a node the view does not know, or
forwards a datagram for a slot this node does not serve, is dropped, counted and logged at
most once a minute per reason. Every map is bounded (least recently used entries go first).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, TypeVar

import trio

from dm_actor.cluster import wire
from dm_actor.cluster.route import MAX_ROUTED, slot_named
from dm_actor.cluster.slots import TOKEN_LENGTH, slot_of_token
from dm_actor.coap import message as coap_message
from dm_actor.coap.errors import DecodeError
from dm_actor.coap.message import Message, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.lwm2m import registration as reg_iface
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.address import Address
    from dm_actor.cluster.view import ClusterView, HostPort

log = logging.getLogger(__name__)

#: seconds between two log lines about the same kind of refused frame or dropped datagram
LOG_INTERVAL = 60.0
#: a frame sent longer ago than this is refused as stale (a replay, or one held in a paused
#: node's socket): the nodes' wall clocks must agree much better than this (NTP)
MAX_FRAME_AGE = 2.0
#: seconds between two readings of the view's live nodes (`egress`)
LIVE_REFRESH = 1.0
#: seconds a node whose link answered with an ICMP error counts as gone (unless it sends)
DOWN_TIME = 10.0
_MAX_AGE = OptionNumber.MAX_AGE.value
_BLOCK1 = OptionNumber.BLOCK1.value
_CON = MessageType.CON.value
_V = TypeVar("_V")


class ClusterLink:
    """The internal UDP link of one cluster node (see the module docstring).

    Args:
        view: the cluster as this node sees it (who owns which slot, where nodes are reached).
        local_datagram: this node's handling of a device's datagram (the router's
            `on_datagram`), called with the device's address for datagrams received here or
            forwarded here.
        local_unreachable: this node's handling of an ICMP error for a device's address (the
            router's `on_unreachable`).
        peers: how many device addresses each of `peers` (address -> slot or node, ingress
            side) and `ingress` (address -> node, owner side) remembers.
        retry_after: the Max-Age of the 5.03 that answers a Register for a slot nobody serves.
    """

    def __init__(
        self,
        view: ClusterView,
        local_datagram: Callable[[bytes, Address], None],
        local_unreachable: Callable[[Address], None],
        *,
        peers: int = 100_000,
        retry_after: int = 60,
        max_age: float = MAX_FRAME_AGE,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.view = view
        self._local_datagram = local_datagram
        self._local_unreachable = local_unreachable
        self._key = wire.link_key(view.secret)
        self.limit = peers
        self._retry_after = retry_after
        # frames sent longer ago than this (or "later" than this ahead: a clock gone wrong)
        # are refused as stale: replayed, or held in a paused node's socket
        self.max_age = max_age
        self._wall = wall_clock
        #: whether this node may send to devices now (`ClusterNode`: within its lease's
        #: local deadline); its own 5.03s to Registers for unowned slots wait for it too
        self.may_send: Callable[[], bool] = lambda: True
        #: ingress side: device address -> the slot it named last (followed through the view),
        #: or the node whose datagrams to it came back through here
        self.peers: OrderedDict[Address, int | str] = OrderedDict()
        #: owner side: device address -> the node its last datagram was forwarded by
        self.ingress: OrderedDict[Address, str] = OrderedDict()
        self._endpoint: UdpEndpoint | None = None
        self._send: Callable[[bytes, Address], None] | None = None
        self._targets: dict[HostPort, bool] = {}  # link addresses seen: numeric or not
        self._target_nodes: dict[HostPort, str] = {}  # whose link address each is
        self._live: frozenset[str] = frozenset()  # the view's live nodes, read at _live_at
        self._live_at = -math.inf
        self._down: dict[str, float] = {}  # node -> when its link answered with an ICMP error
        self._logged_at: dict[str, float] = {}
        self._non_mid = 0
        self.statistics: dict[str, int] = {
            "forwarded": 0,  # device datagrams sent to their owner (ingress side)
            "backwarded": 0,  # datagrams to devices sent through their ingress (owner side)
            "received_forwarded": 0,  # FORWARD frames handled here (owner side)
            "sent_back": 0,  # BACKWARD datagrams sent out of the CoAP socket (ingress side)
            "unreachable_forwarded": 0,  # ICMP errors sent to the device's owner
            "unreachable_received": 0,  # UNREACHABLE frames handled here
            "frames_refused": 0,  # frames dropped: not decoded or authenticated, ...
            "misrouted": 0,  # FORWARD frames for a slot this node does not serve: dropped
            "unowned_registers": 0,  # Registers for a slot nobody serves: 5.03
            "unowned_dropped": 0,  # other datagrams for a slot nobody serves: dropped
            "link_dropped": 0,  # frames not sent: link down, node unknown, send failed
            "link_unreachable": 0,  # ICMP errors for frames sent to a peer node
            "ingress_gone": 0,  # datagrams sent directly: the node they came in by is gone
            # ... or held back: that node's CoAP address is not this node's
            "ingress_gone_held": 0,
        }

    # -- wiring -------------------------------------------------------------------------------

    async def run(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind the internal UDP socket, report its address, then receive frames until
        cancelled (start it with `await nursery.start(link.run, host, port)`)."""
        endpoint = UdpEndpoint(
            host,
            port,
            self._on_frame,
            self._on_link_unreachable,
            max_datagram_size=wire.MAX_FRAME + 1,  # (one more: a longer frame is seen as such)
            trace=False,  # (frames are not CoAP)
        )
        self._endpoint = endpoint
        try:
            await endpoint.run(task_status=task_status)
        finally:
            self._endpoint = None

    def attach(self, send: Callable[[bytes, Address], None]) -> None:
        """Datagrams to devices leave through `send` (the device-facing CoAP socket's)."""
        self._send = send

    # -- the device-facing socket's callbacks (ingress side) --------------------------------

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """A datagram from a device arrived on the CoAP socket: handled here, or forwarded."""
        if len(data) > MAX_ROUTED:  # (the router drops it unread and counts it)
            self._local(data, addr)
            return
        view = self.view
        slot = slot_named(data, view.slot_count)
        if slot is None:
            entry = self.peers.get(addr)
            if entry is None:
                self._local(data, addr)
                return
            if isinstance(entry, str):  # (a node, not a slot: followed while it is up)
                owner: str | None = None if self._gone(entry) else entry
            else:
                owner = self._owner_elsewhere(entry)
            if owner is None or owner == view.node:
                self._local(data, addr)
            else:
                self._forward(owner, data, addr)
            return
        if view.mine(slot):
            if self.peers:
                self.peers.pop(addr, None)
            self._local(data, addr)
            return
        owner = view.owner(slot)
        if owner is None or owner == view.node:
            self._unowned(data, addr)
            return
        _remember(self.peers, addr, slot, self.limit)
        self._forward(owner, data, addr)

    def on_unreachable(self, addr: Address) -> None:
        """An ICMP error for a device's address: to its owner (the node whose datagram it
        answers), or handled here."""
        entry = self.peers.get(addr)
        owner = None
        if entry is not None:
            owner = entry if isinstance(entry, str) else self._owner_elsewhere(entry)
        if owner is None or owner == self.view.node:
            self._local_unreachable(addr)
            return
        if self._send_frame(owner, wire.UNREACHABLE, addr, b""):
            self.statistics["unreachable_forwarded"] += 1

    # -- the owner's way out ----------------------------------------------------------------

    def remember_ingress(self, addr: Address, node: str) -> None:
        """The device at `addr` talks to `node` (adopted from the store: its registration
        says so): what this node sends it goes back through `node`."""
        _remember(self.ingress, addr, node, self.limit)

    def egress(self, data: bytes, addr: Address) -> bool:
        """True when this datagram to a device went (or was dropped) on its way back through
        the node its datagrams came in by; False: send it directly."""
        ingress = self.ingress
        if not ingress:
            return False
        node = ingress.get(addr)
        if node is None:
            return False
        if self._target(node) is None or self._gone(node):
            view = self.view
            mine = view.coap_address(view.node)
            if mine and mine == view.coap_address(node):  # (one address: SO_REUSEPORT, a VIP)
                del ingress[addr]
                self.statistics["ingress_gone"] += 1
                return False  # sent directly: the device sees the address it talks to
            # from this node's address the device would see another server, and take our
            # retransmission for a new exchange (executed twice): held back until the device
            # is heard again (directly, or through another node: `ingress` then follows)
            self.statistics["ingress_gone_held"] += 1
            return True
        if self._send_frame(node, wire.BACKWARD, addr, data):
            self.statistics["backwarded"] += 1
        return True

    # -- the internal socket's callbacks ----------------------------------------------------

    def _on_frame(self, data: bytes, source: Address) -> None:
        try:
            frame, sent_at = wire.decode_stamped(data, self._key)
        except wire.WireError as exc:
            self._refuse(exc.reason, source, str(exc))
            return
        age = self._wall() - sent_at
        if not -self.max_age <= age <= self.max_age:
            self._refuse("stale", source, f"a frame sent {age:.1f} s ago (at most {self.max_age})")
            return
        kind, sender, addr, payload = frame
        view = self.view
        if self._down:
            self._down.pop(sender, None)  # (it sends: it is up)
        if sender == view.node:
            self._refuse("self", source, f"a frame naming this node ({sender}) as its sender")
            return
        if kind == wire.FORWARD:
            if self._target(sender) is None:
                self._refuse("sender", source, f"a FORWARD from {sender}, a node not in the view")
                return
            slot = slot_named(payload, view.slot_count)
            if slot is not None and not view.mine(slot):
                self.statistics["misrouted"] += 1
                what = "a datagram from %s forwarded by %s names slot %d, not served here: dropped"
                self._log_once("misrouted", what, addr, sender, slot)
                return
            self.statistics["received_forwarded"] += 1
            _remember(self.ingress, addr, sender, self.limit)
            self._local_datagram(payload, addr)
        elif kind == wire.BACKWARD:
            send = self._send
            if send is None:
                self._dropped("detached", "a BACKWARD frame before the CoAP socket is attached")
                return
            slot = _request_slot(payload, view.slot_count)
            if slot is not None:
                _remember(self.peers, addr, slot, self.limit)
            else:
                entry = self.peers.get(addr)
                if isinstance(entry, str) or entry is None or view.owner(entry) != sender:
                    _remember(self.peers, addr, sender, self.limit)
            try:
                send(payload, addr)
            except (OSError, trio.ClosedResourceError) as exc:
                self._dropped("send", "a BACKWARD datagram to %s not sent: %r", addr, exc)
                return
            self.statistics["sent_back"] += 1
        else:
            self.statistics["unreachable_received"] += 1
            self._local_unreachable(addr)

    def _on_link_unreachable(self, addr: Address) -> None:
        self.statistics["link_unreachable"] += 1
        node = self._target_nodes.get((addr[0], addr[1]))
        if node is not None:
            self._down[node] = trio.current_time()
        what = "the cluster link of %s at %s is unreachable: its devices are answered directly"
        self._log_once("link_unreachable", what, node, addr)

    # -- helpers ----------------------------------------------------------------------------

    def _local(self, data: bytes, addr: Address) -> None:
        if self.ingress:
            self.ingress.pop(addr, None)  # (it talks to this node directly now)
        self._local_datagram(data, addr)

    def _gone(self, node: str) -> bool:
        """Whether `node` is not among the view's live nodes (read at most once a
        `LIVE_REFRESH`), or its link answered with an ICMP error within `DOWN_TIME`."""
        now = trio.current_time()
        down = self._down.get(node)
        if down is not None:
            if now < down + DOWN_TIME:
                return True
            del self._down[node]
        if now >= self._live_at + LIVE_REFRESH:
            self._live_at = now
            self._live = frozenset(self.view.live_nodes())
        return node not in self._live

    def _owner_elsewhere(self, slot: int) -> str | None:
        """The node serving `slot` if another does, else None (handled here)."""
        view = self.view
        if view.mine(slot):
            return None
        return view.owner(slot)

    def _forward(self, owner: str, data: bytes, addr: Address) -> None:
        if self._send_frame(owner, wire.FORWARD, addr, data):
            self.statistics["forwarded"] += 1

    def _send_frame(self, node: str, kind: int, addr: Address, payload: bytes) -> bool:
        target = self._target(node)
        endpoint = self._endpoint
        if target is None or endpoint is None:
            why = "the link is not running" if endpoint is None else f"no link address for {node}"
            self._dropped("target", "a %s frame not sent: %s", wire.KIND_NAMES[kind], why)
            return False
        try:
            frame = wire.encode(kind, self.view.node, addr, payload, self._key, self._wall())
            endpoint.send(frame, target)
        except (ValueError, OSError, trio.ClosedResourceError) as exc:
            self._dropped("send", "a %s frame to %s not sent: %r", wire.KIND_NAMES[kind], node, exc)
            return False
        return True

    def _target(self, node: str) -> HostPort | None:
        """`node`'s link address, if the view knows one and it is numeric (a name would be
        resolved on every send, blocking the event loop)."""
        target = self.view.link_address(node)
        if target is None:
            return None
        numeric = self._targets.get(target)
        if numeric is None:
            try:
                ipaddress.ip_address(target[0])
                numeric = True
            except ValueError:
                numeric = False
                log.error("the cluster link address of node %s is not numeric: %r", node, target)
            if len(self._targets) >= 1024:
                self._targets.clear()
                self._target_nodes.clear()
            self._targets[target] = numeric
            self._target_nodes[target] = node
        return target if numeric else None

    def _unowned(self, data: bytes, addr: Address) -> None:
        """A datagram for a slot nobody serves now: a Register gets 5.03 with Max-Age."""
        try:
            msg = coap_message.decode(data)
            register = reg_iface.classify(msg) == "register"
        except DecodeError:
            register = False
        send = self._send
        if not register or send is None or not self.may_send():
            self.statistics["unowned_dropped"] += 1
            self._log_once("unowned", "a datagram from %s for a slot nobody serves now: dropped",
                           addr)  # fmt: skip
            return
        options: tuple[coap_message.Option, ...] = ((_MAX_AGE, uint_bytes(self._retry_after)),)
        block1 = msg.option(_BLOCK1)
        if block1 is not None:
            options = ((_MAX_AGE, options[0][1]), (_BLOCK1, block1))
        if msg.mtype == _CON:
            reply = Message(MessageType.ACK, Code.SERVICE_UNAVAILABLE, msg.mid, msg.token, options)
        else:
            self._non_mid = mid = (self._non_mid + 1) & 0xFFFF
            reply = Message(MessageType.NON, Code.SERVICE_UNAVAILABLE, mid, msg.token, options)
        self.statistics["unowned_registers"] += 1
        try:
            send(coap_message.encode(reply), addr)
        except (OSError, trio.ClosedResourceError) as exc:
            self._log_once("unowned_send", "a 5.03 to %s not sent: %r", addr, exc)

    def _refuse(self, reason: str, source: Address, detail: str) -> None:
        self.statistics["frames_refused"] += 1
        self._log_once("refused:" + reason, "a cluster link frame from %s refused: %s",
                       source, detail)  # fmt: skip

    def _dropped(self, kind: str, message: str, *args: object) -> None:
        self.statistics["link_dropped"] += 1
        self._log_once("dropped:" + kind, message, *args)

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        """Log a warning, at most once per `LOG_INTERVAL` per kind (a bounded set)."""
        now = trio.current_time()
        if now >= self._logged_at.get(kind, -math.inf) + LOG_INTERVAL:
            self._logged_at[kind] = now
            log.warning(message + " (more like it are counted, not logged, for a minute)", *args)


def _remember(table: OrderedDict[Address, _V], addr: Address, value: _V, limit: int) -> None:
    """Set `table[addr]` as the most recently used entry; the least recent beyond `limit` go."""
    table[addr] = value
    table.move_to_end(addr)
    if len(table) > limit:
        table.popitem(last=False)


def _request_slot(data: bytes, count: int) -> int | None:
    """The slot of a request the owner sends (its token is a cluster token), else None: an
    answer to the device's own request carries the device's token, which names nothing."""
    if len(data) < 4 + TOKEN_LENGTH or not 1 <= data[1] <= 31 or data[0] & 0x0F != TOKEN_LENGTH:
        return None
    return slot_of_token(data[4 : 4 + TOKEN_LENGTH], count)
