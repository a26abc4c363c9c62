"""The Device Directory's memory of devices that are gone: de-registered or expired.

Pelion keeps a device's directory entry after it de-registers, with `state: deregistered`.
So does dm_actor, for a bounded time and number (`[registration] directory_retention` seconds,
`directory_max` entries): a compact record per device (`Gone`: its last registration's
fields, no links, no queue, no actor), in the order the devices left. The oldest go first
when either bound is passed; expiry by time is lazy (checked whenever an entry is added and
whenever the directory is read), so no task runs for it. A device that registers again
leaves it (`revive`): its id (the endpoint name) is the same, and the live device replaces
the entry. It is kept in memory only: a restart forgets it (docs/operations.md, "What
survives a restart").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

if TYPE_CHECKING:
    from dm_actor.lwm2m.registration import Registration


class Gone:
    """What the directory still says of a device that left (times are Trio times)."""

    __slots__ = (
        "binding",
        "created_at",
        "endpoint",
        "endpoint_type",
        "lifetime",
        "lwm2m_version",
        "queue_mode",
        "updated_at",
    )

    def __init__(self, reg: Registration, now: float) -> None:
        self.endpoint = reg.endpoint
        self.endpoint_type = reg.endpoint_type
        self.created_at = reg.registered_at
        self.updated_at = now  # when it left: the state changed then
        self.lwm2m_version = reg.lwm2m_version
        self.binding = reg.binding
        self.queue_mode = reg.queue_mode
        self.lifetime = reg.lifetime


class Directory:
    """The de-registered devices still listed, oldest departure first.

    Args:
        retention: seconds an entry is kept (0: none is kept).
        max_entries: entries kept at most (0: none is kept); beyond, the oldest goes.
    """

    def __init__(self, retention: float, max_entries: int) -> None:
        self.retention = retention
        self.max_entries = max_entries
        self.gone: OrderedDict[str, tuple[float, Gone]] = OrderedDict()  # id -> (until, entry)
        self.names: SortedList[str] = SortedList()  # the same ids, sorted (for pages)

    def __len__(self) -> int:
        return len(self.gone)

    def get(self, device_id: str) -> Gone | None:
        kept = self.gone.get(device_id)
        return None if kept is None else kept[1]

    def retain(self, reg: Registration, now: float) -> None:
        """`reg`'s device left at `now` (De-register, expiry, or its registration ended)."""
        self.revive(reg.endpoint)
        if self.retention > 0 and self.max_entries > 0:
            self.gone[reg.endpoint] = (now + self.retention, Gone(reg, now))
            self.names.add(reg.endpoint)
        self.purge(now)

    def revive(self, device_id: str) -> None:
        """The device registers again: the live device replaces its entry."""
        if self.gone.pop(device_id, None) is not None:
            self.names.remove(device_id)

    def purge(self, now: float) -> None:
        """Forget the entries past their time, and the oldest beyond `max_entries`."""
        gone, names = self.gone, self.names
        while gone:
            device_id, (until, _) = next(iter(gone.items()))
            if until > now and len(gone) <= self.max_entries:
                break
            gone.popitem(last=False)
            names.remove(device_id)
