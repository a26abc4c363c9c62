"""CORS (the Fetch standard's CORS protocol): which browser origins may call the API.

A browser page on another origin (a dashboard) may call the API only when the answers say
that its origin is allowed. The allowed origins are configured (`[api] cors_origins`,
`--cors-origin`), none by default. A preflight (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`) needs no key: an allowed origin gets 204 with the
`Access-Control-Allow-*` headers, any other origin 403 with none. Every other answer to a
request from an allowed origin carries `Access-Control-Allow-Origin: <the origin>` and
`Vary: Origin`; a request from another origin gets no CORS header (the browser then hides the
answer from the page). Origins match exactly, as browsers serialize them (RFC 6454 6.2:
lowercase scheme and host, no default port, no path): `null`, a path, another case never
match. Nothing here touches a socket.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dm_actor.config import ORIGIN_PATTERN

if TYPE_CHECKING:
    from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]
Response = tuple[int, Headers, bytes]

ALLOW_METHODS = b"GET, PUT, POST, DELETE"
ALLOW_HEADERS = b"Authorization, Content-Type"
#: seconds a browser may cache a preflight's answer (Chrome caps it at 7200, Firefox 86400)
MAX_AGE = b"600"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN = re.compile(ORIGIN_PATTERN)
_VARY = (b"vary", b"Origin")
FORBIDDEN = (403, [(b"content-type", b"text/plain; charset=utf-8")], b"Origin not allowed.")


def normalize_origin(value: str) -> str:
    """The origin `value` (`scheme://host[:port]`) as a browser sends it in `Origin`:
    lowercase, without a default port or a final `/`.

    Raises:
        ValueError: `value` is not an http or https origin (`null`, `*`, a path, a query,
            user information, no host, a port over 65535).
    """
    if _ORIGIN.search(value) is None:
        raise ValueError(f"not an origin: {value!r} (scheme://host[:port], http or https)")
    origin = value.lower().removesuffix("/")
    scheme, _, authority = origin.partition("://")
    host, colon, port = authority.rpartition(":")
    if not colon or not port.isdigit():  # no port (an IPv6 address without a port too)
        return origin
    return f"{scheme}://{host}" if int(port) == _DEFAULT_PORTS[scheme] else origin


class Cors:
    """The allowed origins, and the headers and preflight answers they get.

    Raises:
        ValueError: a configured origin is not an origin (`normalize_origin`).
    """

    __slots__ = ("_allowed",)

    def __init__(self, origins: Iterable[str] = ()) -> None:
        self._allowed = frozenset(normalize_origin(o).encode() for o in origins)

    def __bool__(self) -> bool:
        return bool(self._allowed)

    def allowed(self, origin: bytes | None) -> bool:
        return origin is not None and origin in self._allowed

    def headers(self, origin: bytes | None) -> Headers:
        """The headers of an answer to a request sent with `origin` (none when the origin
        is not allowed)."""
        if origin is None or origin not in self._allowed:
            return []
        return [(b"access-control-allow-origin", origin), _VARY]

    def preflight(self, origin: bytes) -> Response:
        """The answer to a preflight from `origin`: 204 with the CORS headers, or 403."""
        if origin not in self._allowed:
            return FORBIDDEN
        return (
            204,
            [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", ALLOW_METHODS),
                (b"access-control-allow-headers", ALLOW_HEADERS),
                (b"access-control-max-age", MAX_AGE),
                _VARY,
            ],
            b"",
        )
