"""Attacks on issue 16 (metrics, health checks, JSON logs, the console): each test is a bug
found by using the new surface as a hostile client, device or operator tool would. Each is
`xfail(strict=True)` until the bug is fixed: the test states the behaviour the docs promise,
and fails today. Real loopback sockets (and a real daemon for the log), virtual time where
the app runs in-process.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import cbor2
import trio
import trio.lowlevel
import trio.testing
from trio_websocket import wrap_client_stream

from dm_actor import app
from dm_actor.api.auth import ApiKeys
from dm_actor.api.server import HttpServer
from dm_actor.coap.message import uint_bytes
from dm_actor.coap.numbers import Code, OptionNumber
from dm_actor.config import parse_settings
from dm_actor.logformat import JsonFormatter
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content.values import ResourceValue
from tests.actors.support import Device, GatedStore, start_server
from tests.api.client import KEY_A, HttpClient, start_api
from tests.api.test_flow import online
from tests.api.test_health_flood import health, serving as serving_four_slots, stalled_upload
from tests.api.test_webhook import Received, Receiver, device_request, register
from tests.console.test_console_api import ADMIN as CONSOLE_ADMIN, _tap, tap_until
from tests.daemon import Daemon, free_ports

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_websocket import WebSocketConnection

    from dm_actor.address import Address
    from dm_actor.coap.message import Message

ADMIN = CONSOLE_ADMIN  # (the console tests' tap helper authenticates with it)
KEYS = ApiKeys([KEY_A], admin_keys=[ADMIN])


async def _serve_with_admin(
    nursery: trio.Nursery, tmp_path: Path, extra: str = ""
) -> app.Listening:
    """The whole app in-process (memory store, loopback, any ports), with an admin key."""
    settings = parse_settings(
        f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\nhttp_port = 0\nstore = "memory"\n'
        f'data_dir = "{tmp_path}"\n{extra}'
    )
    listening: app.Listening = await nursery.start(
        lambda task_status: app.serve(settings, api_keys=KEYS, task_status=task_status)
    )
    return listening


# -- JSON logs ---------------------------------------------------------------------------------


async def _raw(addr: tuple[str, int], data: bytes) -> bytes:
    """Send raw bytes on a new connection, read until the server closes it."""
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(data)
        out = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
        return out


async def test_a_short_request_target_keeps_the_log_one_json_object_per_line(
    tmp_path: Path,
) -> None:
    coap, http = free_ports(2)
    args = ["--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(http),
            "--data-dir", str(tmp_path / "data"), "--api-key", KEY_A, "--admin-key", ADMIN,
            "--log-format", "json", "--log-level", "debug"]  # fmt: skip
    daemon = Daemon(args, ("127.0.0.1", http), tmp_path / "log")
    await daemon.start()
    try:
        with trio.fail_after(20):
            await daemon.ready()
            for target in (b"/v2", b"x", b"*"):
                answer = await _raw(
                    daemon.http,
                    b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n" % target,
                )
                assert answer.startswith(b"HTTP/1.1 401"), answer
            proc = daemon.proc
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            daemon.proc = None
    finally:
        await daemon.kill()
    lines = daemon.log.read_text().splitlines()
    for line in lines:  # one JSON object per line, whatever a client sent
        assert isinstance(json.loads(line), dict), line
    requests = [json.loads(line)["message"] for line in lines if "HTTP request" in line]
    assert len(requests) >= 3, requests  # each request's debug line is written


# -- connection slots --------------------------------------------------------------------------


async def _unread_pipeline(
    addr: Address, path: bytes, request: bytes | None = None
) -> trio.SocketStream:
    """A connection without a key that pipelines `GET path` until the server stops reading
    it (its answers fill the TCP window: this client never reads)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(addr[:2])
    stream = trio.SocketStream(sock)
    requests = (request or b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path) * 10
    while True:
        with trio.move_on_after(1) as blocked:
            await stream.send_all(requests)
        if blocked.cancelled_caught:
            return stream


