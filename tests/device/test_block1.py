"""Request bodies in blocks (RFC 7959 Block1), both directions, at machine level, in float
time: the server sends a body larger than a block in blocks and follows the device's 4.13
(its Block1, its Size1, or nothing: half the size), and takes the blocks of a device's own
request; Anjay's bytes where Anjay said something (issue 13, item 3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dm_actor.coap.blockwise import Block, get_block, get_size
from dm_actor.coap.message import Message, decode, encode
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.device.attempt import AttemptState
from dm_actor.device.effects import DeviceRequest, Effect, Finished, StoreCommand
from dm_actor.device.machine import DeviceMachine, MachineConfig
from dm_actor.device.transfer import Block1Pool
from tests.device.support import (
    ADDR,
    Driver,
    FakeDevice,
    command,
    deliver,
    make_machine,
    of_type,
    requests,
    sent,
)

if TYPE_CHECKING:
    from dm_actor.delivery import outcomes

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
BLOCK1 = OptionNumber.BLOCK1.value
SIZE1 = OptionNumber.SIZE1.value
ACK = MessageType.ACK.value


def capture(stem: str) -> list[bytes]:
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()[1:]
    return [bytes.fromhex(json.loads(line)["hex"]) for line in lines if line.strip()]


def start(m: DeviceMachine, d: Driver, payload: bytes, now: float = 0.0) -> Message:
    """Submit a PUT of `payload` and make it durable: the first request it sends."""
    m.submit(command("PUT", "/3/0/15", payload, now=now), now)
    d.take(now)
    (req,) = requests(d.durable(now))
    return req


def answer_block(dev: FakeDevice, req: Message, code: int = Code.CONTINUE) -> bytes:
    """The device's answer to one block: `code`, echoing the request's Block1 (as Anjay)."""
    block1 = req.option(BLOCK1)
    assert block1 is not None
    return encode(Message(ACK, code, req.mid, req.token, ((BLOCK1, block1),)))


def bare_413(req: Message) -> bytes:
    """Anjay's answer to a datagram over its input buffer: 4.13 with the token only (the
    capture's bytes, its Message ID and token replaced by the request's)."""
    raw = capture("anjay-client-udp-block1-write-response")
    theirs = decode(next(d for d in raw if decode(d).code == Code.REQUEST_ENTITY_TOO_LARGE))
    assert theirs.options == () and theirs.payload == b""
    return encode(theirs._replace(mid=req.mid, token=req.token))


def finished(effects: list[Effect]) -> list[outcomes.Outcome]:
    return [f.outcome for f in of_type(effects, Finished)]


# -- the server sends a body in blocks --------------------------------------------------------


def test_rfc7959_2_5_a_body_over_1024_bytes_goes_in_blocks_the_first_on_its_stored_exchange() -> (
    None
):
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    body = bytes(range(256)) * 11 + b"tail"  # 2820 bytes
    m.submit(command("PUT", "/3/0/15", body), 0.0)
    (stored,) = of_type(d.take(), StoreCommand)
    (first,) = requests(d.durable(0.0))
    assert (first.mid, first.token) == (stored.command.mid, stored.command.token)
    assert get_block(first, BLOCK1) == Block(0, True, 6)
    assert get_size(first, SIZE1) == len(body)
    parts = [first.payload]
    req = first
    for now in (0.1, 0.2):
        deliver(m, answer_block(dev, req), now)
        (req,) = requests(d.take(now))
        assert req.mid != first.mid and req.token != first.token  # a new exchange per block
        assert get_size(req, SIZE1) is None
        parts.append(req.payload)
        assert m.attempt is AttemptState.UPLOADING
    assert get_block(req, BLOCK1) == Block(2, False, 6)
    assert b"".join(parts) == body
    deliver(m, answer_block(dev, req, Code.CHANGED), 0.3)
    assert [o.status for o in finished(d.take(0.3))] == [200]
    assert m.attempt is AttemptState.IDLE


def test_a_body_of_one_block_or_less_goes_whole() -> None:
    m = make_machine()
    d = Driver(m)
    req = start(m, d, b"x" * 1024)
    assert req.option(BLOCK1) is None and len(req.payload) == 1024


def test_anjay_a_bare_413_halves_the_block_size_until_a_block_fits_and_it_is_kept() -> None:
    """Anjay with a 256-byte input buffer answers a bare 4.13 to any datagram over it (the
    capture: blocks of 1024 and 256 bytes refused). The server halves the block size until
    its datagrams fit, and sends the device's next bodies in that size at once."""
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    body = b'[{"bn":"/3/0/15","vs":"' + b"x" * 660 + b'"}]'  # 701 bytes
    req = start(m, d, body)
    sizes, now = [], 0.0
    while True:
        now += 0.1
        datagram = encode(req)
        if len(datagram) > 256:
            deliver(m, bare_413(req), now)
        else:
            block = get_block(req, BLOCK1)
            assert block is not None
            more = block.more
            deliver(m, answer_block(dev, req, Code.CONTINUE if more else Code.CHANGED), now)
            if not more:
                break
        (req,) = requests(d.take(now))
        block = get_block(req, BLOCK1)
        assert block is not None
        sizes.append(block.size)
    assert [o.status for o in finished(d.take(now))] == [200]
    assert sizes[:3] == [512, 256, 128]  # 701 -> below it, then halved, halved
    assert set(sizes[3:]) <= {128}
    # the next body starts at the size that worked
    nxt = start(m, d, body, now + 1)
    assert get_block(nxt, BLOCK1) == Block(0, True, 3)


