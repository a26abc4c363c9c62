"""The simulator's DTLS side: each device's PSK credentials, the credentials CSV, and the
record handling of an established session.

Credentials of a simulated device `NAME` are PSK identity `NAME` (the endpoint name) and key
`HMAC-SHA256(secret, NAME)[:16]`, so a fleet and the server agree from one secret
(`dm-actor simulate --psk-secret S --write-credentials FILE.csv` writes them for
`dm-actor credentials import FILE.csv`), or they are read from such a CSV file.

The CSV file (`docs/operations.md`, "Bulk credentials"): UTF-8, one device a line,
`endpoint,psk_identity,psk_key` with the key in hex; an optional first line naming those
columns; blank lines and lines starting with `#` are skipped.

A device keeps its `DtlsClient` only while it shakes hands; once established it keeps the
client's `Session` alone (the keys, the write sequence, the replay window: a few hundred
bytes), and `open_records` reads the server's datagrams with it.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
from typing import TYPE_CHECKING, NamedTuple

from dm_actor.dtls.errors import DecodeError
from dm_actor.dtls.messages import AlertDescription, AlertLevel
from dm_actor.dtls.record import ContentType, split_records

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from dm_actor.dtls import Session

#: the first line of a credentials CSV file (optional when reading)
CSV_HEADER = ("endpoint", "psk_identity", "psk_key")
#: bytes of a derived key (AES-128)
DERIVED_KEY_LENGTH = 16

_APPLICATION_DATA = ContentType.APPLICATION_DATA.value
_ALERT = ContentType.ALERT.value
_CLOSE_NOTIFY = AlertDescription.CLOSE_NOTIFY.value
_FATAL = AlertLevel.FATAL.value


class CsvError(ValueError):
    """A credentials CSV line that cannot be read (`line` is 1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


class CsvRow(NamedTuple):
    """One line of a credentials CSV file, as text (validated by the reader's user)."""

    line: int
    endpoint: str
    identity: str
    key_hex: str


def derived_key(secret: bytes, endpoint: str) -> bytes:
    """The PSK of simulated device `endpoint`: HMAC-SHA256(secret, endpoint)[:16]."""
    return hmac.new(secret, endpoint.encode(), hashlib.sha256).digest()[:DERIVED_KEY_LENGTH]


def read_csv(lines: Iterable[str]) -> Iterator[CsvRow]:
    """The rows of a credentials CSV file (the header line, blank and `#` lines skipped).

    Raises:
        CsvError: a line without exactly three fields.
    """
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or (len(row) == 1 and not row[0].strip()) or row[0].startswith("#"):
            continue
        fields = [f.strip() for f in row]
        if number == 1 and tuple(fields) == CSV_HEADER:
            continue
        if len(fields) != 3:
            raise CsvError(number, f"{len(fields)} fields, not 3 (endpoint,psk_identity,psk_key)")
        yield CsvRow(number, fields[0], fields[1], fields[2])


def csv_lines(rows: Iterable[tuple[str, str, bytes]]) -> Iterator[str]:
    """A credentials CSV file (header first) from (endpoint, identity, key) triples."""
    yield ",".join(CSV_HEADER) + "\n"
    for endpoint, identity, key in rows:
        for text in (endpoint, identity):
            if any(c in text for c in ',"\r\n'):
                raise ValueError(f"{text!r}: a comma, quote or line break in a CSV field")
        yield f"{endpoint},{identity},{key.hex()}\n"


def open_records(session: Session, datagram: bytes) -> tuple[list[bytes], bool, int]:
    """Read a datagram from the server on an established session.

    Returns:
        The application data of its records, whether the server ended the session
        (close_notify or a fatal alert), and how many records were dropped (malformed,
        replayed, failing their tag, or left over from the handshake).
    """
    records, bad = split_records(datagram, len(session.cid))
    dropped = int(bad)
    data: list[bytes] = []
    for record in records:
        try:
            ctype, plaintext = session.open(record)
        except DecodeError:
            dropped += 1
            continue
        if ctype == _APPLICATION_DATA:
            data.append(plaintext)
        elif (
            ctype == _ALERT
            and len(plaintext) >= 2
            and (plaintext[1] == _CLOSE_NOTIFY or plaintext[0] == _FATAL)
        ):
            session.closed = True
            return data, True, dropped
    return data, False, dropped
