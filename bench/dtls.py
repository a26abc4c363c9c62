"""The DTLS 1.2 PSK machine on one core: handshakes per second (our client against our server,
in memory, with the cookie round), the cost of one record encrypt/decrypt, and the memory of
an established session at N sessions (tracemalloc for the Python heap, RSS for everything,
native allocations included).

    python bench/dtls.py [--sessions 10000] [--handshakes 2000]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
import tracemalloc

from dm_actor.dtls import DatagramToSend, DtlsClient, DtlsServer, Event

KEY = bytes(range(16))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def handshake(server: DtlsServer, client: DtlsClient, address: tuple[str, int]) -> None:
    def out(events: list[Event]) -> list[bytes]:
        return [e.data for e in events if isinstance(e, DatagramToSend)]

    pending = out(client.connect(0.0))
    while pending:
        replies: list[bytes] = []
        for data in pending:
            for reply in out(server.receive(data, address, 0.0)):
                replies += out(client.receive(reply, 0.0))
        pending = replies
    assert client.session is not None


def address(i: int) -> tuple[str, int]:
    return (f"127.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 10000 + i % 50000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--handshakes", type=int, default=2000)
    args = parser.parse_args()
    keys = {f"dev-{i}".encode(): KEY for i in range(max(args.sessions, args.handshakes))}

    # Handshakes: both halves run in this process, so the server's share is measured apart.
    server = DtlsServer(keys.get, max_handshakes=1 << 20, max_handshakes_per_host=1 << 20)
    clients = [
        DtlsClient(address(i), f"dev-{i}".encode(), KEY, connection_id=b"")
        for i in range(args.handshakes)
    ]
    server_time = 0.0
    receive = server.receive

    def timed_receive(data: bytes, addr: tuple[str, int], now: float) -> list[Event]:
        nonlocal server_time
        t = time.process_time()
        events = receive(data, addr, now)
        server_time += time.process_time() - t
        return events

    server.receive = timed_receive  # type: ignore[method-assign,assignment]
    t0 = time.process_time()
    for i, client in enumerate(clients):
        handshake(server, client, address(i))
    both = time.process_time() - t0
    server.receive = receive  # type: ignore[method-assign]

    # Records: 100-byte CoAP-sized payloads on one established session.
    session = server.session_at(address(0))
    client = clients[0]
    assert session is not None and client.session is not None
    payload = bytes(100)
    n = 20000
    t = time.process_time()
    records = [client.send(payload) for _ in range(n)]
    encrypt = (time.process_time() - t) / n
    t = time.process_time()
    for record in records:
        server.receive(record, address(0), 1.0)
    decrypt = (time.process_time() - t) / n

    # Memory per established session at args.sessions: addresses and clients exist before the
    # measurement (the transport owns the address tuples), the clients are dropped before the
    # second snapshot; what is left is the server's sessions and its tables.
    del clients, records, client, session
    gc.collect()

    def fill(measure: bool) -> tuple[DtlsServer, float]:
        addresses = [address(i) for i in range(args.sessions)]
        peers = [
            DtlsClient(addresses[i], f"dev-{i}".encode(), KEY, connection_id=b"")
            for i in range(args.sessions)
        ]
        gc.collect()
        if measure:
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
        rss_before = rss_kib()
        big = DtlsServer(keys.get, max_handshakes=1 << 20, max_handshakes_per_host=1 << 20)
        for i, peer in enumerate(peers):
            handshake(big, peer, addresses[i])
            big.receive(peer.send(b"x"), addresses[i], 1.0)  # clears the kept final flight
        big.get_timer()
        del peers
        gc.collect()
        if measure:
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        else:
            grown = (rss_kib() - rss_before) * 1024
        assert big.statistics().sessions == args.sessions
        return big, grown / args.sessions

    _, per_session_rss = fill(measure=False)
    _, per_session_py = fill(measure=True)
    print(
        json.dumps(
            {
                "handshakes": args.handshakes,
                "handshakes_per_s_both_halves": round(args.handshakes / both),
                "handshakes_per_s_server_side": round(args.handshakes / server_time),
                "record_encrypt_us": round(encrypt * 1e6, 2),
                "record_decrypt_us_via_receive": round(decrypt * 1e6, 2),
                "sessions": args.sessions,
                "tracemalloc_bytes_per_session": round(per_session_py),
                "rss_growth_bytes_per_session_upper_bound": round(per_session_rss),
                "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
