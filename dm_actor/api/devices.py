"""`GET /v3/devices` filters and pages: Pelion's `field__op=value` filters, parsed and matched.

Pure: no I/O, no clock. `parse_filters` reads a request's query (the `field__op` parameters
and the legacy `filter=` parameter, whose value is itself a percent-encoded query, as the SDKs
send it) into `Clause`s, or raises `FilterError` naming the parameter it refuses. `matcher`
turns the clauses into a predicate over one kind of device record, given how each field is
read from it (a field that is the same for every record of the kind, such as `state`, is
decided once: the whole kind matches or none of it does). `paging` and `counting` walk the
sorted ids of several kinds at once, so a page costs O(log n + what is skipped), never a
sort; a walk that reads many records is a generator that yields every `CHUNK` records, so
that the API can let other tasks run in between (`page` and `count` run one at once).

Operators and fields are Pelion's (SDK 2.2.0's table for `Device.list`): `eq`, `neq`, `in`,
`nin` on the text fields; `gte`, `lte`, `in`, `nin` on the timestamps. Anything else is
refused (400), as is a timestamp that is not RFC 3339.
"""

from __future__ import annotations

import heapq
import itertools
import operator
import re
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Generic, Literal, TypeVar
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from sortedcontainers import SortedList

    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.directory import Directory, Gone
    from dm_actor.actors.supervisor import Supervisor

T = TypeVar("T")
R = TypeVar("R")

TEXT_OPS = frozenset(("eq", "neq", "in", "nin"))
TIME_OPS = frozenset(("gte", "lte", "in", "nin"))
#: the id fields take `prefix` too (ours: `endpoint_name__prefix=sensor-`), served from the
#: sorted ids by bisection (`Source.prefix`), never by reading every device
ID_OPS = TEXT_OPS | {"prefix"}
#: the filterable fields and the operators each takes (Pelion's, for the fields we have;
#: `lifecycle_status` is ours: it is always `enabled` here)
FIELDS: dict[str, frozenset[str]] = {
    "id": ID_OPS,
    "endpoint_name": ID_OPS,
    "endpoint_type": TEXT_OPS,
    "state": TEXT_OPS,
    "lifecycle_status": TEXT_OPS,
    "created_at": TIME_OPS,
    "updated_at": TIME_OPS,
}
TIME_FIELDS = frozenset(("created_at", "updated_at"))
#: the list's other parameters (never filters)
PAGE_PARAMS = frozenset(("limit", "order", "after", "include", "filter"))
#: bounds of what one request may ask (the HTTP head limit, 16 KiB, is smaller still)
MAX_CLAUSES = 64
MAX_VALUES = 10_000  # values of one `in` / `nin`
MAX_FILTER_LENGTH = 65_536  # characters of the `filter=` parameter

_ID = operator.attrgetter("endpoint")  # a record's id (both kinds of record have it)

_TIMESTAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})(?:[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+\- ]\d{2}:\d{2})?)?"
)