async def test_a_keyless_client_that_does_not_read_health_answers_holds_no_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving_four_slots(nursery, tmp_path)  # [api] max_connections = 4
    addr = listening.http
    assert addr is not None
    held = [await _unread_pipeline(addr, b"/healthz") for _ in range(3)]
    held.append(await _unread_pipeline(addr, b"/metrics"))  # 401s, not counted as refusals
    try:
        with trio.fail_after(5):
            async with HttpClient(addr, KEY_A) as client:
                reply = await client.request("GET", "/v3/devices")
        assert reply.status == 200, (reply.status, reply.text)
    finally:
        for stream in held:
            await stream.aclose()


async def test_health_is_answered_within_two_seconds_behind_800_silent_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving_four_slots(nursery, tmp_path)  # [api] max_connections = 4
    addr = listening.http
    assert addr is not None
    busy = [await stalled_upload(addr) for _ in range(4)]  # every slot (body_timeout 30 s)
    await trio.sleep(0.5)
    silent = [await trio.open_tcp_stream(*addr[:2]) for _ in range(800)]
    try:
        with trio.fail_after(2):  # a load balancer's or a kubelet's probe timeout
            assert await health(addr) == 200
    finally:
        for stream in busy + silent:
            await stream.aclose()


async def test_a_keyless_client_that_does_not_read_console_assets_holds_no_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving_four_slots(nursery, tmp_path)  # [api] max_connections = 4
    addr = listening.http
    assert addr is not None
    held = [await _unread_pipeline(addr, b"/console/console.js") for _ in range(4)]
    try:
        with trio.fail_after(5):
            async with HttpClient(addr, KEY_A) as client:
                reply = await client.request("GET", "/v3/devices")
        assert reply.status == 200, (reply.status, reply.text)
    finally:
        for stream in held:
            await stream.aclose()


_PREFLIGHT = (
    b"OPTIONS /v3/devices HTTP/1.1\r\nhost: x\r\norigin: https://app.example\r\n"
    b"access-control-request-method: GET\r\n\r\n"
)


async def test_a_client_that_does_not_read_its_allowed_preflights_holds_no_slot(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await _serve_with_admin(
        nursery, tmp_path, '[api]\nmax_connections = 4\ncors_origins = ["https://app.example"]\n'
    )
    addr = listening.http
    assert addr is not None
    held = [await _unread_pipeline(addr, b"", _PREFLIGHT) for _ in range(4)]
    try:
        with trio.fail_after(5):
            async with HttpClient(addr, KEY_A) as client:
                reply = await client.request("GET", "/v3/devices")
        assert reply.status == 200, (reply.status, reply.text)
    finally:
        for stream in held:
            await stream.aclose()


async def test_health_is_answered_within_two_seconds_behind_800_one_byte_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serving_four_slots(nursery, tmp_path)  # [api] max_connections = 4
    addr = listening.http
    assert addr is not None
    busy = [await stalled_upload(addr) for _ in range(4)]  # every slot (body_timeout 30 s)
    await trio.sleep(0.5)
    started = []
    for _ in range(800):
        stream = await trio.open_tcp_stream(*addr[:2])
        await stream.send_all(b"G")
        started.append(stream)
    try:
        with trio.fail_after(2):  # a load balancer's or a kubelet's probe timeout
            assert await health(addr) == 200
    finally:
        for stream in busy + started:
            await stream.aclose()


# -- /metrics ----------------------------------------------------------------------------------


async def _response(stream: trio.SocketStream) -> bytes:
    """One whole response (content-length framed) read from `stream`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head


class _Turns(trio.abc.Instrument):
    """Counts the scheduler's passes (each follows a wait for I/O: a datagram or a request
    that arrived meanwhile waits for the pass to end), and the device records read in each:
    how long the event loop was held, in devices."""

    def __init__(self) -> None:
        self.turn = 0
        self.read: dict[int, int] = {}  # devices read in each pass

    def after_io_wait(self, timeout: float) -> None:
        self.turn += 1


class _StandIn:
    """What the scrape reads of a registered device (`actor.reg`), counted per turn."""

    def __init__(self, turns: _Turns, reg: object) -> None:
        self._turns, self._reg = turns, reg

    @property
    def reg(self) -> object:
        read = self._turns.read
        turn = self._turns.turn
        read[turn] = read.get(turn, 0) + 1
        return self._reg


async def test_concurrent_scrapes_hold_the_loop_no_longer_than_one(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await _serve_with_admin(nursery, tmp_path)
    assert listening.http is not None
    sup = listening.supervisor
    dev = Device(listening.coap_udp, "d0")
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    turns = _Turns()
    real = sup.by_endpoint["d0"].reg
    devices = 20_000
    for i in range(devices):
        sup.by_endpoint[f"stand-in-{i}"] = _StandIn(turns, real)  # type: ignore[assignment]
    # 8 kept-alive connections, served (waiting for their next request head)
    streams, raws = [], []
    for _ in range(8):
        sock = socket.create_connection(listening.http[:2])
        raws.append(sock.dup())  # (sends without a checkpoint, below)
        streams.append(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    for stream in streams:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await _response(stream)).startswith(b"HTTP/1.1 200")
    trio.lowlevel.add_instrument(turns)
    scrape = b"GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n\r\n"
    for raw in raws:  # the 8 scrapes arrive together, as 8 Prometheus servers' may
        raw.send(scrape % ADMIN.encode())
    for stream in streams:
        assert (await _response(stream)).startswith(b"HTTP/1.1 200")
    trio.lowlevel.remove_instrument(turns)
    for stream, raw in zip(streams, raws, strict=True):
        raw.close()
        await stream.aclose()
    for i in range(devices):
        del sup.by_endpoint[f"stand-in-{i}"]
    held = max(turns.read.values())
    assert held <= 2 * devices, f"{held} device records read in one pass of the scheduler"


class _JsonLines(logging.Handler):
    """The records of the `dm_actor` loggers, as `--log-format json` writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(json.loads(self.format(record)))