def test_rfc7959_2_9_3_a_413_with_size1_or_block1_says_how_small() -> None:
    for extra, expected in (
        (((SIZE1, (300).to_bytes(2, "big")),), 256),
        (((BLOCK1, Block(0, False, 2).encode()),), 64),
    ):
        m = make_machine()
        d = Driver(m)
        req = start(m, d, b"y" * 3000)
        assert get_block(req, BLOCK1) == Block(0, True, 6)
        refusal = Message(ACK, Code.REQUEST_ENTITY_TOO_LARGE, req.mid, req.token, extra)
        deliver(m, encode(refusal), 0.1)
        (again,) = requests(d.take(0.1))
        block = get_block(again, BLOCK1)
        assert block is not None and block.num == 0 and block.size == expected
        assert get_size(again, SIZE1) == 3000
        assert again.mid != req.mid


def test_a_device_that_takes_no_block_at_all_gets_its_413_as_the_answer() -> None:
    m = make_machine()
    d = Driver(m)
    req = start(m, d, b"z" * 100)
    now = 0.0
    for _ in range(10):
        now += 0.1
        deliver(m, bare_413(req), now)
        effects = d.take(now)
        done = finished(effects)
        if done:
            assert [o.status for o in done] == [413]
            break
        (req,) = requests(effects)
    else:
        raise AssertionError("never gave up")
    block = get_block(req, BLOCK1)
    assert block is not None and block.size == 16  # it tried down to 16 bytes


def test_over_tcp_the_blocks_fit_the_devices_max_message_size() -> None:
    """RFC 8323 5.3.1: a frame never exceeds the peer's CSM Max-Message-Size."""
    conn = object()
    m = make_machine(addr=None, conn=conn)
    m.config = MachineConfig(
        new_endpoint=m.config.new_endpoint,
        resend_window=m.config.resend_window,
        registration_grace=0.0,
        frame_limit=lambda c: 512 if c is conn else 1152,
    )
    d = Driver(m)
    m.submit(command("PUT", "/3/0/15", b"w" * 2000), 0.0)
    d.take()
    (req,) = requests(d.durable(0.0))
    assert get_block(req, BLOCK1) == Block(0, True, 4)  # 256 bytes: 512 - room for the rest


def test_rule_3_4_a_lost_block_fails_the_attempt_and_the_retry_starts_from_block_0() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    first = start(m, d, b"v" * 2000)
    deliver(m, answer_block(dev, first), 0.1)
    (_second,) = requests(d.take(0.1))
    now = 0.1
    while m.attempt is AttemptState.UPLOADING:  # the device never answers block 1
        timer = m.get_timer()
        assert timer is not None
        now = timer
        m.handle_timer(now)
        m.settle(now)
        d.take(now)
    # the device is believed asleep (rule 4.3) until it speaks; then, past the resend grace
    # (rule 7.1) and within its EXCHANGE_LIFETIME, block 0 goes again as the same exchange
    # (rule 7.2)
    later = now + m.queue.policy.resend_grace
    assert later - 0.0 < m.config.resend_window
    deliver(m, dev.ping(), later)
    d.take(later)
    (retry,) = requests(d.durable(later))
    assert (retry.mid, retry.token) == (first.mid, first.token)
    assert get_block(retry, BLOCK1) == Block(0, True, 6)


# -- the device sends a request in blocks -----------------------------------------------------


def test_anjay_a_register_in_two_block1_blocks_is_taken_whole_and_its_block1_echoed() -> None:
    """`anjay-client-udp-block1-register`: 2 blocks of 128 bytes, a new token and Message ID
    each; answered 2.31 (Block1 0/1/128), then the 2.01 echoes Block1 1/0/128."""
    block0, _, block1, _, *_ = capture("anjay-client-udp-block1-register")
    m = make_machine()
    d = Driver(m)
    m.receive_datagram(block0, 0.0)
    (cont,) = sent(d.take())
    assert cont.code == Code.CONTINUE and cont.mid == decode(block0).mid
    assert get_block(cont, BLOCK1) == Block(0, True, 3)
    m.receive_datagram(block1, 0.0)
    (whole,) = [e.request for e in of_type(d.take(), DeviceRequest)]
    expected = decode(block0).payload + decode(block1).payload
    assert whole.payload == expected and len(expected) == 175
    assert whole.uri_query == decode(block0).uri_query
    m.respond(whole, Code.CREATED, ((OptionNumber.LOCATION_PATH.value, b"rd"),), 0.0)
    (created,) = sent(d.take())
    assert created.code == Code.CREATED and created.mid == decode(block1).mid
    assert get_block(created, BLOCK1) == Block(1, False, 3)