class FilterError(ValueError):
    """A filter parameter refused: `name` is the parameter, `message` says why."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


@dataclass(frozen=True, slots=True)
class Clause:
    """One condition: `field op value`. A timestamp's value is in microseconds since the
    epoch; `in` and `nin` hold a frozenset of values."""

    field: str
    op: str
    value: str | int | frozenset[str] | frozenset[int]


def parse_timestamp(text: str) -> int:
    """Microseconds since the epoch of an RFC 3339 timestamp (`2025-01-31T12:00:00.000Z`);
    a date alone is its midnight, a time without an offset is UTC (as SDK 2.2.0 sends a
    naive `datetime`), a space before the offset is its `+` (an unencoded `+` in a query).
    Raises ValueError for anything else."""
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        raise ValueError("not an RFC 3339 timestamp")
    day, clock, fraction, offset = m.groups()
    value = datetime.fromisoformat(
        f"{day}T{clock or '00:00:00'}{(fraction or '')[:7]}"
        f"{'+00:00' if offset in (None, 'Z', 'z') else offset.replace(' ', '+')}"
    )
    if value.tzinfo is None:  # (fromisoformat always sees an offset here)
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def shown_us(wall: float) -> int:
    """A device's time as the API shows it (milliseconds, truncated), in microseconds: a
    timestamp compares with what the client read."""
    return round(wall * 1e6) // 1000 * 1000


def _clause(name: str, value: str) -> Clause:
    field, sep, op = name.rpartition("__")
    if not sep:
        field, op = name, "eq"
    ops = FIELDS.get(field)
    if ops is None:
        raise FilterError(name, f"devices cannot be filtered on {field!r}")
    if op not in ops:
        raise FilterError(name, f"{field!r} takes no {op!r}, only {', '.join(sorted(ops))}")
    timed = field in TIME_FIELDS
    try:
        if op in ("in", "nin"):
            parts = value.split(",", MAX_VALUES)
            if len(parts) > MAX_VALUES:
                raise FilterError(name, f"at most {MAX_VALUES} values")
            if timed:
                return Clause(field, op, frozenset(parse_timestamp(p) for p in parts))
            return Clause(field, op, frozenset(parts))
        return Clause(field, op, parse_timestamp(value) if timed else value)
    except ValueError as exc:
        if isinstance(exc, FilterError):
            raise
        raise FilterError(name, f"{exc}: {value[:64]!r}") from None


def parse_filters(query: Mapping[str, str]) -> list[Clause]:
    """The clauses of a list request's query: every `field__op` parameter, a bare filterable
    field name (`state=registered`, as `__eq`), and each pair of the `filter=` parameter
    (`filter=state%3Dregistered%26created_at__gte%3D...`: a query in a query, a pair without
    an operator meaning `eq`). All must hold. Raises `FilterError`."""
    pairs: list[tuple[str, str]] = []
    legacy = query.get("filter")
    if legacy:
        if len(legacy) > MAX_FILTER_LENGTH:
            raise FilterError("filter", f"longer than {MAX_FILTER_LENGTH} characters")
        try:
            pairs += parse_qsl(legacy, keep_blank_values=True, max_num_fields=MAX_CLAUSES)
        except ValueError:  # ("Max number of fields exceeded")
            raise FilterError("filter", f"at most {MAX_CLAUSES} conditions") from None
    pairs += [
        (k, v) for k, v in query.items() if k not in PAGE_PARAMS and ("__" in k or k in FIELDS)
    ]
    if len(pairs) > MAX_CLAUSES:
        raise FilterError("filter", f"at most {MAX_CLAUSES} conditions")
    return [_clause(name, value) for name, value in pairs]


def _test(clause: Clause) -> Callable[[object], bool]:
    """The test of one clause on a field's value (a timestamp: wall-clock seconds)."""
    op, value = clause.op, clause.value
    if clause.field in TIME_FIELDS:  # (`shown_us` inlined: this runs per device)
        if op == "gte":
            return lambda w: round(w * 1e6) // 1000 * 1000 >= value  # type: ignore[operator]
        if op == "lte":
            return lambda w: round(w * 1e6) // 1000 * 1000 <= value  # type: ignore[operator]
        if op == "in":
            return lambda w: round(w * 1e6) // 1000 * 1000 in value  # type: ignore[operator]
        return lambda w: round(w * 1e6) // 1000 * 1000 not in value  # type: ignore[operator]
    if op == "eq":
        return lambda v: v == value
    if op == "neq":
        return lambda v: v != value
    if op == "in":
        return lambda v: v in value  # type: ignore[operator]
    return lambda v: v not in value  # type: ignore[operator]


def matcher(
    clauses: Iterable[Clause],
    getters: Mapping[str, Callable[[T], object]],
    constants: Mapping[str, object],
) -> Callable[[T], bool] | bool:
    """A predicate over records of one kind, or True / False when it is the same for all of
    them. `getters` read a field of a record (a timestamp as wall-clock seconds); `constants`
    are the fields that are the same for every record of the kind."""
    tests: list[tuple[Callable[[T], object], Callable[[object], bool]]] = []
    for clause in clauses:
        if clause.op == "prefix":
            continue  # (the sources' id range: `Source.prefix`)
        test = _test(clause)
        if clause.field in constants:
            if not test(constants[clause.field]):
                return False
            continue
        tests.append((getters[clause.field], test))
    if not tests:
        return True
    if len(tests) == 1:
        [(get, test)] = tests

        def one(record: T) -> bool:
            return test(get(record))

        return one

    def every(record: T) -> bool:
        return all(test(get(record)) for get, test in tests)

    return every


def candidates(clauses: Iterable[Clause], id_fields: Iterable[str]) -> frozenset[str] | None:
    """The only ids that may match, when an `eq` or `in` clause on an id field narrows them
    (None: any id may): a page then looks these up instead of walking every device."""
    fields = frozenset(id_fields)
    found: frozenset[str] | None = None
    for clause in clauses:
        if clause.field in fields and clause.op in ("eq", "in"):
            value = clause.value
            ids = frozenset((value,)) if isinstance(value, str) else value
            assert isinstance(ids, frozenset)  # (an id field is text)
            found = ids if found is None else found & ids  # type: ignore[assignment]
    return found


