"""One simulated device over a fake network, in virtual time: bytes in, bytes out."""

from __future__ import annotations

import random

from dm_actor.coap import framing_tcp
from dm_actor.coap.message import Message, decode, encode, path_options, query_options, uint_bytes
from dm_actor.coap.numbers import Code, ContentFormat, MessageType, OptionNumber
from dm_actor.lwm2m import content
from dm_actor.lwm2m.registration import update_interval
from dm_actor.sim.client import (
    IDLE,
    REGISTERED,
    SLEEPING,
    TCP,
    Profile,
    SimDevice,
    Totals,
)
from dm_actor.sim.objects import World

CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST
OBS, CF, ACCEPT = OptionNumber.OBSERVE, OptionNumber.CONTENT_FORMAT, OptionNumber.ACCEPT


class FakeNet:
    """Records what the device sends and asks; every transport opens at once but TCP."""

    def __init__(self) -> None:
        self.totals = Totals()
        self.sent: list[bytes] = []
        self.opened = 0
        self.closed = 0

    def send(self, device: SimDevice, data: bytes) -> None:
        self.sent.append(data)

    def open(self, device: SimDevice) -> bool:
        self.opened += 1
        return device.transport != TCP

    def close(self, device: SimDevice) -> None:
        self.closed += 1

    def take(self) -> list[Message]:
        out = [decode(d) for d in self.sent]
        self.sent.clear()
        return out


def device(net: FakeNet, **kw: object) -> SimDevice:
    profile = kw.pop("profile", Profile(record=True))
    world = World(random.Random(3), sample_period=5.0)
    return SimDevice(net, profile, world, 0, "dev-0", lifetime=300, **kw)  # type: ignore[arg-type]


def register(net: FakeNet, dev: SimDevice, now: float = 0.0) -> Message:
    """Run the device until its Register and answer it 2.01 /rd/r1."""
    dev.on_timer(now)
    [reg] = net.take()
    ack = Message(ACK, Code.CREATED, reg.mid, reg.token, path_options("rd/r1", 8))
    dev.on_datagram(encode(ack), now)
    return reg


def request(code: int, path: str, mid: int, *opts: tuple[int, bytes], payload: bytes = b"",
            query: str = "") -> bytes:  # fmt: skip
    options = tuple(sorted(path_options(path) + query_options(query) + opts, key=lambda o: o[0]))
    return encode(Message(CON, code, mid, bytes((mid & 0xFF,)), options, payload))


def test_register_then_update_at_the_interval() -> None:
    net = FakeNet()
    dev = device(net)
    reg = register(net, dev)
    assert reg.code == Code.POST and reg.uri_path == ("rd",)
    assert reg.uri_query == ("ep=dev-0", "lt=300", "lwm2m=1.1", "b=U")
    assert reg.content_format == ContentFormat.LINK_FORMAT
    assert reg.payload == b'</>;rt="oma.lwm2m";ct=110,</1/0>,</3/0>,</3303/0>,</3311/0>'
    assert (dev.state, dev.location, net.totals.registered) == (REGISTERED, "rd/r1", 1)
    assert dev.deadline() == update_interval(300) == 207.0
    dev.on_timer(207.0)
    [upd] = net.take()
    assert (upd.code, upd.uri_path, upd.payload) == (Code.POST, ("rd", "r1"), b"")
    dev.on_datagram(encode(Message(ACK, Code.CHANGED, upd.mid, upd.token)), 207.0)
    assert (dev.updates, dev.deadline()) == (1, 414.0)


def test_update_refused_with_404_registers_again() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_timer(207.0)
    [upd] = net.take()
    dev.on_datagram(encode(Message(ACK, Code.NOT_FOUND, upd.mid, upd.token)), 207.0)
    [again] = net.take()
    assert again.uri_path == ("rd",) and net.totals.registered == 0 and dev.errors == 1


def test_register_timeout_retries_with_backoff() -> None:
    net = FakeNet()
    dev = device(net)
    dev.on_timer(0.0)
    net.take()
    now = 0.0
    while dev.state != IDLE:  # retransmissions at 2, 6, 14, 30, 62, then the failure at 126
        now = dev.deadline()
        dev.on_timer(now)
    assert now == 126.0 and len(net.take()) == 5
    assert dev.deadline() == 131.0  # retry_base 5 s
    dev.on_timer(131.0)
    assert net.take()[0].uri_path == ("rd",)


