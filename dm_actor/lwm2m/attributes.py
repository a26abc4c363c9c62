"""LwM2M notification attributes (Write-Attributes): parse and validate a query early.

delivery.md rule 9.4: `PUT /3303/0/5700?pmin=10&pmax=60&gt=30&lt=5&st=1` carries notification
rules; an impossible rule set is rejected before anything is queued. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

_INTEGER = frozenset({"pmin", "pmax", "epmin", "epmax"})
_NUMBER = frozenset({"gt", "lt", "st"})


class InvalidAttributes(ValueError):
    """A notification-attribute query that cannot be written (answered with 400)."""


@dataclass(frozen=True, slots=True)
class Attributes:
    """Parsed attributes; a name present with no value (`pmin`) means "unset it"."""

    values: tuple[tuple[str, float | int | None], ...]
    query: str  # the parts as given, to send on unchanged

    def get(self, name: str) -> float | int | None:
        for key, value in self.values:
            if key == name:
                return value
        return None


def parse_attributes(query: str) -> Attributes:
    """Parse and check `pmin=10&pmax=60&gt=30&lt=5&st=1`.

    Raises:
        InvalidAttributes: unknown name, bad number, pmin > pmax, negative st, or not
            lt + 2*st < gt.
    """
    values: list[tuple[str, float | int | None]] = []
    parts: list[str] = []
    seen: set[str] = set()
    for part in query.split("&"):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = unquote(name)
        if name in seen:
            raise InvalidAttributes(f"attribute {name} given twice")
        seen.add(name)
        parts.append(part)
        if name not in _INTEGER and name not in _NUMBER:
            raise InvalidAttributes(f"unknown notification attribute {name!r}")
        if not sep:
            values.append((name, None))
            continue
        try:
            value: float | int = int(raw) if name in _INTEGER else float(raw)
        except ValueError:
            raise InvalidAttributes(f"{name} must be a number, not {raw!r}") from None
        if name in _INTEGER and value < 0:
            raise InvalidAttributes(f"{name} must not be negative")
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidAttributes(f"{name} must be finite")
        values.append((name, value))
    if not values:
        raise InvalidAttributes("no notification attributes")
    attrs = Attributes(tuple(values), "&".join(parts))
    _check(attrs)
    return attrs


def _check(attrs: Attributes) -> None:
    pmin, pmax = attrs.get("pmin"), attrs.get("pmax")
    if pmin is not None and pmax is not None and pmin > pmax:
        raise InvalidAttributes("pmin must not be greater than pmax")
    epmin, epmax = attrs.get("epmin"), attrs.get("epmax")
    if epmin is not None and epmax is not None and epmin > epmax:
        raise InvalidAttributes("epmin must not be greater than epmax")
    st = attrs.get("st")
    if st is not None and st < 0:
        raise InvalidAttributes("st must not be negative")
    gt, lt = attrs.get("gt"), attrs.get("lt")
    if gt is not None and lt is not None and not lt + 2 * (st or 0) < gt:
        raise InvalidAttributes("lt + 2*st must be less than gt")
