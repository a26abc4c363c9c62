"""The UDP socket: one task receives, any task sends, nothing here understands CoAP.

`UdpEndpoint` owns one non-blocking UDP socket. Its `run()` task waits until the socket is
readable and then drains it with non-blocking `recvfrom` calls, handing each datagram to a
synchronous callback; that batching is the largest single performance lever of the server
(about 4 µs per datagram instead of about 26 µs when awaiting each receive). `send()` is a
synchronous non-blocking `sendto`.

On Linux the socket sets IP_RECVERR, so an ICMP "port unreachable" (or host/network
unreachable) for a datagram we sent is queued on the socket's error queue; the receive task
drains that queue and reports each unreachable destination through a second callback. This
module never decodes, routes, retries or buffers datagrams: UDP may drop, and so may we.

What the kernel drops because the receive buffer was full (we read slower than peers send) is
counted too: on Linux the socket sets SO_RXQ_OVFL, and each datagram read with `recvmsg`
carries the socket's drop counter as it stood when that datagram was queued (present only
once something was dropped). Measured on loopback, `recvmsg` with room for that costs about
0.5 µs more per datagram than `recvfrom` (2.3 instead of 1.7 µs), under 1 % of the ~75 µs of
CPU a Register takes; reading it only for the first datagram of each batch would be cheaper
but would leave the count carried by the batch's later datagrams unseen until the next batch.
Drops are seen with the first datagram queued after them (the ones queued before carry the
older count).

At debug level each datagram in and out is decoded once more and logged as one line
(`coap.trace.describe`). Whether debug is on is read once per receive batch (`_trace`, which
`send` reads too), so with debug off this costs one boolean test per datagram and builds
nothing.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dm_actor.coap import message as coap_message, trace
from dm_actor.coap.errors import DecodeError

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.address import Address

log = logging.getLogger(__name__)

#: a receive batch ends after this many seconds of handling (checked every 16 datagrams), as
#: after `max_batch` datagrams: a burst of costly datagrams must not hold the event loop
_BATCH_TIME = 0.005
#: longer datagrams are not decoded for the debug log (the router drops them unread)
_TRACE_MAX = 4096


# Linux <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>; Python 3.11 exports none of them.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err, before the offender
# <asm-generic/socket.h>: the ancillary uint32 of datagrams dropped before this one was queued
_SO_RXQ_OVFL = 40
_OVERFLOW_SPACE = socket.CMSG_SPACE(4)
_DROPS_LOG_INTERVAL = 60.0  # seconds between two warnings about kernel drops

#: errno values an ICMP error puts on a UDP socket (icmp_err_convert, icmpv6_err_convert).
_ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EACCES,
        errno.EPROTO,
        errno.EMSGSIZE,
    }
)
#: `sendto` failures that only cost this datagram: a full send buffer or queue, a firewall.
_SEND_DROPS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EPERM})
#: The subset that means "nobody is listening there": reported through `on_unreachable`.
_UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


@dataclass(frozen=True, slots=True)
class UdpStatistics:
    """Counters of one `UdpEndpoint` since it started."""

    received: int
    """Datagrams handed to `on_datagram`."""
    sent: int
    """Datagrams the kernel accepted for sending."""
    dropped: int
    """Datagrams `send()` dropped because the socket's send buffer was full (or errored)."""
    unreachable: int
    """ICMP unreachable reports handed to `on_unreachable`."""
    kernel_drops: int = 0
    """Datagrams the kernel dropped because the receive buffer was full (Linux only), as of
    the last datagram read."""