def test_anjay_a_register_in_three_blocks_of_64() -> None:
    records = [decode(d) for d in capture("anjay-client-udp-block1-register-64")]
    blocks = [r for r in records if r.code == Code.POST and r.option(BLOCK1) is not None]
    assert len(blocks) == 3
    m = make_machine()
    d = Driver(m)
    for msg in blocks[:-1]:
        m.receive_datagram(encode(msg), 0.0)
        assert [r.code for r in sent(d.take())] == [Code.CONTINUE]
    m.receive_datagram(encode(blocks[-1]), 0.0)
    (whole,) = [e.request for e in of_type(d.take(), DeviceRequest)]
    assert whole.payload == b"".join(b.payload for b in blocks)


def _block_request(dev: FakeDevice, num: int, more: bool, payload: bytes, szx: int = 2) -> bytes:
    req = decode(dev.request(Code.POST, "/rd/abc"))  # type: ignore[arg-type]
    options = tuple(sorted((*req.options, (BLOCK1, Block(num, more, szx).encode()))))
    return encode(req._replace(options=options, payload=payload))


def test_rfc7959_2_5_a_gap_in_a_devices_blocks_is_4_08() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    m.receive_datagram(_block_request(dev, 0, True, b"a" * 64), 0.0)
    assert [r.code for r in sent(d.take())] == [Code.CONTINUE]
    m.receive_datagram(_block_request(dev, 2, False, b"c" * 10), 0.0)
    assert [r.code for r in sent(d.take())] == [Code.REQUEST_ENTITY_INCOMPLETE]
    m.receive_datagram(_block_request(dev, 1, False, b"b"), 0.0)  # the transfer is gone
    assert [r.code for r in sent(d.take())] == [Code.REQUEST_ENTITY_INCOMPLETE]


def test_rfc7959_2_9_3_a_body_over_the_bound_is_4_13_with_size1() -> None:
    m = make_machine()
    d = Driver(m)
    dev = FakeDevice()
    limit = m.config.max_body_in
    szx = 6
    for num in range(limit // 1024):
        m.receive_datagram(_block_request(dev, num, True, b"a" * 1024, szx), 0.0)
        d.take()
    m.receive_datagram(_block_request(dev, limit // 1024, True, b"a" * 1024, szx), 0.0)
    (refusal,) = sent(d.take())
    assert refusal.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert get_size(refusal, SIZE1) == limit
    assert len(m.config.block1_pool) == 0


def test_the_shared_pool_bounds_reassemblies_and_gives_a_stale_place_away() -> None:
    pool = Block1Pool(1, max_age=60.0)
    machines = []
    for _ in range(2):
        m = make_machine()
        m.config = MachineConfig(
            new_endpoint=m.config.new_endpoint,
            resend_window=m.config.resend_window,
            registration_grace=0.0,
            block1_pool=pool,
        )
        machines.append((m, Driver(m), FakeDevice()))
    (m1, d1, dev1), (m2, d2, dev2) = machines
    m1.receive_datagram(_block_request(dev1, 0, True, b"a" * 64), 0.0)
    assert [r.code for r in sent(d1.take())] == [Code.CONTINUE]
    m2.receive_datagram(_block_request(dev2, 0, True, b"a" * 64), 10.0)
    (busy,) = sent(d2.take())
    assert busy.code == Code.SERVICE_UNAVAILABLE and busy.max_age == 60
    m2.receive_datagram(_block_request(dev2, 0, True, b"a" * 64), 70.0)  # m1's went stale
    assert [r.code for r in sent(d2.take())] == [Code.CONTINUE]
    # m1's buffer is freed at once: the pool bounds the bytes held, not only the places
    assert m1._rare is not None and m1._rare.incoming is not None
    assert m1._rare.incoming.receiver is None
    m1.receive_datagram(_block_request(dev1, 1, False, b"b"), 71.0)
    assert [r.code for r in sent(d1.take())] == [Code.REQUEST_ENTITY_INCOMPLETE]
    m2.end(72.0)
    assert len(pool) == 0


# -- a Register's answer before our requests (issue 13, item 5) -------------------------------


def test_while_a_registers_answer_waits_no_request_of_ours_starts() -> None:
    m = make_machine()
    d = Driver(m)
    m.answer_pending()
    m.submit(command(), 0.0)
    assert not requests(d.durable(0.0)) and m.attempt is AttemptState.IDLE
    m.answer_sent(0.1)
    assert m._rare is None  # (every new device passes here: it keeps no object for it)
    m.pump(0.1)
    d.take(0.1)
    assert len(requests(d.durable(0.1))) == 1
    assert m.addr == ADDR
