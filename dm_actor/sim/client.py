"""One simulated LwM2M client: registration life cycle, requests served, observations.

`SimDevice` is an `ObjectTree` (its LwM2M objects) plus the client side of the protocol on
one `CoapEndpoint`: Register, Update at `update_interval(lifetime)`, re-Register when the
registration is lost, answers to the server's requests, notifications by the rules, LwM2M
Send of its temperatures every `Profile.send_interval` (optional), a small message buffer
(`Profile.buffer_size`, as Anjay's `--outbuf-size`/`--inbuf-size`: its own requests in Block1
blocks, a bare 4.13 to a request over the buffer, a request body in Block1 blocks put back
together), and queue mode that really sleeps: after its awake window the device asks the
network to close its socket or connection, and on waking it opens a new one and sends an
Update (or a Register, as Anjay does).

It never touches a socket or reads a clock: the fleet calls `on_timer`, `on_datagram`,
`on_stream_data`, `on_connected` and `on_closed` with `now`, asks `deadline()` when to call
next, and carries out what the device asks through the `Network` it was given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dm_actor.coap import framing_tcp
from dm_actor.coap.blockwise import (
    Block,
    Block1Receiver,
    Block1Sender,
    Complete,
    Continue,
    Failed,
    Send,
    get_block,
    get_size,
    size_option,
)
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.events import (
    NotificationFailed,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from dm_actor.coap.message import Message, Option, encode, query_options, uint_bytes
from dm_actor.coap.numbers import Code, ContentFormat, OptionNumber, TransmissionParameters
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import ResourceValue
from dm_actor.lwm2m.errors import InvalidPath
from dm_actor.lwm2m.path import from_segments
from dm_actor.lwm2m.registration import update_interval
from dm_actor.sim.objects import (
    WANT_OBJECTS,
    WANT_REBOOT,
    WANT_UPDATE,
    ObjectTree,
    World,
    next_check,
    notification_due,
)

if TYPE_CHECKING:
    import socket

    from dm_actor.dtls import DtlsClient, Session

# device states
IDLE = 0  # not started, or waiting to retry / reboot (`next_at`)
CONNECTING = 1  # waiting for the network (a TCP connect) before `then`
REGISTERING = 2  # a Register is in flight
REGISTERED = 3  # registered and awake
SLEEPING = 4  # queue mode: socket closed until `next_at`

# what is in flight (`req_kind`), or what to send once connected (`then`)
REGISTER = 1
UPDATE = 2
SEND = 3  # LwM2M Send (never in `then`)

# transports (`transport`)
SHARED_UDP = 0  # a socket shared with other devices, told apart by source address
OWN_UDP = 1  # a socket of its own, closed while asleep
TCP = 2

_URI_PATH = OptionNumber.URI_PATH.value
_CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
_OBSERVE = OptionNumber.OBSERVE.value
_LOCATION_PATH = OptionNumber.LOCATION_PATH.value
_LINK_FORMAT = ContentFormat.LINK_FORMAT.value
_URI_QUERY = OptionNumber.URI_QUERY.value
_BLOCK1 = OptionNumber.BLOCK1.value
_SIZE1 = OptionNumber.SIZE1.value
_CON = 0
_ACK = 2
_RST = 3
_TOO_LARGE = Code.REQUEST_ENTITY_TOO_LARGE.value
#: the smallest `Profile.buffer_size`: a request's options and token plus a 16-byte block
MIN_BUFFER_SIZE = 64
#: the largest request body a device puts back together from Block1 blocks
MAX_BLOCK1_BODY = 64 * 1024
_RD = (_URI_PATH, b"rd")
_LINK_FORMAT_OPTION = (_CONTENT_FORMAT, uint_bytes(_LINK_FORMAT))
_LWM2M_1_1 = (_URI_QUERY, b"lwm2m=1.1")
_BINDING_U = (_URI_QUERY, b"b=U")
_BINDING_T = (_URI_QUERY, b"b=T")
_QUEUE = (_URI_QUERY, b"Q")
_DP = (_URI_PATH, b"dp")
#: the formats a simulated device can Send in
SEND_FORMATS = {"cbor": ContentFormat.SENML_CBOR.value, "json": ContentFormat.SENML_JSON.value}
_INF = math.inf
_PING = Code.PING.value


@dataclass(frozen=True, slots=True)
class Profile:
    """How the devices of a fleet behave (shared by all of them).

    Attributes:
        awake: queue mode: seconds a device stays awake after its last exchange.
        sleep: queue mode: seconds asleep before waking on its own (None: wake only for
            Updates).
        register_on_wake: wake with a full Register instead of an Update (Anjay).
        confirmable_notifications: send notifications as CON (default NON, as Wakaama).
        record: keep every request executed in `SimDevice.executed` (tests).
        reboot_delay: seconds from answering Execute /3/0/4 to registering again.
        retry_base: seconds before the first retry of a failed Register; doubling.
        retry_max: the longest wait between Register attempts.
        send_interval: seconds between two LwM2M Sends of a registered device's temperatures
            (`POST /dp`, every `/3303/x/5700` with its time); None: no Sends. The first comes
            at a random point of the first interval after registering, so a fleet that
            registers at once does not Send at once.
        send_format: the Sends' content format (SenML CBOR 112, as Anjay; SenML JSON 110, as
            Wakaama).
        buffer_size: the largest CoAP message the device sends or takes, in bytes, as Anjay's
            `--outbuf-size N --inbuf-size N` (None: no limit). A Register, Update or Send
            whose body is larger than the largest block whose message fits goes in Block1
            blocks of that size, as Anjay does (RFC 7959 2.5: the same options in each, a new
            Message ID and token per block, the next block after the 2.31; a smaller size
            the server asks for is followed); a request from the server larger than this
            gets a bare 4.13 (its token only, no Size1 nor Block1, as Anjay); a request body
            in Block1 blocks is answered 2.31 per block and executed once, whole. Over TCP
            the CSM announces it as Max-Message-Size.
        params: CoAP transmission parameters of the devices.
    """

    awake: float = 93.0
    sleep: float | None = None
    register_on_wake: bool = False
    confirmable_notifications: bool = False
    record: bool = False
    reboot_delay: float = 2.0
    retry_base: float = 5.0
    retry_max: float = 300.0
    send_interval: float | None = None
    send_format: int = ContentFormat.SENML_CBOR.value
    buffer_size: int | None = None
    params: TransmissionParameters = field(default_factory=TransmissionParameters)

    def __post_init__(self) -> None:
        if self.buffer_size is not None and self.buffer_size < MIN_BUFFER_SIZE:
            raise ValueError(f"buffer_size must be at least {MIN_BUFFER_SIZE} bytes")


class Totals:
    """Counters over the whole fleet (the live progress line and the summary)."""

    __slots__ = (
        "blocks_received",
        "blocks_sent",
        "errors",
        "notifications",
        "reboots",
        "registered",
        "registrations",
        "requests",
        "sends",
        "sends_refused",
        "sleeping",
        "too_large",
        "updates",
        "wakes",
    )

    def __init__(self) -> None:
        self.registered = 0  # registered right now
        self.registrations = 0
        self.updates = 0
        self.requests = 0
        self.notifications = 0
        self.errors = 0
        self.sleeping = 0  # asleep right now
        self.wakes = 0
        self.reboots = 0
        self.sends = 0  # LwM2M Sends answered 2.04
        self.sends_refused = 0  # ... answered with another code (4.04 also re-registers)
        self.blocks_sent = 0  # Block1 blocks of the devices' own requests (small buffer)
        self.blocks_received = 0  # Block1 blocks of the server's requests
        self.too_large = 0  # requests over a device's buffer, answered with a bare 4.13

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Network(Protocol):
    """What a device asks of the fleet."""

    totals: Totals

    def send(self, device: SimDevice, data: bytes) -> None:
        """Send a datagram (or TCP frames) from the device to the server."""

    def open(self, device: SimDevice) -> bool:
        """Give the device a transport: True when usable now; False when `on_connected` (or
        `on_closed`) follows."""

    def close(self, device: SimDevice) -> None:
        """Close the device's own socket or connection (a shared socket stays open)."""


