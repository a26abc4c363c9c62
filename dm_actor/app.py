"""The composition root: builds every service from `Settings` and runs them in one nursery.

For now the server speaks CoAP on UDP and TCP and answers every request with 4.04 Not Found
(`not_found`, the one request handler, to be replaced by the LwM2M registrar and the device
actors). Malformed datagrams get the answer RFC 7252 requires (`message.reply_for`). This is
the only module that wires transports to handlers; it holds no global state.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from dm_actor.coap import message
from dm_actor.coap.errors import DecodeError, Reply
from dm_actor.coap.message import Message
from dm_actor.coap.numbers import Code, MessageType, OptionNumber, code_str, is_request
from dm_actor.transport.tcp import TcpListener
from dm_actor.transport.udp import UdpEndpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from dm_actor.config import Settings
    from dm_actor.transport.tcp import TcpConnection
    from dm_actor.transport.udp import Address

log = logging.getLogger(__name__)

_CON = MessageType.CON.value
_NON = MessageType.NON.value
_ACK = MessageType.ACK.value
_URI_PATH = OptionNumber.URI_PATH.value


@dataclass(frozen=True, slots=True)
class Listening:
    """Where `serve` listens (the ports are the real ones when the settings asked for 0)."""

    coap_udp: Address
    coap_tcp: Address


def not_found(request: Message) -> Message:
    """Answer any request with 4.04 Not Found.

    A request handler returns the response's code, options and payload; the transport that
    sends it sets the type, Message ID and token.
    """
    return Message(_ACK, Code.NOT_FOUND)


class CoapResponder:
    """Feeds incoming CoAP messages from both transports to a request handler.

    Over UDP a confirmable request is answered piggybacked on the ACK, a non-confirmable
    one with a NON response; a confirmable empty message (a CoAP ping) or an unexpected
    confirmable response gets a Reset; anything else is ignored. Over TCP a request is
    answered with a response carrying its token. A `DecodeError` from decoding, from
    `check_options` or from the handler (an option it reads is malformed) is answered as
    its `reply` says.

    Args:
        handler: builds the response to a request.
        rng: picks the first Message ID of NON responses.
    """

    __slots__ = ("_handler", "_next_mid", "udp")

    def __init__(self, handler: Callable[[Message], Message], rng: random.Random) -> None:
        self._handler = handler
        self._next_mid = rng.randrange(0x10000)
        self.udp: UdpEndpoint | None = None

    def on_datagram(self, data: bytes, addr: Address) -> None:
        """Decode one datagram and answer it through `self.udp`."""
        udp = self.udp
        assert udp is not None, "on_datagram before the UDP endpoint exists"
        try:
            msg = message.decode(data)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s mid=%d %s from %s",
                    MessageType(msg.mtype).name,
                    msg.mid,
                    _describe(msg),
                    addr,
                )
            mtype = msg.mtype
            if not is_request(msg.code):
                if mtype == _CON:  # a CoAP ping, or a confirmable response we never asked for
                    udp.send(message.reset_for(msg.mid), addr)
                return
            if mtype != _CON and mtype != _NON:
                return
            message.check_options(msg)
            response = self._handler(msg)
        except DecodeError as exc:
            log.debug("bad datagram from %s: %s (%s)", addr, exc, exc.reply.value)
            reply = message.reply_for(exc)
            if reply is not None:
                udp.send(reply, addr)
            return
        if mtype == _CON:
            response = response._replace(mtype=_ACK, mid=msg.mid, token=msg.token)
        else:
            mid = self._next_mid
            self._next_mid = (mid + 1) & 0xFFFF
            response = response._replace(mtype=_NON, mid=mid, token=msg.token)
        udp.send(message.encode(response), addr)

    def on_unreachable(self, addr: Address) -> None:
        log.debug("ICMP: %s unreachable", addr)

    def on_message(self, conn: TcpConnection, msg: Message) -> None:
        """Answer one CoAP-over-TCP message on its connection."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s from %s over TCP", _describe(msg), conn.peer)
        if not is_request(msg.code):
            return
        try:
            message.check_options(msg)
            response = self._handler(msg)._replace(mtype=0, mid=0, token=msg.token)
        except DecodeError as exc:
            log.debug("bad request from %s over TCP: %s", conn.peer, exc)
            bad = Code.BAD_REQUEST if exc.reply is Reply.BAD_REQUEST else Code.BAD_OPTION
            response = Message(0, bad, 0, msg.token)
        try:
            conn.send_nowait(response)
        except trio.WouldBlock:
            conn.abort("send queue full")

    def on_closed(self, conn: TcpConnection) -> None:
        log.debug("TCP connection from %s ended", conn.peer)


def _describe(msg: Message) -> str:
    path = "/".join(v.decode(errors="replace") for n, v in msg.options if n == _URI_PATH)
    return f"{code_str(msg.code)} /{path} token={msg.token.hex()} ({len(msg.payload)} bytes)"


async def serve(
    settings: Settings,
    *,
    task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled.

    Start it with `listening = await nursery.start(serve, settings)` (or `trio.run`).
    """
    host, port = settings.server.host, settings.server.coap_port
    responder = CoapResponder(not_found, random.Random())
    udp = UdpEndpoint(host, port, responder.on_datagram, responder.on_unreachable)
    responder.udp = udp
    tcp = TcpListener(host, port, responder.on_message, responder.on_closed)
    async with trio.open_nursery() as nursery:
        udp_addr = await nursery.start(udp.run)
        tcp_addr = await nursery.start(tcp.run)
        log.info("CoAP listening on udp://%s:%d and tcp://%s:%d", *udp_addr[:2], *tcp_addr[:2])
        task_status.started(Listening(udp_addr, tcp_addr))
