"""A device machine built in float time, the actor's contract checked on its effects, and a
fake device that answers the machine's CoAP bytes (the `dm_actor.coap` codec: real datagrams,
real RFC 8323 frames).

No trio, no sockets, no clock: every time is a float the test chooses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from dm_actor.coap import framing_tcp
from dm_actor.coap.blockwise import Block, get_block, slice_block2
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.message import (
    Message,
    Option,
    decode,
    encode,
    path_options,
    query_options,
    sort_options,
    uint_bytes,
)
from dm_actor.coap.numbers import (
    Code,
    MessageType,
    OptionNumber,
    TransmissionParameters,
    is_request,
)
from dm_actor.coap.observe import observe_bytes
from dm_actor.delivery.queue import Command, DeliveryPolicy, DeviceQueue
from dm_actor.device.effects import (
    Effect,
    Finished,
    Hold,
    ReserveMids,
    Send,
)
from dm_actor.device.machine import DeviceMachine, MachineConfig
from dm_actor.lwm2m import registration as lwm2m_registration
from dm_actor.lwm2m.registration import Registration

if TYPE_CHECKING:
    from dm_actor.address import Address

CON, NON, ACK, RST = (int(t) for t in MessageType)
OBSERVE = OptionNumber.OBSERVE.value
BLOCK2 = OptionNumber.BLOCK2.value
MAX_AGE = OptionNumber.MAX_AGE.value
ETAG = OptionNumber.ETAG.value
CONTENT_FORMAT = OptionNumber.CONTENT_FORMAT.value
TEXT = 0  # text/plain
#: RFC 7252's defaults with its random factor: the first timeout is within 2.0..3.0 s
PARAMS = TransmissionParameters(ack_random_factor=1.5, max_retransmit=4)
RESEND_WINDOW = 247.0
ADDR: Address = ("127.0.0.1", 5683)
ADDR2: Address = ("127.0.0.2", 5683)
OBJECTS = b"</1/0>,</3/0>,</3303/0>,</3311/0>"
E = TypeVar("E")


def registration(
    *, queue_mode: bool = False, lifetime: int = 86400, now: float = 0.0
) -> Registration:
    """A registration from a parsed Register of `dev1` (binding U or UQ)."""
    query = f"ep=dev1&lt={lifetime}&lwm2m=1.1&b={'UQ' if queue_mode else 'U'}"
    register = Message(CON, Code.POST, 1, b"t", path_options("/rd") + query_options(query), OBJECTS)
    parsed = lwm2m_registration.parse_register(register, 86400, 2592000, 512)
    assert isinstance(parsed, lwm2m_registration.RegisterRequest), parsed
    return Registration.from_request(parsed, "abc", now)


@dataclass
class Endpoints:
    """The machine's `new_endpoint`: CoAP endpoints with seeded randomness, each with its own
    token range (a new endpoint never reuses an older one's tokens). Without a `mid_start`
    the first Message ID is random, as the server's (`Registry.new_coap_endpoint`), unless
    `mid_default` fixes it."""

    seed: int = 1
    mid_default: int | None = None
    made: list[tuple[bool, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def __call__(self, reliable: bool, mid_start: int | None, name: str = "") -> CoapEndpoint:
        self.made.append((reliable, mid_start))
        start = mid_start
        if start is None:
            start = self.rng.getrandbits(16) if self.mid_default is None else self.mid_default
        return CoapEndpoint(
            PARAMS,
            reliable=reliable,
            rng=self.rng,
            mid_start=start,
            token_seed=len(self.made) << 24,
            dedup_limit=16,
        )


def make_machine(
    *,
    addr: Address | None = ADDR,
    conn: object | None = None,
    mid_start: int | None = None,
    queue_mode: bool = False,
    queue_length: int = 20,
    seed: int = 1,
    mid_default: int | None = None,
    now: float = 0.0,
) -> DeviceMachine:
    """A machine for a registered device, reachable at `addr` (UDP) or on `conn` (TCP)."""
    config = MachineConfig(
        new_endpoint=Endpoints(seed, mid_default),
        resend_window=RESEND_WINDOW,
        registration_grace=0.0,
    )
    queue = DeviceQueue(DeliveryPolicy(queue_length=queue_length), queue_mode=queue_mode, now=now)
    reg = registration(queue_mode=queue_mode, now=now)
    return DeviceMachine(config, reg, queue, addr=addr, conn=conn, mid_start=mid_start)


_ids = iter(range(1, 1 << 62))


def command(
    method: str = "GET",
    uri: str = "/3/0/1",
    payload: bytes = b"",
    *,
    async_id: str | None = None,
    accept: int | None = None,
    content_format: int | None = None,
    now: float = 0.0,
    expiry: float = 300.0,
    retry: int = 2,
    observe: bool = False,
) -> Command:
    if payload and content_format is None:
        content_format = TEXT
    return Command(
        async_id=async_id or f"c{next(_ids)}",
        method=method,
        uri=uri,
        payload=payload,
        content_format=content_format,
        accept=accept,
        accepted_at=now,
        expires_at=now + expiry,
        attempts_left=1 + retry,
        observe=observe,
    )


def of_type(effects: list[Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


def decode_send(send: Send) -> Message:
    """The message a `Send` carries: a datagram, or an RFC 8323 frame when it names a conn."""
    if send.conn is None:
        return decode(send.data)
    decoder = framing_tcp.StreamDecoder()
    decoder.receive_data(send.data)
    msg = decoder.next_message()
    assert msg is not None and decoder.next_message() is None
    return msg


def sent(effects: list[Effect]) -> list[Message]:
    return [decode_send(s) for s in of_type(effects, Send)]


def requests(effects: list[Effect]) -> list[Message]:
    """The requests of the server among `effects` (not its ACKs, Resets or answers)."""
    return [m for m in sent(effects) if is_request(m.code)]


class ContractBroken(AssertionError):
    pass


class Driver:
    """A machine and its actor's side of the contract, in float time.

    `take()` collects the effects and checks them: no request leaves between a `Hold` and
    `durable`; every request's Message ID is below the last reservation made durable, and
    names one exchange within EXCHANGE_LIFETIME; no request twice in one batch; no
    command finishes twice. `durable()` plays the store catching up.
    """

    def __init__(self, machine: DeviceMachine) -> None:
        self.m = machine
        self.log: list[Effect] = []
        self.held = False
        self.pending_limit: int | None = None  # a ReserveMids not yet durable
        self.durable_limit: int | None = None  # the last ReserveMids followed by durable
        self.finished: dict[str, int] = {}
        self.mids_at: dict[int, tuple[float, bytes]] = {}  # request MID -> (first sent, token)
        #: Message IDs a restored command was stored with (rule 7.2 resends its exchange)
        self.restored_mids: set[int] = set()

    def take(self, now: float = 0.0) -> list[Effect]:
        effects = self.m.effects()
        for effect in effects:
            self._check(effect, now)
        burst = [s.data for s in effects if isinstance(s, Send) and is_request(decode_send(s).code)]
        if len(set(burst)) != len(burst):
            # (retransmissions that piled up while held would leave at once: RFC 7252 4.2
            # spaces them out)
            raise ContractBroken("the same request more than once in one batch of effects")
        self.log += effects
        return effects

    def durable(self, now: float) -> list[Effect]:
        self.held = False
        if self.pending_limit is not None:
            self.durable_limit, self.pending_limit = self.pending_limit, None
        self.m.durable(now)
        return self.take(now)

    def _check(self, effect: Effect, now: float) -> None:
        if isinstance(effect, Hold):
            self.held = True
        elif isinstance(effect, ReserveMids):
            self.pending_limit = effect.limit
        elif isinstance(effect, Finished):
            n = self.finished.get(effect.command.async_id, 0) + 1
            self.finished[effect.command.async_id] = n
            if n > 1:
                raise ContractBroken(f"{effect.command.async_id} finished twice")
        elif isinstance(effect, Send):
            msg = decode_send(effect)
            if not is_request(msg.code):
                return
            if self.held:
                raise ContractBroken(f"a request left during a hold: {msg}")
            if effect.conn is None:
                limit = self.durable_limit
                if msg.mid in self.restored_mids:
                    return
                if limit is None or not 0 < (limit - msg.mid) & 0xFFFF <= 256:
                    raise ContractBroken(f"MID {msg.mid} is not below the durable limit {limit}")
                # a MID names one exchange for EXCHANGE_LIFETIME: sent again only as the same
                # exchange (a retransmission, or the resend of rule 7.2: the same token)
                seen = self.mids_at.get(msg.mid)
                if seen is None or seen[1] != msg.token:
                    if seen is not None and now - seen[0] < PARAMS.exchange_lifetime:
                        raise ContractBroken(f"MID {msg.mid} reused within EXCHANGE_LIFETIME")
                    self.mids_at[msg.mid] = (now, msg.token)


# -- the fake device --------------------------------------------------------------------------


@dataclass
class FakeDevice:
    """A device that answers the server's requests as a test tells it to.

    Its messages are returned as bytes (UDP) or as `Message`s (TCP, `tcp=True`); `deliver`
    feeds either to the machine.
    """

    tcp: bool = False
    mid: int = 40000
    token_n: int = 0

    def next_mid(self) -> int:
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid

    def _out(self, msg: Message) -> bytes | Message:
        if self.tcp:
            return msg._replace(mtype=0, mid=0)
        return encode(msg)

    def ping(self) -> bytes:
        """A CoAP ping (an empty CON): a contact, answered with a Reset."""
        return encode(Message(CON, 0, self.next_mid()))

    def ack(self, req: Message) -> bytes | Message:
        """An empty ACK (UDP only): the answer comes separately."""
        return encode(Message(ACK, 0, req.mid))

    def reset(self, req: Message) -> bytes | Message:
        return encode(Message(RST, 0, req.mid))

    def answer(
        self,
        req: Message,
        code: int = Code.CONTENT,
        payload: bytes = b"",
        options: tuple[Option, ...] = (),
        *,
        max_age: int | None = 0,
        observe: int | None = None,
    ) -> bytes | Message:
        """A piggybacked response (TCP: the response)."""
        return self._out(
            Message(
                ACK,
                code,
                req.mid,
                req.token,
                self._opts(payload, options, max_age, observe),
                payload,
            )
        )

    def separate(
        self,
        req: Message,
        code: int = Code.CONTENT,
        payload: bytes = b"",
        *,
        con: bool = True,
        max_age: int | None = 0,
    ) -> bytes | Message:
        """A separate response, after an empty ACK."""
        opts = self._opts(payload, (), max_age, None)
        return self._out(
            Message(CON if con else NON, code, self.next_mid(), req.token, opts, payload)
        )

    def in_blocks(
        self,
        req: Message,
        body: bytes,
        *,
        szx: int = 2,
        observe: int | None = None,
        etag: bytes | None = None,
        code: int = Code.CONTENT,
        separate: bool = False,
    ) -> bytes | Message:
        """The block of `body` that `req` asks for (block 0 without Block2), piggybacked (or
        `separate`: a CON response after an empty ACK)."""
        block, part = slice_block2(body, get_block(req, BLOCK2), szx)
        extra: tuple[Option, ...] = (block.option(BLOCK2),)
        if etag is not None:
            extra += ((ETAG, etag),)
        if separate:
            opts = self._opts(part, extra, 0, observe)
            return self._out(Message(CON, code, self.next_mid(), req.token, opts, part))
        return self.answer(req, code, part, extra, observe=observe)

    def notification(
        self,
        token: bytes,
        seq: int | None,
        payload: bytes,
        *,
        con: bool = False,
        code: int = Code.CONTENT,
        block: Block | None = None,
        max_age: int | None = 0,
    ) -> bytes | Message:
        extra: tuple[Option, ...] = () if block is None else (block.option(BLOCK2),)
        opts = self._opts(payload, extra, max_age, seq)
        return self._out(Message(CON if con else NON, code, self.next_mid(), token, opts, payload))

    def request(
        self, code: int = Code.POST, path: str = "/rd/abc", *, con: bool = True
    ) -> bytes | Message:
        """A request of the device's own (an Update)."""
        self.token_n += 1
        msg = Message(
            CON if con else NON,
            code,
            self.next_mid(),
            b"d" + uint_bytes(self.token_n),
            path_options(path),
        )
        return self._out(msg)

    @staticmethod
    def _opts(
        payload: bytes, extra: tuple[Option, ...], max_age: int | None, observe: int | None
    ) -> tuple[Option, ...]:
        opts = list(extra)
        if observe is not None:
            opts.append((OBSERVE, observe_bytes(observe)))
        if payload:
            opts.append((CONTENT_FORMAT, uint_bytes(TEXT)))
        if max_age is not None:
            opts.append((MAX_AGE, uint_bytes(max_age)))
        return sort_options(opts)


def deliver(machine: DeviceMachine, data: bytes | Message, now: float) -> None:
    """Feed one message of the device, as the actor does: then `settle`."""
    if isinstance(data, bytes):
        machine.receive_datagram(data, now)
    else:
        machine.receive_message(data, now)
    machine.settle(now)
