"""LwM2M Send (`POST /dp`) over loopback: the real clients' bytes, the refusals, and the Send's
values reaching the subscribed applications as `notifications`, up to their channel."""

from __future__ import annotations

import base64
import json
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import cbor2
import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.message import Message, decode, encode, path_options, uint_bytes
from dm_actor.coap.numbers import Code, MessageType, OptionNumber
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import ResourceValue

from ..api.client import start_api
from ..api.test_flow import pull
from .support import Device, Server, online, online_tcp, start_server

if TYPE_CHECKING:
    import pytest

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
SENML_JSON, SENML_CBOR = 110, 112


def capture(stem: str) -> list[bytes]:
    """The datagrams the client sent (to the capture's server port), in order."""
    lines = (VECTORS / f"{stem}.jsonl").read_text().splitlines()[1:]
    records = [json.loads(line) for line in lines]
    server_port = records[0]["dst_port"]
    return [bytes.fromhex(r["hex"]) for r in records if r["dst_port"] == server_port]


async def raw(dev: Device, data: bytes) -> Message:
    """Send `data` from the device's socket as it is; the server's next answer to its MID."""
    mid = (data[2] << 8) | data[3]
    seen = len(answers(dev, mid))
    assert dev.sock is not None
    await dev.sock.sendto(data, dev.server)
    for _ in range(3000):  # 30 s
        await trio.sleep(0.01)
        if len(found := answers(dev, mid)) > seen:
            return found[-1]
    raise AssertionError(f"no answer to MID {mid}")


def answers(dev: Device, mid: int) -> list[Message]:
    return [m for _, m in dev.arrivals if m.mtype == MessageType.ACK and m.mid == mid]


def send_datagram(payload: bytes, ct: int | None, mid: int, token: bytes = b"") -> bytes:
    options = path_options("/dp")
    if ct is not None:
        options += ((OptionNumber.CONTENT_FORMAT, uint_bytes(ct)),)
    return encode(Message(MessageType.CON, Code.POST, mid, token, options, payload))


def sent_notifications(server: Server, ct: str) -> list[tuple[str, bytes]]:
    """(path, payload) of the notifications published in `ct` (the Observes' answers are
    text/plain: left out)."""
    out = []
    for _, item in server.take("notifications"):
        assert isinstance(item, dict)
        if item.get("ct") == ct:
            assert set(item) == {"ep", "path", "ct", "payload"}
            out.append((str(item["path"]), base64.b64decode(str(item["payload"]))))
    return out


async def registered_from_capture(
    nursery: trio.Nursery, stem: str, ep: str
) -> tuple[Server, Device, list[bytes]]:
    """A server, and a device that registered with the capture's own Register bytes (it
    answers the server's Observes like the scripted devices do)."""
    server = await start_server(nursery)
    data = capture(stem)
    register = decode(data[0])
    dev = Device(server.addr, ep, objects=register.payload)
    await dev.start(nursery)
    answer = await raw(dev, data[0])
    assert answer.code == Code.CREATED and answer.token == register.token
    assert ep in server.sup.by_endpoint
    server.take()
    return server, dev, data[1:]