def test_requests_are_answered_once_and_duplicates_replayed() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    get = request(Code.GET, "/3/0/0", 700)
    dev.on_datagram(get, 1.0)
    dev.on_datagram(get, 3.0)  # a retransmission
    first, replay = net.take()
    assert first == replay
    assert (first.mtype, first.code, first.mid, first.payload) == (
        ACK,
        Code.CONTENT,
        700,
        b"dm-actor",
    )
    assert first.content_format == ContentFormat.TEXT
    assert [(e.code, e.path, e.mid) for e in dev.executed or ()] == [(Code.GET, "/3/0/0", 700)]


def test_each_operation_gets_its_code() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    text = (CF, uint_bytes(0))
    senml = (CF, uint_bytes(ContentFormat.SENML_JSON))
    cases = [
        (request(Code.GET, "/3/0", 1, (ACCEPT, uint_bytes(ContentFormat.LWM2M_TLV))), Code.CONTENT),
        (request(Code.GET, "/3/0/4", 2), Code.METHOD_NOT_ALLOWED),
        (request(Code.GET, "/9/0", 3), Code.NOT_FOUND),
        (request(Code.PUT, "/3311/0/5850", 4, text, payload=b"1"), Code.CHANGED),
        (request(Code.PUT, "/3/0/0", 5, text, payload=b"x"), Code.METHOD_NOT_ALLOWED),
        (request(Code.POST, "/3311/0", 6, senml, payload=b'[{"bn":"/3311/0/5851","v":5}]'),
         Code.CHANGED),
        (request(Code.POST, "/3/0/0", 7), Code.METHOD_NOT_ALLOWED),
        (request(Code.POST, "/3311", 8, senml, payload=b'[{"bn":"/3311/2/5850","vb":true}]'),
         Code.CREATED),
        (request(Code.DELETE, "/3/0", 9), Code.METHOD_NOT_ALLOWED),
        (request(Code.DELETE, "/3311/2", 10), Code.DELETED),
        (request(Code.PUT, "/3303/0/5700", 11, query="pmin=5&pmax=1"), Code.BAD_REQUEST),
        (request(Code.GET, "/3303/0", 12, (ACCEPT, uint_bytes(40))), Code.CONTENT),
        (request(Code.FETCH, "/3/0", 13), Code.METHOD_NOT_ALLOWED),
        (request(Code.GET, "/rd", 14), Code.BAD_REQUEST),
    ]  # fmt: skip
    for data, expected in cases:
        dev.on_datagram(data, 1.0)
        [reply] = [m for m in net.take() if m.mtype == ACK]
        assert reply.code == expected, decode(data)
    assert dev.light(0).dimmer == 5 and dev.instance_ids(3311) == [0]
    assert dev.requests == len(cases)


def test_create_answers_its_location_and_updates_the_object_list() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_datagram(request(Code.POST, "/3303", 20, (CF, uint_bytes(110)), payload=b"[]"), 5.0)
    [ack] = net.take()
    assert (ack.code, ack.location_path) == (Code.CREATED, ("3303", "1"))
    assert dev.deadline() == 5.0
    dev.on_timer(5.0)
    [upd] = net.take()
    assert upd.uri_path == ("rd", "r1") and b"</3303/1>" in upd.payload
    assert upd.content_format == ContentFormat.LINK_FORMAT


def test_lifetime_write_sends_an_update_with_lt() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_datagram(request(Code.PUT, "/1/0/1", 21, (CF, uint_bytes(0)), payload=b"60"), 5.0)
    net.take()
    assert dev.deadline() == 5.0
    dev.on_timer(5.0)
    [upd] = net.take()
    assert upd.uri_query == ("lt=60",)
    dev.on_datagram(encode(Message(ACK, Code.CHANGED, upd.mid, upd.token)), 5.0)
    assert dev.deadline() == 5.0 + 30.0  # lifetime/2 when <= 93 s


def test_observe_with_rules_notifies_in_virtual_time() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    path = "/3303/0/5700"
    dev.on_datagram(request(Code.PUT, path, 30, query="pmin=10&pmax=30&st=1000"), 0.0)
    net.take()
    dev.on_datagram(request(Code.GET, path, 31, (OBS, b"")), 1.0)
    [first] = net.take()
    assert first.code == Code.CONTENT and first.observe is not None
    # st=1000 never fires: only pmax does, every 30 s (pmin 10 is not enough)
    times = []
    now = 1.0
    while now < 200:
        now = dev.deadline()
        dev.on_timer(now)
        for m in net.take():
            assert (m.mtype, m.token, m.content_format) == (NON, first.token, 0)
            times.append(now)
    assert times == [31.0, 61.0, 91.0, 121.0, 151.0, 181.0]
    assert dev.notifications == len(times)


