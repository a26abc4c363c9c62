"""CORS (issue 14 item 7): browser pages of the configured origins may call the API.

A real HTTP client over loopback against the real server, in virtual time. What a browser
checks: a preflight's `Access-Control-Allow-*` answer, then `Access-Control-Allow-Origin`
equal to its own origin on the answer itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from dm_actor.api.auth import ApiKeys
from dm_actor.api.cors import Cors, normalize_origin
from dm_actor.api.server import HttpOptions, HttpServer
from dm_actor.cli import build_parser, settings_from_args
from dm_actor.config import ConfigError, load_settings
from tests.actors.support import start_server

from .client import KEY_A, KEYS, HttpClient, start_api

if TYPE_CHECKING:
    from pathlib import Path

    import trio.testing

DASHBOARD = "https://dash.example.com"
OPTIONS = HttpOptions(cors_origins=("HTTPS://Dash.Example.com:443/", "http://127.0.0.1:3000"))
CORS_NAMES = {
    b"access-control-allow-origin",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-max-age",
    b"access-control-allow-credentials",
    b"access-control-expose-headers",
}


def preflight(origin: str, method: str = "PUT") -> list[tuple[str, str]]:
    return [
        ("origin", origin),
        ("access-control-request-method", method),
        ("access-control-request-headers", "authorization,content-type"),
    ]


def cors_headers(headers: dict[bytes, bytes]) -> set[bytes]:
    return CORS_NAMES & set(headers)


async def test_a_preflight_from_an_allowed_origin_needs_no_key(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=OPTIONS)
    async with api.client(None) as client:
        for origin in (DASHBOARD, "http://127.0.0.1:3000"):
            for method in ("GET", "PUT", "POST", "DELETE"):
                reply = await client.request(
                    "OPTIONS", "/v2/notification/websocket", headers=preflight(origin, method)
                )
                assert (reply.status, reply.body) == (204, b"")
                h = reply.headers
                assert h[b"access-control-allow-origin"] == origin.encode()
                assert h[b"access-control-allow-methods"] == b"GET, PUT, POST, DELETE"
                assert h[b"access-control-allow-headers"] == b"Authorization, Content-Type"
                assert h[b"access-control-max-age"] == b"600"
                assert h[b"vary"] == b"Origin"
                assert b"access-control-allow-credentials" not in h  # keys, not cookies
        # browsers reuse the connection: allowed preflights never use up its anonymous quota
        assert client.connections == 1


async def test_answers_to_an_allowed_origin_carry_its_origin(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=OPTIONS)
    origin = [("origin", DASHBOARD)]
    async with api.client() as client:
        for method, target, status in [
            ("GET", "/v3/devices", 200),
            ("PUT", "/v2/notification/websocket", 201),
            ("GET", "/v2/endpoints/ghost", 404),  # an error the page must be able to read
            ("GET", "/v2/nowhere", 404),
            ("DELETE", "/v3/devices", 405),
        ]:
            reply = await client.request(method, target, headers=origin)
            assert reply.status == status, (method, target)
            assert reply.headers[b"access-control-allow-origin"] == DASHBOARD.encode()
            assert reply.headers[b"vary"] == b"Origin"
            assert cors_headers(reply.headers) == {b"access-control-allow-origin"}
        # a 401 too, so that the page sees "401", not a CORS failure
        reply = await client.request("GET", "/v3/devices", headers=origin, key=None)
        assert reply.status == 401
        assert reply.headers[b"access-control-allow-origin"] == DASHBOARD.encode()
        # the long poll's 204 and 200
        reply = await client.request("GET", "/v2/notification/websocket", headers=origin)
        assert reply.headers[b"access-control-allow-origin"] == DASHBOARD.encode()
        await client.request("DELETE", "/v2/notification/websocket")
        reply = await client.request("GET", "/v2/notification/pull", headers=origin)
        assert reply.status == 204
        assert reply.headers[b"access-control-allow-origin"] == DASHBOARD.encode()
        # the next request on the same connection, without Origin: no CORS header
        reply = await client.request("GET", "/v3/devices")
        assert cors_headers(reply.headers) == set()
        assert b"vary" not in reply.headers


HOSTILE = [
    "null",  # sandboxed iframes, file: pages, redirects
    "https://dash.example.com.evil.example",  # a suffix
    "https://evil.example/https://dash.example.com",
    "https://dash.example.com/",  # with a path: no browser sends it
    "https://dash.example.com/app",
    "https://DASH.example.com",  # browsers serialize lowercase: nobody sends this
    "https://dash.example.com:443",  # nor the default port
    "http://dash.example.com",  # another scheme: another origin
    "https://dash.example.com:8443",
    "*",
    "",
    "https://" + "a" * 10_000 + ".example",  # very long
    "https://dash.example.com, https://evil.example",
]


@pytest.mark.parametrize("origin", HOSTILE)
async def test_other_origins_get_no_cors_header(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, origin: str
) -> None:
    api = await start_api(nursery, options=OPTIONS)
    async with api.client() as client:
        reply = await client.request("OPTIONS", "/v3/devices", headers=preflight(origin), key=None)
        assert (reply.status, reply.text) == (403, "Origin not allowed.")
        assert cors_headers(reply.headers) == set()
        reply = await client.request("GET", "/v3/devices", headers=[("origin", origin)])
        assert reply.status == 200  # served (CORS binds browsers, not the server) ...
        assert cors_headers(reply.headers) == set()  # ... but a browser hides it from the page


async def test_two_origin_headers_match_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, options=OPTIONS)
    twice = [("origin", DASHBOARD), ("origin", DASHBOARD)]
    async with api.client() as client:
        reply = await client.request(
            "OPTIONS", "/v3/devices", headers=[*twice, *preflight("x")[1:]]
        )
        assert reply.status == 403
        reply = await client.request("GET", "/v3/devices", headers=twice)
        assert cors_headers(reply.headers) == set()


async def test_without_cors_origins_every_preflight_is_refused_and_nothing_changes(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery)  # the default: no origin allowed
    async with api.client() as client:
        reply = await client.request("OPTIONS", "/v3/devices", headers=preflight(DASHBOARD))
        assert (reply.status, cors_headers(reply.headers)) == (403, set())
        reply = await client.request("GET", "/v3/devices", headers=[("origin", DASHBOARD)])
        assert (reply.status, cors_headers(reply.headers)) == (200, set())
        # an OPTIONS that is no preflight (no Access-Control-Request-Method) is a request
        reply = await client.request("OPTIONS", "/v3/devices", headers=[("origin", DASHBOARD)])
        assert reply.status == 405
        reply = await client.request(
            "OPTIONS", "/v3/devices", headers=[("origin", DASHBOARD)], key=None
        )
        assert reply.status == 401


async def test_refused_preflights_are_counted_and_bounded_per_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Like requests without a key: counted, logged in the refusals' summary line, and a
    connection gets 10 answers, the 10th with Connection: close."""
    server = await start_server(nursery)
    http = HttpServer(server.sup, KEYS, OPTIONS)
    addr = await nursery.start(http.run, "127.0.0.1", 0)
    async with HttpClient(addr, None) as client:
        closes = []
        for _ in range(12):
            reply = await client.request("OPTIONS", "/v3/devices", headers=preflight("null"))
            assert reply.status == 403
            closes.append(reply.headers.get(b"connection"))
        assert closes[9] == b"close" and closes[:9] == [None] * 9
        assert client.connections == 2
    assert http.statistics().cors_refused == 12


