"""Administrator keys: configured three ways, never an application's, 403 on channel routes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from dm_actor.api.auth import ApiKeys, admin_id, application_id, is_admin, load_api_keys
from dm_actor.cli import build_parser, settings_from_args
from dm_actor.config import parse_settings

from .client import KEY_A, KEY_B, start_api
from .test_websocket import UPGRADE

if TYPE_CHECKING:
    from pathlib import Path

    import pytest
    import trio.testing

ADMIN = "adm_test_secret_0123456789"
KEYS = ApiKeys([KEY_A, KEY_B], admin_keys=[ADMIN])


def test_admin_keys_from_settings_flag_and_environment(tmp_path: Path) -> None:
    env = {"DM_ACTOR_ADMIN_KEY": "adm_env_1, adm_env_2"}
    keys = load_api_keys(tmp_path, ["ak_app"], env, ["adm_conf"])
    for key in ("adm_conf", "adm_env_1", "adm_env_2"):
        owner = keys.owner(key)
        assert owner is not None and owner == admin_id(key) and is_admin(owner)
    app = keys.owner("ak_app")
    assert app == application_id("ak_app") and not is_admin(app)
    assert not is_admin(application_id(ADMIN))  # an application id never looks like one
    # an admin key alone does not stop the application key from being generated
    keys = load_api_keys(tmp_path / "d", [], {}, ["adm_conf"])
    assert keys.generated is not None and keys.owner("adm_conf") == admin_id("adm_conf")
    # a key given both ways is an administrator's only
    both = ApiKeys(["k1"], admin_keys=["k1"])
    assert both.owner("k1") == admin_id("k1")
    assert both.from_authorization(b"Bearer k1") == admin_id("k1")
    assert both.from_subprotocols(["pelion_k1"]) == admin_id("k1")


def test_flag_and_setting_combine() -> None:
    args = build_parser().parse_args(["serve", "--admin-key", "a1", "--admin-key", "a2"])
    assert settings_from_args(args).api.admin_keys == ["a1", "a2"]
    assert parse_settings('[api]\nadmin_keys = ["x"]\n').api.admin_keys == ["x"]
    assert parse_settings("").api.admin_keys == []


async def test_admin_key_reads_the_directory_but_owns_no_channel(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dm_actor")
    api = await start_api(nursery, keys=KEYS)
    async with api.client(ADMIN) as admin, api.client(KEY_A) as app:
        assert (await admin.request("GET", "/v3/devices")).status == 200
        assert (await admin.request("GET", "/v2/device-requests/nobody")).status == 404
        refused = [
            ("PUT", "/v2/notification/websocket"),
            ("GET", "/v2/notification/websocket"),
            ("PUT", "/v2/notification/callback"),
            ("DELETE", "/v2/notification/pull"),
            ("GET", "/v2/notification/channel"),
            ("PUT", "/v2/subscriptions"),
            ("GET", "/v2/subscriptions/dev/3/0/0"),
            ("POST", "/v2/device-requests/dev?async-id=1"),
            ("GET", "/v2/notification/pull"),  # the long poll, served outside dispatch
        ]
        for method, path in refused:
            reply = await admin.request(method, path, json={} if method != "GET" else None)
            assert reply.status == 403, (method, path)
            assert reply.json()["object"] == "error"
            assert reply.json()["type"] == "forbidden"
        # the WebSocket, by header or by subprotocol
        path = "/v2/notification/websocket-connect"
        reply = await admin.request("GET", path, headers=UPGRADE)
        assert reply.status == 403
        protocols = [("sec-websocket-protocol", f"wss, pelion_{ADMIN}")]
        reply = await admin.request("GET", path, headers=UPGRADE + protocols, key=None)
        assert reply.status == 403
        # an application is unaffected
        assert (await app.request("PUT", "/v2/notification/websocket")).status == 201
        assert (await app.request("GET", "/v3/devices")).status == 200
    assert ADMIN not in caplog.text


async def test_application_key_on_an_admin_route_gets_403(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    async with api.client(KEY_A) as app:
        for method in ("GET", "PUT", "DELETE"):
            reply = await app.request(method, "/v3/device-credentials/dev-1")
            assert reply.status == 403
            body = reply.json()
            assert (body["object"], body["code"], body["type"]) == ("error", 403, "forbidden")
        assert (await app.request("GET", "/v3/device-credentials/dev-1", key=None)).status == 401