def test_observe_without_rules_follows_every_change_and_writes() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_datagram(request(Code.GET, "/3311/0/5850", 40, (OBS, b"")), 1.0)
    [first] = net.take()
    assert first.payload == b"0"
    dev.on_timer(dev.deadline())
    assert net.take() == []  # nothing changed
    dev.on_datagram(request(Code.PUT, "/3311/0/5850", 41, (CF, uint_bytes(0)), payload=b"1"), 5.0)
    assert dev.deadline() == 5.0  # a write makes the observations due now
    dev.on_timer(5.0)
    ack, note = net.take()
    assert ack.mtype == ACK and (note.mtype, note.payload) == (NON, b"1")
    assert note.observe is not None and first.observe is not None and note.observe > first.observe
    # a temperature without rules notifies at each sampling step where it changed
    dev.on_datagram(request(Code.GET, "/3303/0/5700", 42, (OBS, b"")), 10.0)
    net.take()
    seen = 0
    now = 10.0
    while now < 60:
        now = dev.deadline()
        dev.on_timer(now)
        seen += len(net.take())
    assert 8 <= seen <= 11


def test_cancel_by_get_and_by_reset() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_datagram(request(Code.GET, "/3311/0/5850", 50, (OBS, b"")), 1.0)
    dev.on_datagram(request(Code.GET, "/3311/0/5851", 51, (OBS, b"")), 1.0)
    net.take()
    dev.on_datagram(request(Code.GET, "/3311/0/5850", 50 + 256, (OBS, uint_bytes(1))), 2.0)
    [plain] = net.take()
    assert plain.observe is None
    assert dev.observations is not None and len(dev.observations) == 1
    dev.on_datagram(request(Code.PUT, "/3311/0/5851", 52, (CF, uint_bytes(0)), payload=b"9"), 3.0)
    dev.on_timer(3.0)
    _, note = net.take()
    dev.on_datagram(encode(Message(RST, 0, note.mid)), 3.0)  # the server refuses it
    assert not dev.observations


def test_reboot_answers_then_registers_afresh() -> None:
    net = FakeNet()
    dev = device(net)
    register(net, dev)
    dev.on_datagram(request(Code.POST, "/3/0/4", 60), 10.0)
    [ack] = net.take()
    assert ack.code == Code.CHANGED
    assert (dev.state, net.totals.registered, net.totals.reboots) == (IDLE, 0, 1)
    assert dev.deadline() == 12.0
    dev.on_timer(12.0)
    [reg] = net.take()
    assert reg.uri_path == ("rd",)


def test_queue_mode_sleeps_closing_its_socket_and_wakes_with_an_update() -> None:
    net = FakeNet()
    dev = device(net, queue=True, profile=Profile(awake=93.0, sleep=60.0))
    reg = register(net, dev)
    assert reg.uri_query[-2:] == ("b=U", "Q")
    dev.on_datagram(request(Code.GET, "/3/0/1", 70), 50.0)  # a request keeps it awake
    net.take()
    assert dev.deadline() == 143.0
    dev.on_timer(143.0)
    assert (dev.state, net.closed, net.totals.sleeping) == (SLEEPING, 1, 1)
    assert dev.deadline() == 203.0
    dev.on_timer(203.0)
    [upd] = net.take()
    assert (upd.uri_path, net.opened, net.totals.wakes) == (("rd", "r1"), 2, 1)
    assert dev.state == REGISTERED and net.totals.sleeping == 0


def test_queue_mode_can_wake_with_a_register_and_sleeps_until_the_update_is_due() -> None:
    net = FakeNet()
    dev = device(net, queue=True, profile=Profile(awake=20.0, register_on_wake=True))
    register(net, dev)
    dev.on_timer(20.0)
    assert dev.state == SLEEPING and dev.deadline() == 207.0
    dev.on_timer(207.0)
    [reg] = net.take()
    assert reg.uri_path == ("rd",)


