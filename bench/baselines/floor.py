"""The Python floor: the least a Trio process can do per LwM2M registration.

One task owns a UDP socket; it waits with `trio.lowlevel.wait_readable` and drains the
socket with non-blocking `recvfrom` until `BlockingIOError`, answering from the header alone:
a CON with a payload (a Register) gets ACK 2.01 with `Location-Path: rd/<n>`, any other CON
(an Update, a ping) gets ACK 2.04. No parsing, no state, no store. Whatever dm_actor does per
registration beyond this is its own cost.

    python bench/baselines/floor.py PORT
"""

from __future__ import annotations

import contextlib
import socket
import sys

import trio

_CON = 0


async def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, 4 * 1024 * 1024)
    sock.bind(("127.0.0.1", port))
    recvfrom, sendto = sock.recvfrom, sock.sendto
    wait_readable = trio.lowlevel.wait_readable
    registered = 0
    while True:
        await wait_readable(sock)
        for _ in range(256):
            try:
                data, addr = recvfrom(2048)
            except BlockingIOError:
                break
            if len(data) < 4 or (data[0] >> 4) & 3 != _CON:
                continue
            tkl = data[0] & 15
            head = data[2 : 4 + tkl]
            if data[1] == 0:  # CoAP ping
                reply = b"\x70\x00" + data[2:4]
            elif b"\xff" in data[4 + tkl :]:
                registered += 1
                rid = b"%x" % registered
                reply = bytes((0x60 | tkl, 0x41)) + head + b"\x82rd" + bytes((len(rid),)) + rid
            else:
                reply = bytes((0x60 | tkl, 0x44)) + head
            with contextlib.suppress(BlockingIOError):
                sendto(reply, addr)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, int(sys.argv[1]))
