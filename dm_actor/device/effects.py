"""What the device machine asks its actor to do, in the order it must be done.

The machine decides; the actor (`actors/device.py`) carries out. Each effect is a small
typed value (a `NamedTuple`: as cheap as a tuple, with names). This module owns the types
only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    from dm_actor.address import Address
    from dm_actor.coap.message import Message
    from dm_actor.delivery.outcomes import Outcome
    from dm_actor.delivery.queue import Command


class Send(NamedTuple):
    """Bytes for the device: a datagram to `addr`, or a frame on `conn` when it is set."""

    data: bytes
    addr: Address | None
    conn: object | None


class StoreCommand(NamedTuple):
    """Write the command (with its attempt's Message ID and token, if decided)."""

    command: Command


class ReserveMids(NamedTuple):
    """Write that Message IDs up to (not including) `limit` may be used (after a restart the
    device's new requests start there)."""

    limit: int


class Hold(NamedTuple):
    """Nothing but answers to the device's own messages leaves until every write asked for
    so far is durable; then feed `DeviceMachine.durable`."""


class Finished(NamedTuple):
    """The command ended with `outcome` (its AsyncIDResponse is owed)."""

    command: Command
    outcome: Outcome


class Notified(NamedTuple):
    """A new value of an observed path."""

    uri: str
    outcome: Outcome


class DeviceRequest(NamedTuple):
    """A request from the device (Register, Update, De-register, ...) for the registrar,
    which answers it with `DeviceMachine.respond`."""

    request: Message


class ObserveAgain(NamedTuple):
    """The device's observations are gone: the subscribed paths are to be observed again."""


class Count(NamedTuple):
    """Count one `name` in the server's statistics (a refusal or a broken transfer)."""

    name: str


Effect = (
    Send
    | StoreCommand
    | ReserveMids
    | Hold
    | Finished
    | Notified
    | DeviceRequest
    | ObserveAgain
    | Count
)

HOLD: Final = Hold()
OBSERVE_AGAIN: Final = ObserveAgain()