async def test_anjay_sends_in_senml_cbor_reach_the_subscribers(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev, data = await registered_from_capture(
        nursery, "anjay-client-udp-send", "anjay-send"
    )
    for path in ("/3/0", "/3/0/9", "/3303/0/5700"):
        assert (await server.sup.subscribe("anjay-send", path)) == Accepted()
    await trio.sleep(1)
    assert sorted(dev.observers) == ["/3/0", "/3/0/9", "/3303/0/5700"]
    server.take()
    sends = data[:3]
    for datagram in sends:
        request = decode(datagram)
        answer = await raw(dev, datagram)
        assert (answer.mtype, answer.code) == (MessageType.ACK, Code.CHANGED)
        assert answer.token == request.token and answer.payload == b""
    published = sent_notifications(server, "application/senml+cbor")
    assert [path for path, _ in published] == ["/3/0", "/3/0", "/3/0/9", "/3303/0/5700"]
    t = 1796290285.8062441
    assert content.decode(SENML_CBOR, published[0][1]) == [
        ResourceValue("/3/0/0", "anjay", 1796290283.8770697)
    ]
    assert content.decode(SENML_CBOR, published[1][1]) == [
        ResourceValue("/3/0/0", "anjay", t),
        ResourceValue("/3/0/9", 0, t),
        ResourceValue("/3/0/13", 1796290285, t),
        ResourceValue("/3/0/14", "+01:00", t),
    ]
    assert content.decode(SENML_CBOR, published[2][1]) == [ResourceValue("/3/0/9", 0, t)]
    assert content.decode(SENML_CBOR, published[3][1]) == [
        ResourceValue("/3303/0/5700", 18.0, 1796290287.9058747)
    ]
    assert server.sup.statistics["sends"] == 3
    # the capture's De-register names its own server's id ("rd/1"), not ours: 4.04
    assert (await raw(dev, data[3])).code == Code.NOT_FOUND


async def test_wakaama_sends_with_zero_length_tokens(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev, data = await registered_from_capture(nursery, "wakaama-client-udp-send", "wk-send")
    for path in ("/3/0", "/1/0/1"):
        assert (await server.sup.subscribe("wk-send", path)) == Accepted()
    await trio.sleep(1)
    server.take()
    for datagram in data[:4]:
        assert decode(datagram).token == b""
        answer = await raw(dev, datagram)
        assert (answer.code, answer.token) == (Code.CHANGED, b"")
    published = sent_notifications(server, "application/senml+json")
    assert [path for path, _ in published] == ["/3/0", "/3/0", "/3/0", "/1/0/1"]
    assert published[0][1] == b'[{"bn":"/3/0/9","v":100}]'
    assert json.loads(published[1][1]) == [
        {"bn": "/3/0/", "n": "0", "vs": "Open Mobile Alliance"},
        {"n": "9", "v": 100},
        {"n": "14", "vs": "+01:00"},
    ]
    assert len(content.decode(SENML_JSON, published[2][1])) == 17  # the 416-byte Send
    # /31024/10/1 was registered, not subscribed: it reaches no one
    assert published[3][1] == b'[{"bn":"/1/0/1","v":300}]'


async def test_a_retransmitted_send_is_answered_again_and_published_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev, data = await registered_from_capture(nursery, "wakaama-client-udp-send", "wk-send")
    await server.sup.subscribe("wk-send", "/3/0/9")
    await trio.sleep(1)
    server.take()
    first = await raw(dev, data[0])
    again = await raw(dev, data[0])  # same Message ID: the device's ACK was lost
    assert encode(first) == encode(again)
    assert sent_notifications(server, "application/senml+json") == [
        ("/3/0/9", b'[{"bn":"/3/0/9","v":100}]')
    ]


async def test_refused_sends_are_answered_and_the_device_stays(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.subscribe("dev", "/3/0")
    await trio.sleep(1)
    server.take()
    good = b'[{"bn":"/3/0/9","v":1}]'
    cases = [
        (send_datagram(good, 0, 0x7001), Code.UNSUPPORTED_CONTENT_FORMAT),  # text/plain
        (send_datagram(good, 11542, 0x7002), Code.UNSUPPORTED_CONTENT_FORMAT),  # TLV
        (send_datagram(good, None, 0x7003), Code.UNSUPPORTED_CONTENT_FORMAT),  # no format
        (send_datagram(b'[{"bn":"/3/0/9"', SENML_JSON, 0x7004), Code.BAD_REQUEST),
        (send_datagram(b'[{"bn":"/3/0/9"}]', SENML_JSON, 0x7005), Code.BAD_REQUEST),
        (send_datagram(b"\x81" * 3000 + b"\x00", SENML_CBOR, 0x7006), Code.BAD_REQUEST),
        (send_datagram(b"\x9f" * 3000, SENML_CBOR, 0x7007), Code.BAD_REQUEST),
        (send_datagram(b"", SENML_CBOR, 0x7008), Code.BAD_REQUEST),
        (
            encode(Message(MessageType.CON, Code.GET, 0x7009, b"\x01", path_options("/dp"))),
            Code.METHOD_NOT_ALLOWED,
        ),
        (send_datagram(good, SENML_JSON, 0x700A).replace(b"\xb2dp", b"\xb2dq"), Code.NOT_FOUND),
    ]
    for datagram, code in cases:
        answer = await raw(dev, datagram)
        assert answer.code == code, (decode(datagram), answer)
    assert sent_notifications(server, "application/senml+json") == []
    stats = server.sup.statistics
    assert stats["sends_refused"] == len(cases) - 1  # (/dq is not a Send: plain 4.04)
    assert stats["peer_errors"] == 0
    assert "dev" in server.sup.by_endpoint
    # and the device's next Send is taken
    assert (await raw(dev, send_datagram(good, SENML_JSON, 0x700B))).code == Code.CHANGED
    assert sent_notifications(server, "application/senml+json") == [("/3/0", good)]


async def test_a_huge_senml_array_within_the_datagram_limit(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    await server.sup.subscribe("dev", "/3303/0")
    await trio.sleep(1)
    server.take()
    records: list[dict[str, object]] = [{"bn": "/3303/0/5700", "bt": 1.7e9, "v": 20}]
    while len(json.dumps(records, separators=(",", ":"))) < 4096 - 16 - 12:
        records.append({"t": len(records), "v": len(records) % 40})
    body = json.dumps(records, separators=(",", ":")).encode()
    assert 4050 < len(send_datagram(body, SENML_JSON, 1)) <= 4096  # the server reads 4096 B
    answer = await raw(dev, send_datagram(body, SENML_JSON, 0x7100))
    assert answer.code == Code.CHANGED
    [(path, payload)] = sent_notifications(server, "application/senml+json")
    assert path == "/3303/0"
    assert len(content.decode(SENML_JSON, payload)) == len(records) > 240


async def test_a_send_before_register_is_4_04(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        for stem in ("wakaama-client-udp-send", "anjay-client-udp-send"):
            datagram = capture(stem)[1]
            await sock.sendto(datagram, server.addr)
            with trio.fail_after(5):
                answer = decode((await sock.recvfrom(2048))[0])
            assert (answer.mtype, answer.code) == (MessageType.ACK, Code.NOT_FOUND)
            assert answer.token == decode(datagram).token
    assert server.take("notifications") == []
    assert server.sup.by_endpoint == {}


async def test_paths_the_device_never_registered_are_taken_and_reach_no_one(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Decided (docs/api.md, "LwM2M Send"): the Send is answered 2.04 (LwM2M has no
    per-value error, and a refusal would make the client resend the values it may have
    right); only subscribed paths are told, and a subscription needs a registered path."""
    server, dev = await online(nursery)  # registered: /1/0, /3/0, /3303/0, /3311/0
    await server.sup.subscribe("dev", "/3")
    await trio.sleep(1)
    server.take()
    body = b'[{"bn":"/","n":"31024/10/1","v":20},{"n":"3/0/9","v":7},{"n":"3/5/9","v":8}]'
    assert (await raw(dev, send_datagram(body, SENML_JSON, 0x7200))).code == Code.CHANGED
    assert sent_notifications(server, "application/senml+json") == [
        ("/3", b'[{"bn":"/3/","n":"0/9","v":7},{"n":"5/9","v":8}]')
    ]


async def test_an_application_receives_a_send_on_its_channel(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)
    async with api.client() as client:
        assert (await client.request("GET", "/v2/notification/pull")).status == 204
        dev = Device(api.server.addr, "dev")
        await dev.start(nursery)
        assert (await dev.register()).code == Code.CREATED
        assert "registrations" in await pull(client)
        assert (await client.request("PUT", "/v2/subscriptions/dev/3303/0/5700")).status == 200
        first = await pull(client)  # the Observe's own answer
        assert [n["payload"] for n in first["notifications"]] == ["NDI="]
        body = b'[{"bn":"/3303/0/5700","v":21.5}]'
        assert (await raw(dev, send_datagram(body, SENML_JSON, 0x7300, b"t"))).code == Code.CHANGED
        message = await pull(client)
        assert message == {"notifications": [
            {"ep": "dev", "path": "/3303/0/5700", "ct": "application/senml+json",
             "payload": base64.b64encode(body).decode()}]}  # fmt: skip


async def test_a_send_over_tcp(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online_tcp(nursery)
    await server.sup.subscribe("dev", "/3303/0")
    await trio.sleep(1)
    server.take()
    body = cbor2.dumps([{-2: "/3303/0/5700", -3: 1.7e9, 2: 21.5}])
    options = (*path_options("/dp"), (OptionNumber.CONTENT_FORMAT, uint_bytes(SENML_CBOR)))
    token = dev.coap.send_request(Code.POST, options, body, trio.current_time())
    await dev._flush()
    with trio.fail_after(5):
        while token not in dev._responses:
            await dev._wake.wait()
    assert dev._responses[token].code == Code.CHANGED
    [(path, payload)] = sent_notifications(server, "application/senml+cbor")
    assert path == "/3303/0"
    assert content.decode(SENML_CBOR, payload) == [ResourceValue("/3303/0/5700", 21.5, 1.7e9)]
    await dev.disconnect()


async def test_a_refused_send_is_one_log_line_with_its_reason(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    server, dev = await online(nursery)
    caplog.set_level(logging.INFO, "dm_actor.actors.refusals")
    datagram = send_datagram(b'[{"bn":"/3/0/9","v":1}]', 0, 0x7400)
    assert (await raw(dev, datagram)).code == Code.UNSUPPORTED_CONTENT_FORMAT
    assert (await raw(dev, datagram)).code == Code.UNSUPPORTED_CONTENT_FORMAT  # retransmitted
    assert (await raw(dev, send_datagram(b"[", SENML_JSON, 0x7401))).code == Code.BAD_REQUEST
    lines = [r.getMessage() for r in caplog.records if r.name == "dm_actor.actors.refusals"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("refused Send from udp 127.0.0.1:")
    assert lines[0].endswith(": 4.15, content format 0")
    assert ": 4.00, bad SenML JSON" in lines[1]
    assert server.sup.statistics["sends_refused"] == 2