def test_configured_origins_are_checked_and_normalized(tmp_path: Path) -> None:
    assert normalize_origin("HTTPS://Dash.Example.com:443/") == DASHBOARD
    assert normalize_origin("http://[::1]:8080") == "http://[::1]:8080"
    assert normalize_origin("http://localhost:80") == "http://localhost"
    not_origins = ["null", "*", "https://a.example/app", "ftp://a.example", "https://u@a.example"]
    not_origins += ["https://a.example?x", "https://a.example:65536", "a.example", "https://"]
    for value in not_origins:
        with pytest.raises(ValueError, match="not an origin"):
            normalize_origin(value)
        with pytest.raises(ValueError, match="not an origin"):
            Cors([value])
    good = tmp_path / "good.toml"
    good.write_text('[api]\ncors_origins = ["https://dash.example.com", "http://127.0.0.1:3000"]\n')
    assert load_settings(good).api.cors_origins == [DASHBOARD, "http://127.0.0.1:3000"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[api]\ncors_origins = ["https://dash.example.com/app"]\n')
    with pytest.raises(ConfigError, match="cors_origins"):
        load_settings(bad)
    assert load_settings().api.cors_origins == []  # none by default
    # --cors-origin is repeatable and adds to the file's
    flags = ["--cors-origin", "https://b.example", "--cors-origin", "https://c.example:8443"]
    args = build_parser().parse_args(["serve", "--config", str(good), *flags])
    from_file = [DASHBOARD, "http://127.0.0.1:3000"]
    assert settings_from_args(args).api.cors_origins == [*from_file, *flags[1::2]]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cors-origin", "null"])
    assert HttpOptions.from_settings(load_settings(good).api).cors_origins == (
        DASHBOARD, "http://127.0.0.1:3000")  # fmt: skip


async def test_a_key_in_an_allowed_origin_s_preflight_changes_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A preflight is answered as such whatever it carries (browsers send no key with it)."""
    api = await start_api(nursery, options=OPTIONS, keys=ApiKeys([KEY_A]))
    async with api.client() as client:
        reply = await client.request(
            "OPTIONS", "/v2/device-requests/x", headers=preflight(DASHBOARD)
        )
        assert reply.status == 204