class UdpEndpoint:
    """One UDP socket with a batched receive loop.

    Args:
        host: the address to bind ("0.0.0.0", "::", "127.0.0.1", a name).
        port: the port to bind; 0 picks a free one (`run()` reports which).
        on_datagram: called as `on_datagram(data, addr)` for each datagram received, from the
            receive task. It must not block: route the datagram and return.
        on_unreachable: called as `on_unreachable(addr)` when an ICMP error says that a
            datagram we sent to `addr` found no listener (port, host or network unreachable).
        max_datagram_size: the receive buffer per datagram; longer datagrams are truncated
            by the kernel, so keep it above the largest message a peer may send.
        socket_buffer: SO_RCVBUF and SO_SNDBUF to request (the kernel caps them at
            net.core.rmem_max / wmem_max); a burst larger than this is dropped by the kernel.
        max_batch: datagrams drained per wake-up before yielding to other tasks.
        reuse_port: set SO_REUSEPORT before binding, so that several processes (the nodes of
            a cluster on one host) share the port; the kernel spreads datagrams over them by
            a hash of the 4-tuple, so one device's datagrams reach one socket while the set
            of sockets stays the same.
        trace: decode and log each datagram at debug level (off for sockets whose datagrams
            are not CoAP: the cluster link's frames).
    """

    __slots__ = (
        "_dropped",
        "_drops_logged_at",
        "_errors_pending",
        "_host",
        "_kernel_drops",
        "_max_batch",
        "_max_datagram_size",
        "_on_datagram",
        "_on_unreachable",
        "_port",
        "_received",
        "_reuse_port",
        "_sent",
        "_sock",
        "_socket_buffer",
        "_trace",
        "_traced",
        "_unreachable",
    )

    def __init__(
        self,
        host: str,
        port: int,
        on_datagram: Callable[[bytes, Address], None],
        on_unreachable: Callable[[Address], None],
        *,
        max_datagram_size: int = 65535,
        socket_buffer: int = 4 * 1024 * 1024,
        max_batch: int = 256,
        reuse_port: bool = False,
        trace: bool = True,
    ) -> None:
        self._host = host
        self._port = port
        self._on_datagram = on_datagram
        self._on_unreachable = on_unreachable
        self._max_datagram_size = max_datagram_size
        self._socket_buffer = socket_buffer
        self._max_batch = max_batch
        self._reuse_port = reuse_port
        self._sock: socket.socket | None = None
        self._errors_pending = False
        self._received = 0
        self._sent = 0
        self._dropped = 0
        self._unreachable = 0
        self._kernel_drops = 0
        self._drops_logged_at = -math.inf
        self._traced = trace
        self._trace = trace and log.isEnabledFor(logging.DEBUG)  # read again each batch

    def statistics(self) -> UdpStatistics:
        return UdpStatistics(
            self._received, self._sent, self._dropped, self._unreachable, self._kernel_drops
        )

    def send(self, data: bytes, addr: Address) -> None:
        """Send one datagram now, without waiting.

        If the socket's send buffer is full (or the kernel refuses with ENOBUFS or EPERM)
        the datagram is dropped and counted in `statistics().dropped`: UDP may lose
        datagrams anyway, and CoAP's retransmission covers both. A pending ICMP error that
        the kernel reports on this send (instead of sending) is left for the receive task to
        report, and the send is retried once.

        Raises:
            trio.ClosedResourceError: the endpoint is not running.
        """
        sock = self._sock
        if sock is None:
            raise trio.ClosedResourceError("the UDP endpoint is not running")
        try:
            sock.sendto(data, addr)
        except OSError as exc:
            if exc.errno in _ICMP_ERRNOS:
                # An earlier ICMP error, reported instead of sending: the receive task drains
                # the error queue; this datagram gets one more try.
                self._errors_pending = True
                try:
                    sock.sendto(data, addr)
                except OSError as again:
                    if again.errno not in _SEND_DROPS and again.errno not in _ICMP_ERRNOS:
                        raise
                    self._dropped += 1
                    return
            elif exc.errno in _SEND_DROPS:
                self._dropped += 1
                return
            else:
                raise
        self._sent += 1
        if self._trace:
            _trace(data, "out", addr)

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind the socket, report its address, then receive until cancelled.

        Start it with `addr = await nursery.start(endpoint.run)`. The socket is closed when
        this returns.
        """
        sock = await self._open()
        try:
            self._sock = sock
            task_status.started(sock.getsockname())
            await self._receive_loop(sock)
        finally:
            self._sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _open(self) -> socket.socket:
        infos = await trio.socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, self._socket_buffer)
            if sys.platform == "linux":
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _receive_loop(self, sock: socket.socket) -> None:
        if sys.platform != "linux":
            await self._receive_loop_portable(sock)
            return
        recvmsg = sock.recvmsg
        size = self._max_datagram_size
        space = _OVERFLOW_SPACE
        limit = self._max_batch
        on_datagram = self._on_datagram
        wait_readable = trio.lowlevel.wait_readable
        clock = time.perf_counter
        is_enabled_for = log.isEnabledFor
        while True:
            await wait_readable(sock)
            self._trace = tracing = self._traced and is_enabled_for(logging.DEBUG)
            n = 0
            ancillary = None
            stop = clock() + _BATCH_TIME
            while n < limit and (n & 15 or clock() < stop):
                try:
                    data, anc, _, addr = recvmsg(size, space)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _ICMP_ERRNOS:
                        raise
                    self._drain_errors(sock)
                    continue
                n += 1
                if anc:  # present only once the kernel has dropped something
                    ancillary = anc
                if tracing:
                    _trace(data, "in", addr)
                on_datagram(data, addr)
            self._received += n
            if ancillary is not None:
                self._count_drops(ancillary)
            # Woken with nothing to read means POLLERR: errors are queued whose pending
            # error a send() has already consumed (it set the flag too).
            if n == 0 or self._errors_pending:
                self._drain_errors(sock)

    def _count_drops(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(value) >= 4:
                drops = int.from_bytes(value[:4], sys.byteorder)
                if drops > self._kernel_drops:
                    self._kernel_drops = drops
                    now = trio.current_time()
                    if now >= self._drops_logged_at + _DROPS_LOG_INTERVAL:
                        self._drops_logged_at = now
                        log.warning(
                            "the kernel has dropped %d UDP datagrams so far: the receive"
                            " buffer was full (docs/operations.md, Limits)",
                            drops,
                        )

    async def _receive_loop_portable(self, sock: socket.socket) -> None:
        recvfrom = sock.recvfrom
        size = self._max_datagram_size
        limit = self._max_batch
        on_datagram = self._on_datagram
        wait_readable = trio.lowlevel.wait_readable
        while True:
            await wait_readable(sock)
            self._trace = tracing = self._traced and log.isEnabledFor(logging.DEBUG)
            n = 0
            while n < limit:
                try:
                    data, addr = recvfrom(size)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno not in _ICMP_ERRNOS:
                        raise
                    self._drain_errors(sock)
                    continue
                n += 1
                if tracing:
                    _trace(data, "in", addr)
                on_datagram(data, addr)
            self._received += n
            if n == 0 or self._errors_pending:
                self._drain_errors(sock)

    def _drain_errors(self, sock: socket.socket) -> None:
        """Read every queued socket error and report the unreachable destinations."""
        self._errors_pending = False
        if sys.platform != "linux":
            return
        while True:
            try:
                _, ancdata, _, addr = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except BlockingIOError:
                return
            for level, kind, data in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, _IP_RECVERR),
                    (socket.IPPROTO_IPV6, _IPV6_RECVERR),
                ) or len(data) < _EXTENDED_ERR.size:
                    continue
                err, origin = _EXTENDED_ERR.unpack_from(data)[:2]
                if origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6) and (
                    err in _UNREACHABLE_ERRNOS
                ):
                    self._unreachable += 1
                    self._on_unreachable(addr)
                else:
                    log.debug("UDP socket error %s for %s ignored", errno.errorcode.get(err), addr)


def _trace(data: bytes, direction: str, addr: Address) -> None:
    """Log one datagram at debug level (only called while debug is on)."""
    if len(data) > _TRACE_MAX:  # decoding one packed with options can cost milliseconds
        log.debug("CoAP %s", trace.undecodable(data, direction, "udp", addr, "not decoded"))
        return
    try:
        line = trace.describe(coap_message.decode(data), direction, "udp", addr)
    except DecodeError as exc:
        line = trace.undecodable(data, direction, "udp", addr, str(exc))
    log.debug("CoAP %s", line)
