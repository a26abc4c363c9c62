"""CoapEndpoint: bytes and `now` in, events and bytes out (virtual time is just `now`).

Covers the retransmission schedule of delivery.md 3.2, ACK / Reset / separate / NON flows,
deduplication with cached replies, observations, forced Message IDs and tokens, TCP mode, and
replays of real captures (tests/vectors) through a server-side and a client-side endpoint.
"""

from __future__ import annotations

import itertools
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from dm_actor.coap import framing_tcp
from dm_actor.coap.endpoint import CoapEndpoint
from dm_actor.coap.errors import LocalProtocolError
from dm_actor.coap.events import (
    Event,
    FailureReason,
    NotificationFailed,
    NotificationReceived,
    RequestAcknowledged,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from dm_actor.coap.message import Message, decode, empty_ack, encode, path_options, reset_for
from dm_actor.coap.numbers import Code, MessageType, OptionNumber, TransmissionParameters

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST
OBS = OptionNumber.OBSERVE
PARAMS = TransmissionParameters()


def drain(ep: CoapEndpoint) -> list[Event]:
    out = []
    while (event := ep.next_event()) is not None:
        out.append(event)
    return out


def sent(ep: CoapEndpoint) -> list[Message]:
    return [decode(d) for d in ep.datagrams_to_send()]


def run_timers(ep: CoapEndpoint) -> list[float]:
    """Fire every deadline in order; return the times at which something was (re)sent."""
    times = []
    while (deadline := ep.get_timer()) is not None:
        ep.handle_timer(deadline)
        if ep.datagrams_to_send():
            times.append(deadline)
    return times


def get(
    ep: CoapEndpoint, now: float = 0.0, *, confirmable: bool = True, observe: bool = False
) -> tuple[bytes, Message]:
    token = ep.send_request(
        Code.GET, path_options("/3/0/9"), b"", now, confirmable=confirmable, observe=observe
    )
    [msg] = sent(ep)
    return token, msg


# -- retransmission ---------------------------------------------------------------------------


def test_default_schedule_is_2_4_8_16_32_64_then_timeout_at_126() -> None:
    ep = CoapEndpoint()
    token, first = get(ep)
    assert first.mtype == CON
    assert ep.get_timer() == 2.0
    ep.handle_timer(1.999)
    assert ep.datagrams_to_send() == []
    resends: list[float] = []
    while (deadline := ep.get_timer()) is not None:
        ep.handle_timer(deadline)
        for data in ep.datagrams_to_send():
            assert decode(data) == first  # the very same message, same MID
            resends.append(deadline)
        if deadline < 126.0:
            assert drain(ep) == []
    assert resends == [2.0, 6.0, 14.0, 30.0, 62.0]
    assert drain(ep) == [RequestFailed(token, FailureReason.TIMEOUT)]
    assert ep.get_timer() is None


def test_random_factor_draws_first_timeout_in_range_and_doubles() -> None:
    params = TransmissionParameters(ack_random_factor=1.5)
    for seed in range(5):
        ep = CoapEndpoint(params, rng=random.Random(seed))
        get(ep)
        first = ep.get_timer()
        assert first is not None
        assert 2.0 <= first <= 3.0
        times = [0.0, *run_timers(ep)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps == pytest.approx([first * 2**i for i in range(5)])
        [failed] = drain(ep)
        assert isinstance(failed, RequestFailed)
        assert failed.reason is FailureReason.TIMEOUT
    seeded = [CoapEndpoint(params, rng=random.Random(1)) for _ in range(2)]
    for ep in seeded:
        get(ep)
    assert seeded[0].get_timer() == seeded[1].get_timer()


def test_random_factor_without_rng_is_refused() -> None:
    with pytest.raises(ValueError, match="random"):
        CoapEndpoint(TransmissionParameters(ack_random_factor=1.5))


def test_idle_endpoint_needs_no_timer_and_little_memory() -> None:
    ep = CoapEndpoint()
    assert ep.get_timer() is None
    ep.handle_timer(1e9)
    assert ep.datagrams_to_send() == []
    assert ep.next_event() is None

    def after_one_exchange() -> CoapEndpoint:
        ep = CoapEndpoint()
        _, req = get(ep)
        ep.receive_datagram(encode(Message(ACK, Code.CONTENT, req.mid, req.token)), 0.1)
        drain(ep)
        return ep

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [after_one_exchange() for _ in range(1000)]
    per_endpoint = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    tracemalloc.stop()
    assert all(ep.get_timer() is None for ep in kept)
    assert per_endpoint < 300, per_endpoint


# -- ACK, Reset, separate and NON responses --------------------------------------------------


def test_piggybacked_response() -> None:
    ep = CoapEndpoint()
    token, req = get(ep)
    ack = encode(Message(ACK, Code.CONTENT, req.mid, token, (), b"100"))
    ep.receive_datagram(ack, 0.5)
    [event] = drain(ep)
    assert event == ResponseReceived(token, decode(ack))
    assert ep.get_timer() is None
    ep.receive_datagram(ack, 0.6)  # the peer's duplicate ACK
    assert drain(ep) == []
    assert ep.datagrams_to_send() == []


def test_ack_with_wrong_token_or_unknown_mid_is_ignored() -> None:
    ep = CoapEndpoint()
    _, req = get(ep)
    ep.receive_datagram(encode(Message(ACK, Code.CONTENT, req.mid, b"other")), 0.5)
    ep.receive_datagram(encode(Message(ACK, Code.CONTENT, req.mid + 1, req.token)), 0.5)
    ep.receive_datagram(empty_ack(req.mid + 1), 0.5)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == []
    assert ep.get_timer() == 2.0


def test_empty_ack_then_separate_con_response() -> None:
    ep = CoapEndpoint()
    token, req = get(ep)
    ep.receive_datagram(empty_ack(req.mid), 1.0)
    assert drain(ep) == [RequestAcknowledged(token)]
    assert ep.get_timer() == PARAMS.max_transmit_wait  # 126: waiting for the response
    ep.handle_timer(50.0)
    assert ep.datagrams_to_send() == []  # no more retransmissions
    response = encode(Message(CON, Code.CONTENT, 7000, token, (), b"late"))
    ep.receive_datagram(response, 60.0)
    assert drain(ep) == [ResponseReceived(token, decode(response))]
    assert ep.datagrams_to_send() == [empty_ack(7000)]
    ep.receive_datagram(response, 61.0)  # our ACK was lost
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [empty_ack(7000)]
    assert ep.get_timer() is None


def test_empty_ack_then_no_response_times_out_at_max_transmit_wait() -> None:
    ep = CoapEndpoint()
    token, req = get(ep, now=10.0)
    ep.receive_datagram(empty_ack(req.mid), 11.0)
    drain(ep)
    ep.handle_timer(135.9)
    assert drain(ep) == []
    ep.handle_timer(136.0)
    assert drain(ep) == [RequestFailed(token, FailureReason.TIMEOUT)]
    assert ep.datagrams_to_send() == []


def test_separate_response_before_the_empty_ack_stops_retransmission() -> None:
    ep = CoapEndpoint()
    token, req = get(ep)
    ep.receive_datagram(encode(Message(NON, Code.CONTENT, 9, token)), 1.0)
    assert drain(ep) == [ResponseReceived(token, Message(NON, Code.CONTENT, 9, token))]
    assert ep.datagrams_to_send() == []  # nobody ACKs a NON
    assert ep.get_timer() is None
    ep.receive_datagram(empty_ack(req.mid), 1.1)  # the late ACK is harmless
    assert drain(ep) == []


def test_reset_fails_the_request() -> None:
    ep = CoapEndpoint()
    token, req = get(ep)
    ep.receive_datagram(reset_for(req.mid + 1), 0.5)
    assert drain(ep) == []
    ep.receive_datagram(reset_for(req.mid), 0.5)
    assert drain(ep) == [RequestFailed(token, FailureReason.RESET)]
    assert ep.get_timer() is None


def test_non_request_flows() -> None:
    ep = CoapEndpoint()
    answered, req = get(ep, confirmable=False)
    assert req.mtype == NON
    ep.receive_datagram(empty_ack(req.mid), 0.1)  # a bogus ACK of a NON: ignored
    assert drain(ep) == []
    response = encode(Message(NON, Code.CONTENT, 50, answered, (), b"x"))
    ep.receive_datagram(response, 0.5)
    assert drain(ep) == [ResponseReceived(answered, decode(response))]

    reset, req = get(ep, confirmable=False)
    ep.receive_datagram(reset_for(req.mid), 0.5)
    assert drain(ep) == [RequestFailed(reset, FailureReason.RESET)]

    silent, _ = get(ep, now=1.0, confirmable=False)
    assert ep.get_timer() == 1.0 + PARAMS.max_transmit_wait
    assert run_timers(ep) == []  # never retransmitted
    assert drain(ep) == [RequestFailed(silent, FailureReason.TIMEOUT)]


def test_peer_unreachable_fails_everything_outstanding() -> None:
    ep = CoapEndpoint()
    waiting, req = get(ep)
    fresh, _ = get(ep, now=1.0)
    ep.receive_datagram(empty_ack(req.mid), 0.5)
    drain(ep)
    ep.peer_unreachable(2.0)
    assert set(drain(ep)) == {
        RequestFailed(waiting, FailureReason.UNREACHABLE),
        RequestFailed(fresh, FailureReason.UNREACHABLE),
    }
    assert ep.get_timer() is None
    assert ep.datagrams_to_send() == []


# -- Message IDs and tokens -------------------------------------------------------------------


def test_mid_and_token_allocation() -> None:
    ep = CoapEndpoint(mid_start=0xFFFF, token_seed=0xFFFFFFFF)
    t1, m1 = get(ep)
    t2, m2 = get(ep)
    assert (m1.mid, m2.mid) == (0xFFFF, 0)
    assert (t1, t2) == (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00")
    assert (m1.token, m2.token) == (t1, t2)


def test_forced_mid_and_token() -> None:
    ep = CoapEndpoint(mid_start=100, token_seed=1)
    token = ep.send_request(Code.GET, (), b"", 0.0, mid=4242, token=b"\x00\x00\x00\x02")
    [msg] = sent(ep)
    assert (msg.mid, msg.token, token) == (4242, b"\x00\x00\x00\x02", b"\x00\x00\x00\x02")
    _, auto = get(ep)
    assert auto.mid == 100  # forcing does not move the counter
    assert auto.token == b"\x00\x00\x00\x01"
    _, skipped = get(ep)
    assert skipped.token == b"\x00\x00\x00\x03"  # 2 is in use
    with pytest.raises(LocalProtocolError):
        ep.send_request(Code.GET, (), b"", 0.0, mid=4242)
    with pytest.raises(LocalProtocolError):
        ep.send_request(Code.GET, (), b"", 0.0, token=token)
    with pytest.raises(LocalProtocolError):
        ep.send_request(Code.CONTENT, (), b"", 0.0)


def test_allocated_mid_skips_an_outstanding_forced_one() -> None:
    ep = CoapEndpoint(mid_start=10)
    ep.send_request(Code.GET, (), b"", 0.0, mid=10)
    ep.datagrams_to_send()
    _, msg = get(ep)
    assert msg.mid == 11


# -- requests from the peer, deduplication ---------------------------------------------------


def request(mid: int, mtype: int = CON, token: bytes = b"\x01") -> bytes:
    return encode(Message(mtype, Code.GET, mid, token, path_options("/3/0")))


def test_con_request_piggybacked_reply_and_duplicate_replay() -> None:
    ep = CoapEndpoint()
    data = request(300)
    ep.receive_datagram(data, 0.0)
    [event] = drain(ep)
    assert event == RequestReceived(decode(data))
    ep.receive_datagram(data, 1.0)  # not answered yet: dropped silently
    assert drain(ep) == []
    assert ep.datagrams_to_send() == []
    ep.respond(event.request, Code.CONTENT, (), b"hello", 1.5)
    [reply] = ep.datagrams_to_send()
    assert decode(reply) == Message(ACK, Code.CONTENT, 300, b"\x01", (), b"hello")
    with pytest.raises(LocalProtocolError):
        ep.respond(event.request, Code.CONTENT, (), b"again", 1.6)
    lifetime = PARAMS.exchange_lifetime
    ep.receive_datagram(data, lifetime - 0.1)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [reply]
    ep.receive_datagram(data, lifetime)
    assert drain(ep) == [RequestReceived(decode(data))]  # forgotten: a new request


def test_non_request_gets_non_response_and_duplicates_are_dropped() -> None:
    ep = CoapEndpoint(mid_start=77)
    data = request(300, NON, b"\x09")
    ep.receive_datagram(data, 0.0)
    [event] = drain(ep)
    assert isinstance(event, RequestReceived)
    ep.respond(event.request, Code.CONTENT, (), b"v", 0.1)
    assert sent(ep) == [Message(NON, Code.CONTENT, 77, b"\x09", (), b"v")]
    ep.receive_datagram(data, PARAMS.non_lifetime - 0.1)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == []
    ep.receive_datagram(data, PARAMS.non_lifetime)
    assert len(drain(ep)) == 1


def test_dedup_cache_is_bounded() -> None:
    ep = CoapEndpoint(dedup_limit=4)
    for mid in range(5):
        ep.receive_datagram(request(mid, NON), 0.0)
        [event] = drain(ep)
        assert isinstance(event, RequestReceived)
        ep.respond(event.request, Code.CONTENT, (), b"", 0.0)
    ep.receive_datagram(request(1, NON), 1.0)
    assert drain(ep) == []  # still remembered
    ep.receive_datagram(request(0, NON), 1.0)
    assert len(drain(ep)) == 1  # evicted as the oldest: delivered again


def test_ping_gets_reset_and_empty_non_is_ignored() -> None:
    ep = CoapEndpoint()
    ep.receive_datagram(bytes((0x40, 0, 0x12, 0x34)), 0.0)
    ep.receive_datagram(bytes((0x50, 0, 0x12, 0x35)), 0.0)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [reset_for(0x1234)]


def test_undecodable_and_bad_option_datagrams_get_the_protocol_answer() -> None:
    ep = CoapEndpoint()
    ep.receive_datagram(bytes((0x49, 1, 0, 5)), 0.0)  # CON with token length 9
    assert ep.datagrams_to_send() == [reset_for(5)]
    ep.receive_datagram(bytes((0x59, 1, 0, 6)), 0.0)  # the same as NON: ignored
    ep.receive_datagram(b"\x40", 0.0)
    assert ep.datagrams_to_send() == []
    bad = encode(Message(CON, Code.GET, 8, b"\x05", ((9999, b"x"),)))  # unknown critical
    ep.receive_datagram(bad, 0.0)
    [reply] = sent(ep)
    assert reply == Message(ACK, Code.BAD_OPTION, 8, b"\x05")
    ep.receive_datagram(bad, 1.0)
    assert sent(ep) == [reply]
    assert drain(ep) == []


def test_response_with_unknown_token_is_reset() -> None:
    ep = CoapEndpoint()
    ep.receive_datagram(encode(Message(CON, Code.CONTENT, 1, b"zz")), 0.0)
    ep.receive_datagram(encode(Message(NON, Code.CONTENT, 2, b"zz")), 0.0)
    ep.receive_datagram(encode(Message(ACK, Code.CONTENT, 3, b"zz")), 0.0)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [reset_for(1), reset_for(2)]


# -- observations -----------------------------------------------------------------------------


def notification(
    mid: int, token: bytes, seq: int | None, mtype: int = NON, code: int = 69
) -> bytes:
    options = () if seq is None else ((OBS.value, bytes((seq,))),)
    return encode(Message(mtype, code, mid, token, options, b"n"))


def observe(ep: CoapEndpoint) -> bytes:
    token, req = get(ep, observe=True)
    assert req.observe == 0
    ack = encode(Message(ACK, Code.CONTENT, req.mid, token, ((OBS.value, b""),), b"first"))
    ep.receive_datagram(ack, 0.1)
    assert drain(ep) == [ResponseReceived(token, decode(ack))]
    assert ep.has_observation(token)
    return token


def test_observe_notifications_are_acked_and_deduplicated() -> None:
    ep = CoapEndpoint()
    token = observe(ep)
    assert ep.get_timer() is None  # a live observation needs no timer
    con = notification(500, token, 1, CON)
    ep.receive_datagram(con, 1.0)
    assert drain(ep) == [NotificationReceived(token, decode(con))]
    assert ep.datagrams_to_send() == [empty_ack(500)]
    ep.receive_datagram(con, 2.0)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [empty_ack(500)]
    non = notification(501, token, 2)
    ep.receive_datagram(non, 3.0)
    assert drain(ep) == [NotificationReceived(token, decode(non))]
    assert ep.datagrams_to_send() == []


def test_cancelled_observation_notifications_get_reset() -> None:
    ep = CoapEndpoint()
    token = observe(ep)
    ep.cancel_observation(token)
    assert not ep.has_observation(token)
    ep.receive_datagram(notification(500, token, 1, CON), 1.0)
    ep.receive_datagram(notification(501, token, 2, NON), 1.0)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [reset_for(500), reset_for(501)]


@pytest.mark.parametrize(("code", "seq"), [(Code.NOT_FOUND, 3), (Code.CONTENT, None)])
def test_error_or_observe_less_notification_ends_the_observation(
    code: int, seq: int | None
) -> None:
    ep = CoapEndpoint()
    token = observe(ep)
    last = notification(500, token, seq, code=code)
    ep.receive_datagram(last, 1.0)
    assert drain(ep) == [NotificationReceived(token, decode(last))]
    assert not ep.has_observation(token)
    ep.receive_datagram(notification(501, token, 4), 2.0)
    assert ep.datagrams_to_send() == [reset_for(501)]


def test_observe_refused_leaves_no_observation() -> None:
    ep = CoapEndpoint()
    token, req = get(ep, observe=True)
    ep.receive_datagram(encode(Message(ACK, Code.CONTENT, req.mid, token)), 0.1)
    assert len(drain(ep)) == 1
    assert not ep.has_observation(token)


def test_con_notification_we_send_is_retransmitted_until_acked() -> None:
    ep = CoapEndpoint(mid_start=9)
    options = ((OBS.value, b"\x05"),)
    ep.notify(b"ob", Code.CONTENT, options, b"v", 0.0, confirmable=True)
    [first] = sent(ep)
    assert first == Message(CON, Code.CONTENT, 9, b"ob", options, b"v")
    ep.handle_timer(2.0)
    assert sent(ep) == [first]
    ep.receive_datagram(empty_ack(9), 3.0)
    assert ep.get_timer() is None
    assert drain(ep) == []

    ep.notify(b"ob", Code.CONTENT, options, b"v", 4.0, confirmable=True)
    ep.datagrams_to_send()
    ep.receive_datagram(reset_for(10), 5.0)
    assert drain(ep) == [NotificationFailed(b"ob", FailureReason.RESET)]

    ep.notify(b"ob", Code.CONTENT, options, b"v", 6.0, confirmable=True)
    assert run_timers(ep) == [8.0, 12.0, 20.0, 36.0, 68.0]
    assert drain(ep) == [NotificationFailed(b"ob", FailureReason.TIMEOUT)]

    ep.notify(b"ob", Code.CONTENT, options, b"v", 7.0)
    assert sent(ep)[0].mtype == NON
    assert ep.get_timer() is None


# -- CoAP over TCP ----------------------------------------------------------------------------


def test_reliable_mode_writes_once_and_times_out() -> None:
    ep = CoapEndpoint(reliable=True, token_seed=5)
    token = ep.send_request(Code.GET, path_options("/3/0"), b"", 1.0)
    assert ep.datagrams_to_send() == [
        framing_tcp.encode(Message(0, Code.GET, 0, token, path_options("/3/0")))
    ]
    assert ep.get_timer() == 1.0 + PARAMS.max_transmit_wait
    assert run_timers(ep) == []
    assert drain(ep) == [RequestFailed(token, FailureReason.TIMEOUT)]


def test_reliable_mode_requests_responses_and_notifications() -> None:
    ep = CoapEndpoint(reliable=True)
    token = ep.send_request(Code.GET, (), b"", 0.0, observe=True)
    ep.datagrams_to_send()
    first = Message(0, Code.CONTENT, 0, token, ((OBS.value, b""),))
    ep.receive_message(first, 1.0)
    later = Message(0, Code.CONTENT, 0, token, ((OBS.value, b"\x01"),))
    ep.receive_message(later, 2.0)
    ep.receive_message(Message(0, Code.CONTENT, 0, b"unknown"), 2.0)
    ep.receive_message(Message(0, 0, 0), 2.0)  # an empty message is ignored
    assert drain(ep) == [ResponseReceived(token, first), NotificationReceived(token, later)]
    assert ep.datagrams_to_send() == []  # no ACKs, no Resets over TCP

    req = Message(0, Code.GET, 0, b"\x07", path_options("/1/0"))
    ep.receive_message(req, 3.0)
    ep.receive_message(req, 3.0)  # no deduplication over TCP
    assert drain(ep) == [RequestReceived(req), RequestReceived(req)]
    ep.respond(req, Code.CONTENT, (), b"x", 3.0)
    assert ep.datagrams_to_send() == [
        framing_tcp.encode(Message(0, Code.CONTENT, 0, b"\x07", (), b"x"))
    ]
    ep.receive_message(Message(0, Code.GET, 0, b"\x08", ((9999, b""),)), 4.0)
    assert ep.datagrams_to_send() == [framing_tcp.encode(Message(0, Code.BAD_OPTION, 0, b"\x08"))]
    assert drain(ep) == []


# -- replays of real captures -----------------------------------------------------------------


def _records(stem: str) -> list[dict[str, object]]:
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:] if line.strip()]


@pytest.mark.parametrize(
    "stem", ["wakaama-client-udp", "wakaama-client-udp-queue-full", "wakaama-client-udp-queue-v10"]
)
def test_wakaama_capture_replays_byte_for_byte_through_both_sides(stem: str) -> None:
    """Both peers of a real capture are CoapEndpoints: each produces exactly the captured
    datagrams (Message IDs from its counter, tokens forced), and each gets the right events:
    requests, piggybacked responses, the observe registrations, NON notifications and the
    cancelling GET with Observe=1 that ends the first observation."""
    records = _records(stem)
    messages = [(rec, bytes.fromhex(str(rec["hex"]))) for rec in records]
    server_port = records[0]["dst_port"]

    def first_mid(port: object) -> int:
        return next(
            m.mid for r, d in messages if r["src_port"] == port and (m := decode(d)).mtype < ACK
        )

    server = CoapEndpoint(mid_start=first_mid(server_port))
    client = CoapEndpoint(mid_start=first_mid(records[0]["src_port"]))
    pending: dict[tuple[bool, int], Message] = {}  # requests awaiting a piggybacked answer
    notifications = 0
    for rec, data in messages:
        now = float(str(rec["t"]))
        from_server = rec["src_port"] == server_port
        me, peer = (server, client) if from_server else (client, server)
        msg = decode(data)
        if msg.code < 32:  # a request
            observe = msg.observe == 0
            me.send_request(
                msg.code, msg.options, msg.payload, now, observe=observe, token=msg.token
            )
            assert me.datagrams_to_send() == [data]
            peer.receive_datagram(data, now)
            assert drain(peer) == [RequestReceived(msg)]
            pending[from_server, msg.mid] = msg
        elif msg.mtype == ACK:
            request = pending.pop((not from_server, msg.mid))
            observe = request.observe == 0
            me.respond(request, msg.code, msg.options, msg.payload, now)
            assert me.datagrams_to_send() == [data]
            peer.receive_datagram(data, now)
            assert drain(peer) == [ResponseReceived(msg.token, msg)]
            assert peer.has_observation(msg.token) == (observe and msg.observe is not None)
        else:
            assert msg.mtype == NON
            assert server.has_observation(msg.token)
            me.notify(msg.token, msg.code, msg.options, msg.payload, now)
            assert me.datagrams_to_send() == [data]
            peer.receive_datagram(data, now)
            assert drain(peer) == [NotificationReceived(msg.token, msg)]
            notifications += 1
        assert peer.datagrams_to_send() == []
    assert notifications == 2
    assert not pending
    assert server.get_timer() is None
    assert client.get_timer() is None
    assert not server.has_observation(b"\x00\x00\x00\x01")  # cancelled by GET Observe=1
    assert server.has_observation(b"\x00\x00\x00\x02")  # never cancelled in the capture


def test_anjay_tcp_capture_register_exchange() -> None:
    """The server side of a real RFC 8323 capture: the client's frames, decoded by the stream
    decoder, come out as requests; our responses are framed exactly as the captured server's."""
    records = _records("anjay-client-tcp")
    server_port = records[0]["src_port"]  # the side that sends the first CSM, to the client
    server = CoapEndpoint(reliable=True)
    decoder = framing_tcp.StreamDecoder()
    pending: list[Message] = []
    answered = 0
    for rec in records:
        data = bytes.fromhex(str(rec["hex"]))
        if rec["src_port"] != server_port:
            decoder.receive_data(data)
            while (msg := decoder.next_message()) is not None:
                if msg.code >> 5 != 7:
                    server.receive_message(msg, float(str(rec["t"])))
                    [event] = drain(server)
                    assert event == RequestReceived(msg)
                    pending.append(msg)
            continue
        [frame] = _frames(data)
        if frame.code >> 5 == 7:
            continue
        request = pending.pop(0)
        assert frame.token == request.token
        server.respond(request, frame.code, frame.options, frame.payload, float(str(rec["t"])))
        assert server.datagrams_to_send() == [data]
        answered += 1
    assert answered == 5
    assert [m.code for m in pending] == [Code.DELETE]  # the capture ends with an Abort


def _frames(data: bytes) -> list[Message]:
    decoder = framing_tcp.StreamDecoder()
    decoder.receive_data(data)
    frames = []
    while (msg := decoder.next_message()) is not None:
        frames.append(msg)
    return frames


def test_a_request_in_process_is_not_taken_again_after_later_traffic() -> None:
    """Hostile-input issue, item 1: a Register whose answer waits for the store, then 20 other
    requests (more than the dedup window), then the Register's retransmission: it must not be
    processed (and later answered) a second time."""
    ep = CoapEndpoint(dedup_limit=16)
    held = request(500)
    ep.receive_datagram(held, 0.0)
    [first] = drain(ep)
    assert isinstance(first, RequestReceived)
    for mid in range(600, 620):
        ep.receive_datagram(request(mid), 0.1)
        [event] = drain(ep)
        assert isinstance(event, RequestReceived)
        ep.respond(event.request, Code.NOT_FOUND, (), b"", 0.1)
    ep.datagrams_to_send()
    ep.receive_datagram(held, 0.2)
    assert drain(ep) == []  # still in process: dropped
    ep.respond(first.request, Code.CREATED, (), b"", 0.3)
    [reply] = ep.datagrams_to_send()
    ep.receive_datagram(held, 0.4)
    assert drain(ep) == []
    assert ep.datagrams_to_send() == [reply]  # the one answer, again


def test_non_notifications_do_not_fill_the_dedup_window() -> None:
    """NON messages need no answer: they are handled at once and make room for others."""
    ep = CoapEndpoint(dedup_limit=4)
    for mid in range(10):
        ep.receive_datagram(request(mid, NON), 0.0)
        [event] = drain(ep)
        assert isinstance(event, RequestReceived)
        ep.respond(event.request, Code.CONTENT, (), b"", 0.0)
    ep.datagrams_to_send()
    ep.receive_datagram(request(99), 0.0)
    assert len(drain(ep)) == 1