def test_tcp_sends_csm_first_and_answers_ping() -> None:
    net = FakeNet()
    dev = device(net, transport=TCP)
    dev.on_timer(0.0)
    assert net.sent == []  # connecting
    dev.on_connected(0.0)
    decoder = framing_tcp.StreamDecoder()
    decoder.receive_data(b"".join(net.sent))
    net.sent.clear()
    csm, reg = decoder.next_message(), decoder.next_message()
    assert csm is not None and csm.code == Code.CSM
    assert reg is not None and reg.uri_query[-1] == "b=T"
    created = Message(0, Code.CREATED, 0, reg.token, path_options("rd/t1", 8))
    server_csm = framing_tcp.encode(framing_tcp.csm())
    dev.on_stream_data(server_csm + framing_tcp.encode(created), 0.1)
    assert dev.location == "rd/t1"
    dev.on_stream_data(framing_tcp.encode(framing_tcp.ping(token=b"p")), 1.0)
    decoder.receive_data(b"".join(net.sent))
    pong = decoder.next_message()
    assert pong is not None and (pong.code, pong.token) == (Code.PONG, b"p")
    dev.on_closed(2.0)
    assert (dev.state, dev.errors, net.totals.registered) == (IDLE, 1, 0)


# -- LwM2M Send ------------------------------------------------------------------------------


def test_send_posts_the_temperatures_to_dp_with_their_time() -> None:
    net = FakeNet()
    dev = device(net, profile=Profile(send_interval=10.0), temperatures=2)
    dev.world.epoch = 1_700_000_000.0
    register(net, dev)
    first = dev.send_at
    assert 0.0 <= first < 10.0 and dev.deadline() == first  # a random point of the interval
    dev.on_timer(first - 0.001)
    assert net.take() == []
    dev.on_timer(first)
    [send] = net.take()
    assert (send.mtype, send.code, send.uri_path) == (CON, Code.POST, ("dp",))
    assert send.content_format == ContentFormat.SENML_CBOR
    values = content.decode(ContentFormat.SENML_CBOR, send.payload)
    stamp = 1_700_000_000.0 + first
    assert [(v.path, v.time) for v in values] == [("/3303/0/5700", stamp), ("/3303/1/5700", stamp)]
    assert values[0].value == dev.temperature(0).value
    assert dev.send_at == first + 10.0
    dev.on_datagram(encode(Message(ACK, Code.CHANGED, send.mid, send.token)), first)
    assert (dev.sends, net.totals.sends, net.totals.errors) == (1, 1, 0)
    dev.on_timer(first + 10.0)
    [again] = net.take()
    assert again.uri_path == ("dp",) and again.mid != send.mid


def test_send_in_senml_json_and_the_server_s_refusals() -> None:
    net = FakeNet()
    profile = Profile(send_interval=5.0, send_format=ContentFormat.SENML_JSON)
    dev = device(net, profile=profile)
    register(net, dev)
    dev.on_timer(dev.send_at)
    [send] = net.take()
    assert send.content_format == ContentFormat.SENML_JSON
    assert [v.path for v in content.decode(ContentFormat.SENML_JSON, send.payload)] == [
        "/3303/0/5700"
    ]
    # 4.15: counted, still registered; the next Send at its time
    dev.on_datagram(encode(Message(ACK, Code.UNSUPPORTED_CONTENT_FORMAT, send.mid, send.token)),
                    1.0)  # fmt: skip
    assert (net.totals.sends_refused, dev.state, net.take()) == (1, REGISTERED, [])
    # 4.04: the server does not know it: it registers again
    dev.on_timer(dev.send_at)
    [send] = net.take()
    dev.on_datagram(encode(Message(ACK, Code.NOT_FOUND, send.mid, send.token)), 6.0)
    [reg] = net.take()
    assert reg.uri_path == ("rd",) and net.totals.sends_refused == 2


def test_an_update_due_goes_before_a_send_and_no_send_without_the_option() -> None:
    net = FakeNet()
    dev = device(net, profile=Profile(send_interval=1000.0))
    register(net, dev)
    t = dev.send_at = dev.update_at  # both due at once
    dev.on_timer(t)
    [update] = net.take()
    assert update.uri_path == ("rd", "r1")
    dev.on_timer(t + 1)  # the Update is in flight: the Send waits
    assert net.take() == []
    dev.on_datagram(encode(Message(ACK, Code.CHANGED, update.mid, update.token)), t + 1)
    dev.on_timer(t + 1)
    [send] = net.take()
    assert send.uri_path == ("dp",)
    plain = device(FakeNet())
    assert plain.send_at == float("inf")
