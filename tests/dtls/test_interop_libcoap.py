"""Two more independent DTLS stacks against `DtlsServer`: libcoap's `coap-client-openssl`
(OpenSSL) and `coap-client-gnutls` (GnuTLS), real subprocesses over a loopback UDP socket,
PSK, a CoAP GET answered over the session. Real time (a real process runs), bounded at 15 s.
Skipped when `libcoap3-bin` is not installed (`.ci/run` installs it)."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import time

import pytest

from dm_actor.coap.message import Message, decode, encode
from dm_actor.dtls import (
    ApplicationData,
    DatagramToSend,
    DtlsServer,
    Event,
    SessionClosed,
    SessionEstablished,
)

IDENTITY = "lc-device"
KEY = "a secret of 20 bytes"  # libcoap's -k takes the key as text


def serve_one_client(
    argv: list[str], server: DtlsServer, sock: socket.socket
) -> tuple[bytes, list[Event]]:
    seen: list[Event] = []
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    try:
        while process.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([sock], [], [], 0.05)
            now = time.monotonic()
            if ready:
                data, address = sock.recvfrom(65535)
                events = server.receive(data, address, now)
            else:
                events = server.handle_timer(now)
            seen += events
            for event in events:
                if isinstance(event, DatagramToSend):
                    sock.sendto(event.data, event.address)
                elif isinstance(event, ApplicationData):
                    request = decode(event.data)
                    if request.code == 1 and request.mtype == 0:  # a CON GET
                        answer = Message(
                            mtype=2,
                            code=0x45,
                            mid=request.mid,
                            token=request.token,
                            payload=b"hello from dm_actor",
                        )
                        sock.sendto(
                            server.send(event.session, encode(answer)), event.session.address
                        )
        output, _ = process.communicate(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return output, seen


@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
def test_libcoap_client_gets_a_resource_over_dtls_psk(binary: str) -> None:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian libcoap3-bin)")
    keys = {IDENTITY.encode(): KEY.encode()}
    server = DtlsServer(keys.get)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        argv = [path, "-u", IDENTITY, "-k", KEY, "-B", "10", f"coaps://127.0.0.1:{port}/hello"]
        output, events = serve_one_client(argv, server, sock)
    assert b"hello from dm_actor" in output, output
    (done,) = [e for e in events if isinstance(e, SessionEstablished)]
    assert done.session.identity == IDENTITY.encode()
    assert server.statistics().hello_verify_requests >= 1
    # libcoap sends close_notify as it exits; whether it is read before the process is reaped
    # depends on timing: if it was, it closed the session.
    closed = [e for e in events if isinstance(e, SessionClosed)]
    assert [e.reason for e in closed] in ([], ["close_notify"])
    assert server.statistics().sessions == 1 - len(closed)
    assert server.statistics().records_dropped == 0


@pytest.mark.parametrize("binary", ["coap-client-openssl", "coap-client-gnutls"])
def test_libcoap_client_with_a_wrong_key_gets_no_session(binary: str) -> None:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (Debian libcoap3-bin)")
    server = DtlsServer({IDENTITY.encode(): b"another key"}.get)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        argv = [path, "-u", IDENTITY, "-k", KEY, "-B", "3", f"coaps://127.0.0.1:{port}/hello"]
        output, events = serve_one_client(argv, server, sock)
    assert b"hello from dm_actor" not in output
    assert not any(isinstance(e, SessionEstablished) for e in events)
    assert server.statistics().sessions == 0 and server.statistics().handshakes_failed >= 1