async def test_webhook_delivery_lines_carry_no_request_id_of_an_old_request(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def answer(received: Received) -> int:
        return 200 if received.body == b"{}" else 500  # the test PUT passes, then failures

    receiver = Receiver(answer)
    url = await receiver.start(nursery)
    api = await start_api(nursery)
    await online(api, nursery)
    lines = _JsonLines()
    logger = logging.getLogger("dm_actor")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        async with api.client() as client:
            assert (await register(client, url))[0] == 204
            await device_request(client, "x1")
            await trio.sleep(5)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    about = [r for r in lines.records if r["logger"] == "dm_actor.api.webhook"]
    assert about, lines.records  # the retries were logged
    for record in about:
        assert "request_id" not in record, record


# -- /readyz -----------------------------------------------------------------------------------


async def test_readyz_is_not_ready_while_the_store_commits_nothing_for_a_minute(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    store = GatedStore()
    store.open = True
    server = await start_server(nursery, store=store)
    http = HttpServer(server.sup, KEYS)
    addr = await nursery.start(http.run, "127.0.0.1", 0)
    http.ops.listening = True  # (app.serve attaches the transports once all are bound)
    dev = Device(server.addr, "dev")
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    assert await health(addr, "/readyz") == 200
    store.open = False  # the disk hangs from now on: nothing fails, nothing commits
    late = Device(server.addr, "late")
    await late.start(nursery)
    nursery.start_soon(late.register)  # its 2.01 waits for the store

    async def command() -> None:
        async with HttpClient(addr, KEY_A) as client:
            await client.request(
                "POST", "/v2/device-requests/dev?async-id=a1",
                json={"method": "GET", "uri": "/3/0/0"},
            )  # fmt: skip

    nursery.start_soon(command)  # its 202 waits for the store
    await trio.sleep(60)
    assert store.backlog() > 0 and server.sup.registry.awaiting > 0
    assert await health(addr, "/readyz") == 503
    store.open = True
    store.commit()


async def test_keyless_metrics_requests_count_toward_the_ten_401s_a_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await _serve_with_admin(nursery, tmp_path)
    assert listening.http is not None
    stream = await trio.open_tcp_stream(*listening.http[:2])
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n" * 50)
        answers = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                answers += chunk
    assert answers.count(b"HTTP/1.1 401") <= 10, answers.count(b"HTTP/1.1 401")
    assert b"connection: close" in answers.lower()


# -- the console -------------------------------------------------------------------------------


def _bignum_answer(req: Message) -> tuple[int, bytes, int | None]:
    """A device that answers a read with one CBOR integer of 2,000 bytes (a bignum, tag 2:
    valid CBOR, 4,817 decimal digits), content format 60."""
    if req.code == Code.GET:
        return Code.CONTENT, cbor2.dumps(2 ** (8 * 2000)), 60
    return Code.CHANGED, b"", None


async def test_a_device_answer_holding_a_huge_cbor_integer_is_shown_not_a_server_error(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    await online(api, nursery, handler=_bignum_answer)
    async with api.client(ADMIN) as admin, _tap(api) as tap:
        assert json.loads(await tap.get_message())["events"] == []  # the tap's first message
        reply = await admin.request(
            "POST", "/admin/device-requests/dev", json={"method": "GET", "uri": "/3303/0/5700"}
        )
        assert reply.status == 202, reply.text
        async_id = reply.json()["async-response-id"]
        await trio.sleep(1)
        result = await admin.request("GET", f"/admin/async-responses/{async_id}")
        assert result.status == 200, result.status  # the value, or a decode_error
        with trio.fail_after(5):
            event = await tap_until(tap, "async-responses")  # the tap is still open
        assert event["item"]["id"] == async_id


#: a SenML CBOR notification of 290 records (2,523 bytes: one UDP datagram)
_RECORDS = content.encode(112, [ResourceValue(f"/3303/0/{i}", i) for i in range(290)])


def _records_answer(req: Message) -> tuple[int, bytes, int | None]:
    if req.code == Code.GET:
        return Code.CONTENT, _RECORDS, 112
    return Code.CHANGED, b"", None


class _LongestPass(trio.abc.Instrument):
    """The longest scheduler pass in wall-clock time: how long the event loop was held
    (a datagram or a request arriving meanwhile waits for the pass to end)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.longest = 0.0

    def after_io_wait(self, timeout: float) -> None:
        self.started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        if self.started is not None:
            self.longest = max(self.longest, time.perf_counter() - self.started)


@asynccontextmanager
async def _big_tap(addr: Address) -> AsyncIterator[WebSocketConnection]:
    """An administrator's event tap that takes messages of any size (as a browser does)."""
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/admin/events",
                                      subprotocols=[f"pelion_{ADMIN}"],
                                      max_message_size=1 << 28)  # fmt: skip
        yield ws
        nursery.cancel_scope.cancel()


async def test_a_burst_of_large_notifications_does_not_hold_the_loop_for_the_tap(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    dev = await online(api, nursery, handler=_records_answer)
    passes = _LongestPass()
    async with api.client(ADMIN) as admin, AsyncExitStack() as stack:
        taps = [await stack.enter_async_context(_big_tap(api.addr)) for _ in range(8)]
        for tap in taps:
            assert json.loads(await tap.get_message())["events"] == []
        assert (await admin.request("PUT", "/admin/subscriptions/dev/3303/0")).status == 200
        for tap in taps:
            await tap_until(tap, "notifications")  # the Observe's first answer
        token = dev.observers["/3303/0"]
        trio.lowlevel.add_instrument(passes)
        for seq in range(2, 202):
            options = ((OptionNumber.OBSERVE, uint_bytes(seq)),
                       (OptionNumber.CONTENT_FORMAT, uint_bytes(112)))  # fmt: skip
            dev.coap.notify(token, Code.CONTENT, options, _RECORDS, trio.current_time())
        await dev._flush()

        async def read(tap: WebSocketConnection) -> None:
            shown = 0
            while shown < 200:
                message = json.loads(await tap.get_message())
                shown += sum(e["kind"] == "notifications" for e in message["events"])

        with trio.fail_after(120):
            async with trio.open_nursery() as readers:
                for tap in taps:
                    readers.start_soon(read, tap)
        trio.lowlevel.remove_instrument(passes)
    assert passes.longest < 0.25, f"the event loop was held {passes.longest:.2f} s in one pass"