def id_prefix(clauses: Iterable[Clause]) -> str | Literal[False] | None:
    """The prefix every id must start with (the longest `prefix` clause's value), None when
    no clause says, False when two cannot both hold."""
    prefixes = [str(c.value) for c in clauses if c.op == "prefix"]
    if not prefixes:
        return None
    longest = max(prefixes, key=len)
    return longest if all(longest.startswith(p) for p in prefixes) else False


def _above(prefix: str) -> str | None:
    """The least string above every string that starts with `prefix` (None: no bound)."""
    while prefix and prefix[-1] == "\U0010ffff":
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


@dataclass(frozen=True, slots=True)
class Source(Generic[T]):
    """One kind of device record: its ids in order, how to find a record by id, and which
    of them match (a predicate, or True / False for all of them); with `prefix`, only the
    ids that start with it (a range of the sorted ids: O(log n) to find)."""

    names: SortedList[str]
    lookup: Callable[[str], T | None]
    wanted: Callable[[T], bool] | bool
    prefix: str | None = None

    def ids(self, after: str | None, descending: bool) -> Iterator[str]:
        names, prefix = self.names, self.prefix
        if prefix:
            low, high = prefix, _above(prefix)
            if after is not None and descending:
                high = after if high is None else min(after, high)
            elif after is not None:
                low = max(after, low)
            return iter(names.irange(low, high, inclusive=(low != after, False),
                                     reverse=descending))  # fmt: skip
        if after is None:
            return iter(names.islice(reverse=descending))
        if descending:
            return iter(names.irange(maximum=after, inclusive=(True, False), reverse=True))
        return iter(names.irange(minimum=after, inclusive=(False, True)))

    def covers(self, device_id: str) -> bool:
        """Whether `device_id` is in the source's id range (starts with `prefix`)."""
        return self.prefix is None or device_id.startswith(self.prefix)

    def size(self) -> int:
        """How many ids the range holds (O(log n))."""
        names, prefix = self.names, self.prefix
        if not prefix:
            return len(names)
        high = _above(prefix)
        end = len(names) if high is None else names.bisect_left(high)
        return end - names.bisect_left(prefix)

    def matching(self, ids: Iterable[str]) -> Iterator[T]:
        """The records of `ids` that match (C-level loops but for the predicate)."""
        wanted = self.wanted
        if wanted is False:
            return iter(())
        records = filter(None, map(self.lookup, ids))
        return records if wanted is True else filter(wanted, records)


#: records a scan reads between two yields (1-3 us each: a few ms of the event loop at a time)
CHUNK = 1024
#: what a scan yields between chunks: the caller lets other tasks run, then resumes it
Steps = Generator[None, None, R]


def _chunked(
    source: Source[T], ids: list[str], need: int | None, others: Sequence[Source[T]] = ()
) -> Steps[list[T]]:
    """The matching records of `ids` (a snapshot), at most `need`, a chunk at a time. An id
    no longer of `source` (its device moved since the snapshot) is read from `others`, the
    scan's other sources, whose snapshots (taken at the same moment) do not hold it."""
    found: list[T] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        looked = list(map(source.lookup, chunk))  # (C-level loops but for the predicate)
        wanted = source.wanted
        records = [] if wanted is False else list(filter(None, looked))
        if wanted is not True and wanted is not False:
            records = list(filter(wanted, records))
        if others and None in looked:  # (rare: devices that moved since the snapshot)
            moved = [i for i, r in zip(chunk, looked, strict=True) if r is None]
            place = {device_id: n for n, device_id in enumerate(chunk)}
            records += _moved(moved, others)
            records.sort(key=lambda r: place[_ID(r)])  # (in the snapshot's order)
        found += records
        if need is not None and len(found) >= need:
            return found[:need]
        yield
    return found


def _moved(ids: list[str], others: Sequence[Source[T]]) -> list[T]:
    """The matching records of `ids`, each from the other source that holds it now."""
    found: list[T] = []
    for device_id in ids:
        for other in others:
            if other.covers(device_id) and other.lookup(device_id) is not None:
                found += other.matching((device_id,))
                break
    return found


def _start(
    source: Source[T], after: str | None, descending: bool, need: int
) -> tuple[list[T], list[str] | None]:
    """The first `need` matching records of one source after `after`, read in place while
    that is quick (no yield: nothing changes meanwhile); if there are fewer in its first
    `CHUNK` ids, also a snapshot of the ids left, to be read with yields (`_chunked`)."""
    ids = source.ids(after, descending)
    if source.wanted is True:
        return list(source.matching(itertools.islice(ids, need))), None
    found = list(itertools.islice(source.matching(itertools.islice(ids, CHUNK)), need))
    if len(found) >= need:
        return found, None
    return found, list(ids)  # (the ids not read yet)


