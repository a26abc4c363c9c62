"""Refusals in the log: one info line each, once per message, at most `LINES` a minute.

The router and the registrar tell `Refusals` what they refused (a Register, Update or
De-register answered 4.xx or 5.03, a request of a peer that is not registered, a malformed
message); it writes

    refused Register from udp 192.0.2.7:56830: 4.12, unsupported lwm2m version '1.3'

unless the same message (peer and Message ID) was logged less than `INTERVAL` ago (a
retransmission: it gets the same answer) or `LINES` lines were written in this interval
already (then it is left out, and the next line written says how many were). A flood of
refusals therefore writes at most `LINES` lines a minute; the counters are summed up once a
minute by the supervisor anyway (docs/operations.md, "The log").

The reason of a refused registration request is found again only for a line that will be
written (`registration`): the registrar's hot path only compares a code.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dm_actor.coap.numbers import Code, code_str
from dm_actor.coap.trace import LineBudget, peer_str, request_line
from dm_actor.credentials import NEEDS_DTLS
from dm_actor.lwm2m import registration as reg_iface
from dm_actor.lwm2m.registration import RegistrationError

if TYPE_CHECKING:
    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.host import TcpConnection
    from dm_actor.actors.registry import Registry
    from dm_actor.address import Address
    from dm_actor.coap.message import Message

log = logging.getLogger(__name__)

#: refusal lines written at most per `INTERVAL` seconds
LINES = 20
INTERVAL = 60.0
_NAMES = {"register": "Register", "update": "Update", "deregister": "De-register"}


class Refusals:
    """The refusal lines of one server (its budget: `LineBudget`)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.budget = LineBudget(LINES, INTERVAL)

    def refuse(
        self,
        what: str | None,
        request: Message | None,
        addr: Address | None,
        conn: TcpConnection | None,
        answer: int | str,
        why: str,
        *,
        mid: int = -1,
    ) -> None:
        """Log one refusal (see the module): `what` (None: the request's method and path)
        from the peer, the answer (a code, or "Reset", "dropped") and why. `mid`: the
        Message ID when there is no `request` (a datagram that did not decode)."""
        skipped = self._take(request, addr, conn, mid)
        if skipped is not None:
            self._write(what, request, addr, conn, answer, why, skipped)

    def registration(
        self,
        kind: str | None,
        request: Message,
        addr: Address | None,
        conn: TcpConnection | None,
        code: int,
        actor: DeviceActor | None,
    ) -> None:
        """A registration request (or a registered device's request to an unknown path)
        answered `code`; its reason is found again here, only when the line is written."""
        skipped = self._take(request, addr, conn, -1)
        if skipped is None:
            return
        try:
            why = self._why(kind, request, conn, code, actor)
        except Exception as exc:  # (a log line must never fail the request)
            why = f"({type(exc).__name__})"
        what = _NAMES.get(kind) if kind else None
        self._write(what, request, addr, conn, code, why, skipped)

    def _why(
        self,
        kind: str | None,
        request: Message,
        conn: TcpConnection | None,
        code: int,
        actor: DeviceActor | None,
    ) -> str:
        if code == Code.SERVICE_UNAVAILABLE:
            return "the store is behind"
        if code == Code.FORBIDDEN:  # (the identity rules: dm_actor.credentials.admit)
            return NEEDS_DTLS
        r = self.registry.settings.registration
        parsed: object
        if kind == "register":
            parsed = reg_iface.parse_register(
                request, r.default_lifetime, r.max_lifetime, r.max_links
            )
            binding = None if isinstance(parsed, RegistrationError) else parsed.binding
        elif kind == "update":
            parsed = reg_iface.parse_update(request, r.max_lifetime, r.max_links)
            binding = None if isinstance(parsed, RegistrationError) else parsed.binding
        elif kind == "deregister":
            parsed = reg_iface.parse_deregister(request)
            binding = None
        else:
            return "no such resource on the server"
        if isinstance(parsed, RegistrationError):
            return parsed.reason
        if code == Code.BAD_REQUEST and conn is None and binding is not None:
            return f"binding b={binding} over UDP"
        if code == Code.NOT_FOUND and actor is not None:
            return f"{actor.endpoint} is registered as {actor.reg.reg_id}"
        return "refused"

    def _take(
        self, request: Message | None, addr: Address | None, conn: TcpConnection | None, mid: int
    ) -> int | None:
        if not log.isEnabledFor(logging.INFO):
            return None
        if request is not None:
            mid = request.mid
        key = None if conn is not None or addr is None else (addr, mid)  # (TCP: no repeats)
        return self.budget.take(key, self.registry.now())

    def _write(
        self,
        what: str | None,
        request: Message | None,
        addr: Address | None,
        conn: TcpConnection | None,
        answer: int | str,
        why: str,
        skipped: int,
    ) -> None:
        if what is None:
            what = "a message" if request is None else request_line(request)
        peer = f"tcp {peer_str(conn.peer)}" if conn is not None else f"udp {peer_str(addr)}"
        if not isinstance(answer, str):
            answer = code_str(answer)
        more = f" ({skipped} more refusals not logged before this one)" if skipped else ""
        log.info("refused %s from %s: %s, %s%s", what, peer, answer, why, more)