class Executed:
    """A request the device executed (recorded when `Profile.record` is set)."""

    __slots__ = ("at", "code", "mid", "path", "payload", "token")

    def __init__(
        self, at: float, code: int, path: str, mid: int, token: bytes, payload: bytes = b""
    ) -> None:
        self.at = at
        self.code = code
        self.path = path
        self.mid = mid
        self.token = token
        self.payload = payload  # the whole body (put together when it came in blocks)

    def __repr__(self) -> str:
        return f"Executed({self.at:.3f}, {self.code}, {self.path!r}, mid={self.mid})"


class Observation:
    """An observation the server holds on this device."""

    __slots__ = ("accept", "check_at", "ids", "last", "last_time", "token")

    def __init__(
        self, token: bytes, ids: tuple[int, ...], accept: int | None, last: object, now: float
    ) -> None:
        self.token = token
        self.ids = ids
        self.accept = accept
        self.last = last
        self.last_time = now
        self.check_at = now


def observed_value(ids: tuple[int, ...], values: list[ResourceValue]) -> object:
    """What the rules compare: the value of a single resource, else all values."""
    if len(ids) >= 3 and len(values) == 1 and values[0].path.count("/") == len(ids):
        return values[0].value
    return tuple(values)


class SimDevice(ObjectTree):
    """One simulated client. Fields after `errors` belong to the fleet that drives it.

    Args:
        net: the fleet.
        profile: the fleet's behaviour settings.
        world: what the fleet's devices share.
        index: the device's number in its fleet.
        endpoint: its endpoint name.
        transport: SHARED_UDP, OWN_UDP or TCP.
        queue: queue mode (binding UQ or TQ).
        lifetime: the registration lifetime it asks for.
        start_at: when it first registers.
        temperatures: `/3303` instances.
        lights: `/3311` instances.
    """

    __slots__ = (
        "awake_until",
        "coap",
        "decoder",
        "dtls",
        "due",
        "errors",
        "executed",
        "failures",
        "inbound",
        "index",
        "location",
        "net",
        "next_at",
        "notifications",
        "notified",
        "obs_seq",
        "observations",
        "port",
        "profile",
        "queue",
        "registrations",
        "req_kind",
        "req_token",
        "requests",
        "send_at",
        "sends",
        "sock",
        "src",
        "state",
        "then",
        "transport",
        "update_at",
        "updates",
        "upload",
    )

    def __init__(
        self,
        net: Network,
        profile: Profile,
        world: World,
        index: int,
        endpoint: str,
        *,
        transport: int = SHARED_UDP,
        queue: bool = False,
        lifetime: int = 86400,
        start_at: float = 0.0,
        temperatures: int = 1,
        lights: int = 1,
    ) -> None:
        binding = ("T" if transport == TCP else "U") + ("Q" if queue else "")
        super().__init__(
            endpoint,
            world,
            start_at,
            lifetime=lifetime,
            binding=binding,
            temperatures=temperatures,
            lights=lights,
        )
        self.net = net
        self.profile = profile
        self.index = index
        self.transport = transport
        self.queue = queue
        self.state = IDLE
        self.next_at = start_at
        self.update_at = _INF
        self.awake_until = _INF
        self.send_at = _INF
        self.then = REGISTER
        self.location = ""
        self.failures = 0
        self.req_token: bytes | None = None
        self.req_kind = 0
        # small buffer: our request going out in blocks (the sender, the request's options)
        self.upload: tuple[Block1Sender, tuple[Option, ...]] | None = None
        # small buffer: a request of the server's coming in blocks (code and Uri-Path, receiver)
        self.inbound: tuple[tuple[int, tuple[str, ...]], Block1Receiver] | None = None
        self.coap = self._new_endpoint()
        self.decoder: framing_tcp.StreamDecoder | None = None
        self.observations: dict[bytes, Observation] | None = None
        self.notified: dict[int, bytes] | None = None  # Message ID of a NON notification -> token
        self.obs_seq = 0
        self.registrations = 0
        self.updates = 0
        self.requests = 0
        self.notifications = 0
        self.sends = 0
        self.errors = 0
        self.executed: list[Executed] | None = [] if profile.record else None
        # the fleet's: its socket, source address index, bound port, scheduled deadline, and
        # over DTLS its handshake (a DtlsClient) or then its established Session
        self.sock: socket.socket | None = None
        self.dtls: DtlsClient | Session | None = None
        self.src = 0
        self.port = 0
        self.due = _INF

    def _new_endpoint(self) -> CoapEndpoint:
        rng = self.world.rng
        params = self.profile.params
        return CoapEndpoint(
            params,
            reliable=self.transport == TCP,
            rng=None if params.ack_random_factor == 1.0 else rng,
            mid_start=rng.randrange(0x10000),
            token_seed=rng.getrandbits(32),
            dedup_limit=8,
        )

    # -- what the fleet calls ------------------------------------------------------------

    def deadline(self) -> float:
        """When `on_timer` must be called next (inf: only when something arrives)."""
        state = self.state
        if state == REGISTERED:
            at = _INF
            if self.req_token is None:  # as in `on_timer`: no Update, Send nor sleep meanwhile
                at = self.update_at
                if self.queue and self.awake_until < at:
                    at = self.awake_until
                if self.send_at < at:
                    at = self.send_at
            observations = self.observations
            if observations:
                for obs in observations.values():
                    if obs.check_at < at:
                        at = obs.check_at
        elif state in (IDLE, SLEEPING):
            at = self.next_at
        else:
            at = _INF
        timer = self.coap.get_timer()
        if timer is not None and timer < at:
            at = timer
        return at

    def on_timer(self, now: float) -> None:
        """Retransmit, fail, register, update, sleep, wake and notify as due at `now`."""
        coap = self.coap
        timer = coap.get_timer()
        if timer is not None and timer <= now:
            coap.handle_timer(now)
            self._process(now)
        state = self.state
        if state == REGISTERED:
            if self.req_token is None:
                if self.update_at <= now:
                    self._update(now)
                elif self.send_at <= now:
                    self._send(now)
                elif self.queue and self.awake_until <= now:
                    self._sleep(now)
            if self.observations:
                self._check_observations(now)
        elif state in (IDLE, SLEEPING) and self.next_at <= now:
            self._start(now, wake=state == SLEEPING)
        self._process(now)

    def on_datagram(self, data: bytes, now: float) -> None:
        """A datagram from the server."""
        notified = self.notified
        if notified and len(data) >= 4 and (data[0] >> 4) & 3 == _RST:
            token = notified.pop((data[2] << 8) | data[3], None)
            if token is not None and self.observations:
                self.observations.pop(token, None)  # RFC 7641 3.6: a Reset cancels
        if self.queue and self.state == REGISTERED:
            self.awake_until = max(self.awake_until, now + self.profile.awake)
        buffer = self.profile.buffer_size
        if buffer is not None and len(data) > buffer:
            self._too_large(data)
            return
        self.coap.receive_datagram(data, now)
        self._process(now)

    def _too_large(self, data: bytes) -> None:
        """A datagram over the buffer: a CON request gets a bare 4.13 (its token only, no
        Size1 nor Block1, as Anjay answers); anything else is dropped, as it cannot be read."""
        if len(data) < 4 or data[0] >> 6 != 1 or (data[0] >> 4) & 3 != _CON:
            return
        code = data[1]
        tkl = data[0] & 0xF
        if not 0 < code < 32 or tkl > 8 or len(data) < 4 + tkl:
            return
        ack = Message(_ACK, _TOO_LARGE, (data[2] << 8) | data[3], data[4 : 4 + tkl])
        self.net.totals.too_large += 1
        self.net.send(self, encode(ack))

    def on_stream_data(self, data: bytes, now: float) -> None:
        """Bytes from the device's TCP connection."""
        decoder = self.decoder
        if decoder is None:
            return
        decoder.receive_data(data)
        if self.queue and self.state == REGISTERED:
            self.awake_until = max(self.awake_until, now + self.profile.awake)
        coap = self.coap
        buffer = self.profile.buffer_size
        try:
            while (msg := decoder.next_message()) is not None:
                if msg.code >= 0xE0:
                    if not self._signal(msg, now):
                        return
                elif buffer is not None and len(framing_tcp.encode(msg)) > buffer:
                    if msg.code < 32:  # a request: a bare 4.13, as over UDP
                        self.net.totals.too_large += 1
                        answer = Message(0, _TOO_LARGE, 0, msg.token)
                        self.net.send(self, framing_tcp.encode(answer))
                elif msg.code:
                    coap.receive_message(msg, now)
        except DecodeError:
            self.net.send(self, framing_tcp.encode(framing_tcp.abort("bad frame")))
            self._lost(now)
            return
        self._process(now)

    def on_connected(self, now: float) -> None:
        """The TCP connection is up: CSM first (RFC 8323 5.3), then what was waiting. (Over
        DTLS: the session is established, then what was waiting.)"""
        if self.transport == TCP:
            self.decoder = framing_tcp.StreamDecoder()
            buffer = self.profile.buffer_size
            csm = framing_tcp.csm() if buffer is None else framing_tcp.csm(buffer)
            self.net.send(self, framing_tcp.encode(csm))
        self._begin(now)
        self._process(now)

    def on_closed(self, now: float) -> None:
        """The TCP connection failed or the server closed it (over DTLS: the handshake
        failed or the server ended the session)."""
        if self.state != SLEEPING:
            self._lost(now)

    # -- life cycle -------------------------------------------------------------------------

    def _start(self, now: float, *, wake: bool) -> None:
        if wake:
            self.net.totals.sleeping -= 1
            self.net.totals.wakes += 1
            self.then = REGISTER if self.profile.register_on_wake else UPDATE
        else:
            self.then = REGISTER
        if self.transport == TCP:
            self.coap = self._new_endpoint()  # a new connection has no CoAP state
        if self.net.open(self):
            self._begin(now)
        else:
            self.state = CONNECTING

    def _begin(self, now: float) -> None:
        if self.then == UPDATE and self.location:
            self.state = REGISTERED
            self.awake_until = now + self.profile.awake
            self._update(now)
        else:
            self._register(now)

    def _register(self, now: float) -> None:
        self._set_location("")
        self.observations = self.notified = None  # a new registration starts afresh
        self.inbound = None
        options: tuple[Option, ...] = (
            _RD,
            _LINK_FORMAT_OPTION,
            (_URI_QUERY, f"ep={self.endpoint}".encode()),
            (_URI_QUERY, b"lt=%d" % self.lifetime),
            _LWM2M_1_1,
            _BINDING_T if self.transport == TCP else _BINDING_U,
        )
        if self.queue:
            options += (_QUEUE,)
        self._request(REGISTER, options, self.object_links(), now)
        self.state = REGISTERING

    def _update(self, now: float) -> None:
        wants = self.wants
        self.wants = wants & WANT_REBOOT
        options: tuple[Option, ...] = tuple(
            (_URI_PATH, s.encode()) for s in self.location.split("/")
        )
        payload = b""
        if wants & WANT_OBJECTS:
            options += (_LINK_FORMAT_OPTION,)
            payload = self.object_links()
        if wants & WANT_UPDATE:
            options += query_options(f"lt={self.lifetime}")
        self._request(UPDATE, options, payload, now)
        self.update_at = _INF

    def _send(self, now: float) -> None:
        """LwM2M Send (`POST /dp`) of every temperature's value, with its time."""
        interval = self.profile.send_interval
        assert interval is not None
        self.send_at = now + interval
        world = self.world
        tick = self.tick(now)
        stamp = world.epoch + now
        values = [
            ResourceValue(f"/3303/{t.iid}/5700", t.sample(world, tick), stamp)
            for t in self.temperatures
        ]
        if not values:
            return
        fmt = self.profile.send_format
        options = (_DP, (_CONTENT_FORMAT, uint_bytes(fmt)))
        self._request(SEND, options, content.encode(fmt, values), now)

    def _sent(self, code: int, now: float) -> None:
        if code == Code.CHANGED:
            self.sends += 1
            self.net.totals.sends += 1
            return
        self.errors += 1
        self.net.totals.errors += 1
        self.net.totals.sends_refused += 1
        if code == Code.NOT_FOUND:
            self._register(now)  # the server does not know it (any more)

    def _request(self, kind: int, options: tuple[Option, ...], payload: bytes, now: float) -> None:
        self.req_kind = kind
        self.upload = None
        buffer = self.profile.buffer_size
        if buffer is not None and payload:
            szx = _block_szx(options, len(payload), buffer)
            if szx is not None:
                sender = Block1Sender(payload, szx)
                self.upload = (sender, options)
                self._send_block(sender.current, now)
                return
        self.req_token = self.coap.send_request(Code.POST, options, payload, now)

    def _send_block(self, step: Send, now: float) -> None:
        """The next block of our request: the same options, a new Message ID and token."""
        upload = self.upload
        assert upload is not None
        options = (*upload[1], step.block.option(_BLOCK1))
        self.req_token = self.coap.send_request(Code.POST, options, step.payload, now)
        self.net.totals.blocks_sent += 1

    def _sleep(self, now: float) -> None:
        timer = self.coap.get_timer()
        if timer is not None:  # an exchange is still open: stay up for it
            self.awake_until = max(timer, now)
            return
        self.net.close(self)
        if self.transport == TCP:
            # RFC 8323 7.2: observations end with the connection
            self.decoder = None
            self.observations = None
        self.state = SLEEPING
        self.net.totals.sleeping += 1
        sleep = self.profile.sleep
        self.next_at = self.update_at if sleep is None else min(now + sleep, self.update_at)

    def _lost(self, now: float) -> None:
        """The registration cannot go on (connection lost, Register refused): retry later."""
        self.errors += 1
        self.net.totals.errors += 1
        self.failures += 1
        self.net.close(self)
        self.decoder = None
        self._set_location("")
        self.req_token = None
        self.upload = self.inbound = None
        self.observations = self.notified = None
        delay = self.profile.retry_base * (1 << min(self.failures - 1, 16))
        self.state = IDLE
        self.next_at = now + min(delay, self.profile.retry_max)

    def _reboot(self, now: float) -> None:
        self.wants = 0
        self.net.totals.reboots += 1
        self.net.close(self)
        self.decoder = None
        self._set_location("")
        self.req_token = None
        self.upload = self.inbound = None
        self.observations = self.notified = None
        self.coap = self._new_endpoint()
        self.dtls = None  # a reboot loses the DTLS session too: a new handshake follows
        self.state = IDLE
        self.next_at = now + self.profile.reboot_delay

    def _set_location(self, location: str) -> None:
        if bool(location) != bool(self.location):
            self.net.totals.registered += 1 if location else -1
        self.location = location

    # -- events from the CoAP layer -----------------------------------------------------------

    def _process(self, now: float) -> None:
        coap = self.coap
        while (event := coap.next_event()) is not None:
            if isinstance(event, RequestReceived):
                self._serve(event.request, now)
            elif isinstance(event, ResponseReceived):
                if event.token == self.req_token:
                    self._response(event.response, now)
            elif isinstance(event, RequestFailed):
                if event.token == self.req_token:
                    self._failed(now)
            elif isinstance(event, NotificationFailed) and self.observations:
                self.observations.pop(event.token, None)
        for data in coap.datagrams_to_send():
            self.net.send(self, data)
        if self.wants & WANT_REBOOT:
            self._reboot(now)

    def _response(self, response: Message, now: float) -> None:
        upload = self.upload
        if upload is not None:
            try:
                block1 = get_block(response, _BLOCK1)
            except DecodeError:
                block1 = None
            step = upload[0].on_response(response.code, block1)
            if isinstance(step, Send):
                self._send_block(step, now)
                return
            self.upload = None
            if isinstance(step, Failed):  # the server broke the transfer
                self._failed(now)
                return
        kind = self.req_kind
        self.req_token = None
        code = response.code
        if kind == REGISTER:
            if code != Code.CREATED:
                self._lost(now)
                return
            self.registrations += 1
            self.net.totals.registrations += 1
            self.failures = 0
            self._set_location("/".join(response.location_path))
            self.state = REGISTERED
            self.update_at = now + update_interval(self.lifetime)
            self.awake_until = now + self.profile.awake
            interval = self.profile.send_interval
            if interval is not None:
                self.send_at = now + interval * self.world.rng.random()
        elif kind == SEND:
            self._sent(code, now)
        elif code == Code.CHANGED:
            self.updates += 1
            self.net.totals.updates += 1
            self.update_at = now + update_interval(self.lifetime)
            self.awake_until = max(self.awake_until, now + self.profile.awake)
            if self.observations:
                for obs in self.observations.values():
                    obs.check_at = now  # stored notifications go out after the Update
        else:
            self.errors += 1
            self.net.totals.errors += 1
            self._register(now)  # 4.04: the server lost the registration

    def _failed(self, now: float) -> None:
        self.req_token = None
        self.upload = None
        if self.req_kind == REGISTER:
            self._lost(now)
        elif self.req_kind == SEND:  # not answered: the next Send comes at its time
            self.errors += 1
            self.net.totals.errors += 1
        else:
            self.errors += 1
            self.net.totals.errors += 1
            self._register(now)

    def _signal(self, msg: Message, now: float) -> bool:
        """An RFC 8323 signalling message; False when the connection ends."""
        code = msg.code
        if code == _PING:
            self.net.send(self, framing_tcp.encode(framing_tcp.pong(msg.token)))
        elif code in (Code.RELEASE, Code.ABORT):
            self._lost(now)
            return False
        return True  # CSM and Pong need nothing

    # -- serving the server's requests ------------------------------------------------------

    def _serve(self, req: Message, now: float) -> None:
        whole = req.option(_BLOCK1) is None  # (a request in blocks counts once, when whole)
        if whole:
            self.requests += 1
            self.net.totals.requests += 1
        try:
            segments = req.uri_path
            ids = from_segments(segments).ids
            block1 = get_block(req, _BLOCK1)
        except DecodeError as exc:
            answer = Code.BAD_OPTION if exc.reply == Reply.BAD_OPTION else Code.BAD_REQUEST
            self.coap.respond(req, answer, (), b"", now)
            return
        except InvalidPath:
            self.coap.respond(req, Code.BAD_REQUEST, (), b"", now)
            return
        echo: tuple[Option, ...] = ()
        if block1 is not None:
            body = self._take_block(req, segments, block1, now)
            if body is None:
                return
            req = body
            echo = ((_BLOCK1, block1.encode()),)  # the last block's Block1, echoed (2.3)
            self.requests += 1
            self.net.totals.requests += 1
        if self.executed is not None:
            path = "/" + "/".join(segments)
            self.executed.append(Executed(now, req.code, path, req.mid, req.token, req.payload))
        code = req.code
        options: tuple[Option, ...] = ()
        payload = b""
        if code == Code.GET:
            if req.accept == _LINK_FORMAT:
                found = self.discover(ids)
                if isinstance(found, int):
                    result = found
                else:
                    result, payload = Code.CONTENT, found
                    options = ((_CONTENT_FORMAT, uint_bytes(_LINK_FORMAT)),)
            else:
                result, options, payload = self._read(req, ids, now)
        elif code == Code.PUT:
            query = req.uri_query
            if query and not req.payload:
                result = self.write_attributes(ids, "&".join(query))
            else:
                result = self.write(ids, req.content_format, req.payload, now)
        elif code == Code.POST:
            if len(ids) == 1:
                result, instance_id = self.create(ids[0], req.content_format, req.payload, now)
                if instance_id is not None:
                    options = ((_LOCATION_PATH, segments[0].encode()),
                               (_LOCATION_PATH, str(instance_id).encode()))  # fmt: skip
            elif len(ids) == 2:
                result = self.write(ids, req.content_format, req.payload, now)
            else:
                result = self.execute(ids, now)
        elif code == Code.DELETE:
            result = self.delete(ids)
        else:
            result = Code.METHOD_NOT_ALLOWED
        if echo:
            options = tuple(sorted((*options, *echo), key=_option_number))
        self.coap.respond(req, result, options, payload, now)
        if self.wants & (WANT_UPDATE | WANT_OBJECTS):
            self.update_at = now
        if self.observations and code != Code.GET:
            for obs in self.observations.values():
                obs.check_at = min(obs.check_at, now)

    def _take_block(
        self, req: Message, segments: tuple[str, ...], block1: Block, now: float
    ) -> Message | None:
        """One block of a request body sent in Block1 blocks (RFC 7959 2.3): answered 2.31
        echoing its Block1 until the last, which returns the request with the whole body."""
        self.net.totals.blocks_received += 1
        key = (req.code, segments)
        inbound = self.inbound
        if inbound is None or inbound[0] != key:
            if block1.num != 0:  # the middle of a transfer we do not know
                self.coap.respond(req, Code.REQUEST_ENTITY_INCOMPLETE, (), b"", now)
                return None
            self.inbound = inbound = (key, Block1Receiver(max_body=MAX_BLOCK1_BODY))
        step = inbound[1].feed(block1, req.payload, get_size(req, _SIZE1))
        if isinstance(step, Continue):
            self.coap.respond(req, Code.CONTINUE, (step.block.option(_BLOCK1),), b"", now)
            return None
        self.inbound = None
        if isinstance(step, Complete):
            return req._replace(payload=step.body)
        size1 = () if step.size1 is None else (size_option(_SIZE1, step.size1),)
        self.coap.respond(req, step.code, size1, b"", now)
        return None

    def _read(
        self, req: Message, ids: tuple[int, ...], now: float
    ) -> tuple[int, tuple[Option, ...], bytes]:
        accept = req.accept
        result, content_format, payload, values = self.read_encoded(ids, accept, now)
        if result != Code.CONTENT:
            return result, (), b""
        ct = (_CONTENT_FORMAT, uint_bytes(content_format))
        observe = req.observe
        observations = self.observations
        if observe == 0:
            obs = Observation(req.token, ids, accept, observed_value(ids, values), now)
            obs.check_at = next_check(self.rules(ids), now, self.next_change(now))
            if observations is None:
                self.observations = observations = {}
            observations[req.token] = obs
            self.obs_seq = seq = (self.obs_seq + 1) & 0xFFFFFF
            return result, ((_OBSERVE, uint_bytes(seq)), ct), payload
        if observe == 1 and observations:
            observations.pop(req.token, None)
        return result, (ct,), payload

    def _check_observations(self, now: float) -> None:
        observations = self.observations
        assert observations is not None
        for token, obs in list(observations.items()):
            if obs.check_at > now:
                continue
            ids = obs.ids
            result, content_format, payload, values = self.read_encoded(ids, obs.accept, now)
            if result != Code.CONTENT:
                del observations[token]
                self.coap.notify(token, result, (), b"", now)  # ends the observation
                continue
            value = observed_value(ids, values)
            rules = self.rules(ids)
            if notification_due(rules, obs.last, obs.last_time, value, now):
                self._notify(token, content_format, payload, now)
                obs.last = value
                obs.last_time = now
            obs.check_at = next_check(rules, obs.last_time, self.next_change(now))

    def _notify(self, token: bytes, content_format: int, payload: bytes, now: float) -> None:
        self.obs_seq = seq = (self.obs_seq + 1) & 0xFFFFFF
        options = ((_OBSERVE, uint_bytes(seq)), (_CONTENT_FORMAT, uint_bytes(content_format)))
        confirmable = self.profile.confirmable_notifications
        coap = self.coap
        coap.notify(token, Code.CONTENT, options, payload, now, confirmable=confirmable)
        self.notifications += 1
        self.net.totals.notifications += 1
        out = coap.datagrams_to_send()
        for data in out:
            self.net.send(self, data)
        if not confirmable and self.transport != TCP and out:
            last = out[-1]
            notified = self.notified
            if notified is None:
                self.notified = notified = {}
            elif len(notified) >= 8:
                del notified[next(iter(notified))]
            notified[(last[2] << 8) | last[3]] = token


def _option_number(option: Option) -> int:
    return option[0]


def _block_szx(options: tuple[Option, ...], length: int, buffer: int) -> int | None:
    """The Block1 size exponent for a request body of `length` bytes with these options from a
    device whose messages hold at most `buffer` bytes: the largest block whose message fits
    (at least 16 bytes); None when the body is not larger than that block and goes whole.

    As Anjay: with a 256-byte buffer its 175-byte Register (whole, about 230 bytes) goes in
    blocks of 128, with a 128-byte one in blocks of 64 (tests/vectors' captures)."""
    head = len(encode(Message(_CON, Code.POST, 0, b"\0" * 4, (*options, (_BLOCK1, b"\0" * 3)))))
    szx = 6
    while szx > 0 and head + 1 + (16 << szx) > buffer:
        szx -= 1
    return None if length <= 16 << szx else szx