def paging(
    sources: list[Source[T]],
    *,
    after: str | None,
    descending: bool,
    limit: int,
    only: frozenset[str] | None = None,
) -> Steps[tuple[list[T], bool]]:
    """Up to `limit` matching records after `after`, in id order, and whether more follow.
    O(log n + limit) when every source matches whole or not at all, or `only` names the
    ids; else the records read until the page is full (every one, if few match), yielding
    every `CHUNK` records. The pages of all sources are merged (ids are of one source).

    Consistent: every source is read, or its ids copied, before the first yield, at one
    moment when each id is of one source. A device that changes source (de-registers,
    registers again) during the scan is listed once: as it was when its chunk was read."""
    live = [s for s in sources if s.wanted is not False]
    need = limit + 1
    found: list[T]
    if only is not None:  # a few ids (<= MAX_VALUES): look each up
        ids = sorted(only, reverse=descending)
        if after is not None:
            ids = [i for i in ids if (i < after if descending else i > after)]
        found = []
        for s in live:
            found += s.matching([i for i in ids if s.covers(i)])
        found = sorted(found, key=_ID, reverse=descending)[:need]
    else:
        starts = [_start(s, after, descending, need) for s in live]  # (before any yield)
        pages = []
        for s, (first, rest) in zip(live, starts, strict=True):
            if rest is not None:
                yield
                others = [o for o in sources if o is not s]
                first += yield from _chunked(s, rest, need - len(first), others)
            pages.append(first)
        found = list(itertools.islice(heapq.merge(*pages, key=_ID, reverse=descending), need))
    return found[:limit], len(found) > limit


def counting(sources: list[Source[T]], only: frozenset[str] | None = None) -> Steps[int]:
    """How many records match in all: the size of a source that matches whole, a look-up of
    each of `only`'s ids, or a read of every record of a source that matches in part (O(n),
    from a snapshot of its ids, yielding every `CHUNK` records). Consistent as `paging`:
    the sizes and the snapshots are all taken before the first yield."""
    total = 0
    scans: list[tuple[Source[T], list[str]]] = []
    for s in sources:
        if s.wanted is False:
            continue
        if only is not None:
            total += sum(1 for _ in s.matching([i for i in only if s.covers(i)]))
        elif s.wanted is True:
            total += s.size()
        else:
            scans.append((s, list(s.ids(None, False))))
    for s, ids in scans:
        others = [o for o in sources if o is not s]
        total += len((yield from _chunked(s, ids, None, others)))
    return total


def run(steps: Steps[R]) -> R:
    """A scan run to its end at once (tests, benchmarks; the API yields between steps)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def page(
    sources: list[Source[T]],
    *,
    after: str | None,
    descending: bool,
    limit: int,
    only: frozenset[str] | None = None,
) -> tuple[list[T], bool]:
    """`paging`, at once."""
    return run(paging(sources, after=after, descending=descending, limit=limit, only=only))


def count(sources: list[Source[T]], only: frozenset[str] | None = None) -> int:
    """`counting`, at once."""
    return run(counting(sources, only))


# -- the directory's two kinds of device: registered (an actor) and gone (a `Gone` record) ----


def registered_source(sup: Supervisor, clauses: list[Clause], offset: float) -> Source[DeviceActor]:
    """The registered devices (state `registered`, lifecycle `enabled`)."""
    prefix = id_prefix(clauses)
    wanted: Callable[[DeviceActor], bool] | bool = prefix is not False and matcher(
        clauses,
        {
            "id": _actor_id,
            "endpoint_name": _actor_id,
            "endpoint_type": lambda a: a.reg.endpoint_type or "",
            "created_at": lambda a: a.reg.registered_at + offset,
            "updated_at": lambda a: a.reg.updated_at + offset,
        },
        {"state": "registered", "lifecycle_status": "enabled"},
    )
    return Source(sup.endpoint_names, sup.by_endpoint.get, wanted, prefix or None)


def gone_source(directory: Directory, clauses: list[Clause], offset: float) -> Source[Gone]:
    """The devices that left and are still listed (state `deregistered`)."""
    prefix = id_prefix(clauses)
    wanted: Callable[[Gone], bool] | bool = prefix is not False and matcher(
        clauses,
        {
            "id": _gone_id,
            "endpoint_name": _gone_id,
            "endpoint_type": lambda g: g.endpoint_type or "",
            "created_at": lambda g: g.created_at + offset,
            "updated_at": lambda g: g.updated_at + offset,
        },
        {"state": "deregistered", "lifecycle_status": "enabled"},
    )
    return Source(directory.names, directory.get, wanted, prefix or None)


def _actor_id(actor: DeviceActor) -> str:
    return actor.endpoint


def _gone_id(gone: Gone) -> str:
    return gone.endpoint
