"""Attacks on issue 15 (CoAP over DTLS with PSK, identity bound to the endpoint): each test
is a reproducer of a finding, marked xfail(strict) until it is fixed.

Daemon-level tests run `app.serve` on loopback (real clock, the fixtures of
tests/transport/test_dtls_daemon.py); machine-level ones drive `DtlsServer` directly.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import trio

from dm_actor import app
from dm_actor.coap.message import Message, path_options
from dm_actor.coap.numbers import Code, MessageType
from dm_actor.config import parse_settings
from dm_actor.dtls import (
    DatagramToSend,
    DtlsClient,
    DtlsServer,
    Event,
    HandshakeFailed,
    SessionClosed,
    SessionEstablished,
)
from dm_actor.dtls.record import ContentType, Record, open_record, plaintext_record
from dm_actor.transport.dtls import RELEASE_GRACE
from tests.dtls.peers import IDENTITY, KEY, SERVER, app_data, established, our_handshake
from tests.dtls.test_hostile import cookie_for, hello_datagram
from tests.transport.test_dtls_daemon import (  # noqa: F401 (server: a fixture)
    WAIT,
    SecureDevice,
    _device,
    server,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from dm_actor.address import Address

OLD_KEY = bytes(range(16))
NEW_KEY = bytes(range(100, 116))


def _records(datagram: bytes) -> list[bytes]:
    """The records of a datagram of records without Connection ID (13-byte headers)."""
    out = []
    while datagram:
        length = int.from_bytes(datagram[11:13], "big")
        out.append(datagram[: 13 + length])
        datagram = datagram[13 + length :]
    return out


async def _half_open(dev: SecureDevice) -> bytes:
    """Shake hands up to the client's final flight; send its ClientKeyExchange and
    ChangeCipherSpec, and return its Finished record, held back."""
    events = dev.dtls.connect(trio.current_time())
    final: bytes | None = None
    while True:
        for e in events:
            if isinstance(e, DatagramToSend):
                records = _records(e.data)
                if records[0][0] == 22 and records[0][13] == 16:  # ClientKeyExchange
                    final = records[-1]
                    for r in records[:-1]:
                        await dev.sock.sendto(r, dev.server)
                else:
                    await dev.sock.sendto(e.data, dev.server)
        if final is not None:
            return final
        with trio.fail_after(WAIT):
            data = await dev.sock.recv(65535)
        events = dev.dtls.receive(data, trio.current_time())


async def test_a_handshake_begun_with_a_revoked_key_does_not_complete(
    server: app.Listening,  # noqa: F811
) -> None:
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", OLD_KEY)  # the key that leaked
    assert server.coaps is not None
    thief = SecureDevice(server.coaps, "id-1", OLD_KEY, cid=False)
    await thief.open()
    with thief.sock:
        finished = await _half_open(thief)
        # the operator rotates the leaked key (PUT /v3/device-credentials, same identity)
        sup.provisioning.set("sensor-1", "id-1", NEW_KEY)
        await trio.sleep(0.05)
        await thief.sock.sendto(finished, thief.server)
        established = False
        with trio.move_on_after(1.0):
            while not established:
                data = await thief.sock.recv(65535)
                thief.dtls.receive(data, trio.current_time())
                established = thief.dtls.session is not None
        if established:
            reply = await thief.request(thief.register("sensor-1"))
            registered = reply.code == Code.CREATED
        else:
            registered = False
    assert not registered, "the revoked key's holder registered as sensor-1"
    assert not established, "a session keyed with the revoked key was established"


async def test_a_handshake_with_a_revoked_key_does_not_take_over_the_devices_commands(
    server: app.Listening,  # noqa: F811
) -> None:
    sup = server.supervisor
    sup.provisioning.set("sensor-1", "id-1", OLD_KEY)
    assert server.coaps is not None
    thief = SecureDevice(server.coaps, "id-1", OLD_KEY, cid=False)
    await thief.open()
    with thief.sock:
        finished = await _half_open(thief)
        sup.provisioning.set("sensor-1", "id-1", NEW_KEY)  # rotated
        device = await _device(server, "id-1", NEW_KEY)  # the device, with its new key
        assert await device.handshake()
        assert (await device.request(device.register("sensor-1"))).code == Code.CREATED
        await thief.sock.sendto(finished, thief.server)  # the stale handshake's Finished
        with trio.move_on_after(1.0):
            while thief.dtls.session is None:
                thief.dtls.receive(await thief.sock.recv(65535), trio.current_time())
        await sup.submit("sensor-1", "GET", "/3/0/0", async_id="secret-read")
        stolen = await thief.receive() if thief.dtls.session is not None else None
    assert stolen is None, f"the thief got the device's command {stolen}"


def test_machine_a_handshake_whose_key_changed_before_its_finished_fails() -> None:
    """The machine-level view of the same: the key is looked up again at the Finished."""
    keys = {b"id-1": OLD_KEY}
    srv = DtlsServer(keys.get)
    addr = ("127.0.0.1", 40000)
    client = DtlsClient(addr, b"id-1", OLD_KEY, connection_id=None)
    events = client.connect(0.0)
    held: bytes | None = None
    got: list[Event] = []
    for _ in range(10):
        out = [e for e in events if isinstance(e, DatagramToSend)]
        if not out:
            break
        data = out[0].data
        records = _records(data)
        if records[0][0] == 22 and records[0][13] == 16:
            held = records[-1]
            srv.receive(b"".join(records[:-1]), addr, 0.0)
            break
        got = srv.receive(data, addr, 0.0)
        events = []
        for e in got:
            if isinstance(e, DatagramToSend):
                events += client.receive(e.data, 0.0)
    assert held is not None
    keys[b"id-1"] = NEW_KEY  # rotated
    done = srv.receive(held, addr, 1.0)
    assert not any(isinstance(e, SessionEstablished) for e in done)
    assert [e.reason for e in done if isinstance(e, HandshakeFailed)] == ["credentials changed"]


def _established_pair(
    machine: DtlsServer, identity: bytes, key: bytes, address: Address
) -> DtlsClient:
    client = DtlsClient(SERVER, identity, key, connection_id=b"")
    our_handshake(machine, client, address)
    assert client.session is not None
    return client


def test_a_spoofed_source_address_does_not_end_another_devices_cid_session() -> None:
    keys = {b"victim": OLD_KEY, b"attacker": NEW_KEY}
    machine = DtlsServer(keys.get)
    victim_at: Address = ("192.0.2.10", 40000)
    victim = _established_pair(machine, b"victim", OLD_KEY, victim_at)
    attacker = _established_pair(machine, b"attacker", NEW_KEY, ("198.51.100.7", 50000))
    assert app_data(machine.receive(victim.send(b"hello"), victim_at, 1.0)) == [b"hello"]
    # the attacker's own valid record, sent with the victim's address as its source
    events = machine.receive(attacker.send(b"x"), victim_at, 2.0)
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert closed == [], f"the victim's session was ended: {closed}"
    # the victim, which heard nothing, goes on sending on its session
    assert app_data(machine.receive(victim.send(b"still here"), victim_at, 3.0)) == [b"still here"]


def test_one_ipv6_prefix_cannot_take_every_half_open_handshake_place() -> None:
    keys = {IDENTITY: KEY}
    machine = DtlsServer(keys.get)  # the daemon's defaults: 1024 in total, 8 per host
    for n in range(1100):
        address: Address = (f"2001:db8:0:1::{n:x}", 5000, 0, 0)
        hello_random = n.to_bytes(32, "big")
        cookie = cookie_for(machine, hello_random, address)
        machine.receive(hello_datagram(hello_random, cookie, 1), address, 0.0)
    flooded = machine.statistics().handshakes
    # a device elsewhere shakes hands a second later
    device = DtlsClient(SERVER, IDENTITY, KEY)
    events = our_handshake(machine, device, ("2001:db8:ffff::1", 6000, 0, 0), now=1.0)
    assert device.session is not None, f"refused: {flooded} half-open handshakes from one /64"
    assert established(events)


async def test_credentials_removed_by_the_cli_while_stopped_end_the_registration(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    text = f'[server]\nhost = "127.0.0.1"\ncoap_port = 0\ndata_dir = "{tmp_path}"\n'

    async def start() -> tuple[trio.CancelScope, app.Listening]:
        scope = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[app.Listening]) -> None:
            with scope:
                await app.serve(parse_settings(text), http=False, task_status=task_status)

        return scope, await nursery.start(serve)

    scope, first = await start()
    first.supervisor.provisioning.set("sensor-1", "id-1", OLD_KEY)
    dev = await _device(first, "id-1", OLD_KEY)
    assert await dev.handshake()
    assert (await dev.request(dev.register("sensor-1"))).code == Code.CREATED
    await first.supervisor.store.durable()
    scope.cancel()
    await trio.sleep(0.1)
    done = await trio.run_process(
        [sys.executable, "-m", "dm_actor", "credentials", "remove", "sensor-1",
         "--data-dir", str(tmp_path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, second = await start()
    assert "sensor-1" not in second.supervisor.by_endpoint


async def test_a_peer_cannot_write_a_log_line_per_handshake_and_close(
    server: app.Listening,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.supervisor.provisioning.set("sensor-1", "id-1", OLD_KEY)
    caplog.set_level(logging.INFO)
    for _ in range(60):
        dev = await _device(server, "id-1", OLD_KEY)
        assert await dev.handshake()
        close = dev.dtls.close()
        assert close is not None
        await dev.sock.sendto(close, dev.server)
        dev.sock.close()
    await trio.sleep(0.2)
    lines = [r for r in caplog.records if r.name.startswith("dm_actor")]
    assert len(lines) <= 25, f"{len(lines)} lines for 60 handshakes and closes"


def test_one_datagram_of_client_hellos_gets_at_most_one_hello_verify_request() -> None:
    machine = DtlsServer({IDENTITY: KEY}.get)
    packed = b"".join(hello_datagram(n.to_bytes(32, "big"), seq=n) for n in range(900))
    assert len(packed) < 65507
    events = machine.receive(packed, ("192.0.2.99", 5000), 0.0)
    sent = [e for e in events if isinstance(e, DatagramToSend)]
    assert len(sent) <= 1, f"{len(sent)} datagrams sent for one datagram received"


async def test_a_session_whose_registration_ended_is_closed(
    server: app.Listening,  # noqa: F811
) -> None:
    server.supervisor.provisioning.set("sensor-1", "id-1", OLD_KEY)
    dev = await _device(server, "id-1", OLD_KEY)
    assert await dev.handshake()
    reply = await dev.request(dev.register("sensor-1"))
    assert reply.code == Code.CREATED
    location = "/".join(v.decode() for n, v in reply.options if n == 8)
    dev.mid += 1
    deregister = Message(MessageType.CON, Code.DELETE, dev.mid, b"\x03", path_options(location))
    assert (await dev.request(deregister)).code == Code.DELETED
    await trio.sleep(RELEASE_GRACE + 0.5)  # (its 2.02 goes out on the session first)
    assert "sensor-1" not in server.supervisor.by_endpoint
    assert server.dtls is not None
    assert server.dtls.sessions() == 0, "the session outlives its registration"


async def test_one_datagram_of_forged_records_costs_a_bounded_number_of_decryptions(
    server: app.Listening,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.supervisor.provisioning.set("sensor-1", "id-1", OLD_KEY)
    dev = await _device(server, "id-1", OLD_KEY)
    dev.dtls = DtlsClient(dev.server, b"id-1", OLD_KEY, connection_id=None)
    assert await dev.handshake()
    calls = 0
    real = open_record

    def counting(key: bytes, iv: bytes, record: Record) -> tuple[int, bytes]:
        nonlocal calls
        calls += 1
        return real(key, iv, record)

    monkeypatch.setattr("dm_actor.dtls.session.open_record", counting)
    forged = b"".join(
        bytes((23, 0xFE, 0xFD, 0, 1)) + (1000 + n).to_bytes(6, "big") + b"\x00\x10" + bytes(16)
        for n in range(65000 // 29)
    )
    await dev.sock.sendto(forged, dev.server)
    await trio.sleep(0.5)  # (read and handled at once: loopback)
    assert calls <= 200, f"{calls} decryptions for one datagram"


def test_ipv4_hosts_on_a_dual_stack_socket_do_not_share_one_half_open_bound() -> None:
    """A guard for a per-prefix bound: with `--host ::` (a dual-stack socket) IPv4 peers come
    as IPv4-mapped IPv6 addresses (::ffff:a.b.c.d); their first 64 bits are the same for
    every IPv4 host, so a /64 bucket would put the whole IPv4 internet under one
    max_handshakes_per_host (8)."""
    machine = DtlsServer({IDENTITY: KEY}.get)
    for host in range(20):
        address: Address = (f"::ffff:198.51.100.{host + 1}", 5000, 0, 0)
        hello_random = host.to_bytes(32, "big")
        cookie = cookie_for(machine, hello_random, address)
        machine.receive(hello_datagram(hello_random, cookie, 1), address, 0.0)
    assert machine.statistics().handshakes == 20
    assert machine.statistics().handshakes_refused == 0


def test_spoofed_plaintext_records_do_not_make_the_server_repeat_its_finished() -> None:
    machine = DtlsServer({IDENTITY: KEY}.get)
    device_at: Address = ("192.0.2.5", 4000)
    client = DtlsClient(SERVER, IDENTITY, KEY, connection_id=None)
    our_handshake(machine, client, device_at)
    assert client.session is not None
    spoofed = plaintext_record(ContentType.CHANGE_CIPHER_SPEC, 0, 99, b"\x01")
    sent = 0
    for n in range(100):
        events = machine.receive(spoofed, device_at, 1.0 + n)
        sent += sum(1 for e in events if isinstance(e, DatagramToSend))
    assert sent == 0, f"{sent} datagrams for 100 spoofed ChangeCipherSpec records"


def test_one_device_behind_a_shared_nat_cannot_block_the_others_handshakes() -> None:
    machine = DtlsServer({IDENTITY: KEY}.get)
    for port in range(1, 9):  # the attacker's half-open handshakes, from the NAT's address
        address: Address = ("203.0.113.9", 40000 + port)
        hello_random = port.to_bytes(32, "big")
        cookie = cookie_for(machine, hello_random, address)
        machine.receive(hello_datagram(hello_random, cookie, 1), address, 0.0)
    assert machine.statistics().handshakes == 8  # of 1024 places
    neighbour = DtlsClient(SERVER, IDENTITY, KEY)  # another device behind the same NAT
    our_handshake(machine, neighbour, ("203.0.113.9", 50000), now=1.0)
    assert neighbour.session is not None, "refused while 1016 places were free"
