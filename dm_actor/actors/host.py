"""What a device actor needs of the server around it, and nothing more.

`DeviceActor` is handed a `DeviceHost` (the supervisor implements it) instead of its owner:
the store, the two ways to send, and the few things only the server can do — publish what a
command or an observation produced, answer a device's registration request, queue the
Observes of a device whose observations are gone, forget a device that ended, contain a
failure, and route mail that turned out not to be the actor's. This module sits below
`device.py` and never imports it (the actor's type is the protocol's parameter): the actor
package has no import circle, type-only imports included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dm_actor.address import Address
    from dm_actor.coap.message import Message
    from dm_actor.delivery.outcomes import Outcome
    from dm_actor.delivery.queue import Command
    from dm_actor.store.base import Store

A_contra = TypeVar("A_contra", contravariant=True)


class TcpConnection(Protocol):
    """What the actors need of a CoAP-over-TCP connection (the transport provides it)."""

    @property
    def peer(self) -> Address: ...

    def send_frame_nowait(self, frame: bytes) -> None: ...


class DeviceHost(Protocol[A_contra]):
    """The server as one device actor (`A_contra`) sees it."""

    @property
    def store(self) -> Store: ...

    @property
    def statistics(self) -> dict[str, int]: ...

    def send_datagram(self, data: bytes, addr: Address) -> None: ...

    def send_frame(self, conn: TcpConnection, frame: bytes) -> None: ...

    def persist_command(self, endpoint: str, cmd: Command) -> None: ...

    def command_finished(self, actor: A_contra, cmd: Command, outcome: Outcome) -> None: ...

    def notification(self, actor: A_contra, uri: str, outcome: Outcome) -> None: ...

    def device_request(self, actor: A_contra, request: Message, now: float) -> None: ...

    def observe_again(self, actor: A_contra, now: float) -> None: ...

    def device_ended(self, actor: A_contra, *, expired: bool) -> None: ...

    def contain(self, actor: A_contra | None, exc: Exception, where: str) -> None: ...

    def on_datagram(self, data: bytes, addr: Address) -> None: ...

    def on_tcp_message(
        self, conn: TcpConnection, msg: Message
    ) -> Callable[[], Awaitable[object]] | None: ...
