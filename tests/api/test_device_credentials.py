"""`/v3/device-credentials`: administrator keys only, the key write-only, identities unique,
typed 400s, durable before the answer, and the registrations a change ends."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
import trio.testing

from dm_actor.api.auth import ApiKeys
from dm_actor.coap.numbers import Code
from dm_actor.credentials import Credential
from dm_actor.store.sqlite import SqliteStore
from tests.actors.support import TcpDevice

from .client import KEY_A, start_api
from .test_flow import online, pull

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

ADMIN = "adm_test_credentials_0123456789"
KEYS = ApiKeys([KEY_A], admin_keys=[ADMIN])
HEX = "00112233445566778899aabbccddeeff"
PATH = "/v3/device-credentials"


async def test_put_get_list_delete_and_the_key_is_never_shown(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dm_actor")
    api = await start_api(nursery, keys=KEYS)
    async with api.client(ADMIN) as admin, api.client(KEY_A) as app:
        body = {"psk_identity": "id-1", "psk_key": HEX}
        reply = await admin.request("PUT", f"{PATH}/dev-1", json=body)
        assert reply.status == 201, reply.body
        view = reply.json()
        assert view["object"] == "device-credential"
        assert (view["endpoint_name"], view["psk_identity"]) == ("dev-1", "id-1")
        assert view["created_at"].endswith("Z")
        assert (await admin.request("PUT", f"{PATH}/dev-1", json=body)).status == 200
        replies = [
            await admin.request("GET", f"{PATH}/dev-1"),
            await admin.request("GET", PATH),
            await admin.request("GET", f"{PATH}/"),
        ]
        assert [r.status for r in replies] == [200, 200, 200]
        assert replies[0].json() == view
        listed = replies[1].json()
        assert listed["object"] == "list" and listed["total_count"] == 1
        assert listed["data"] == [view]
        for r in replies:
            assert HEX not in r.text and HEX.upper() not in r.text
        # the index the DTLS layer reads
        assert api.sup.credentials.psk(b"id-1") == bytes.fromhex(HEX)
        # an application key: 403 whatever the method, nothing changed
        for method in ("GET", "PUT", "DELETE"):
            reply = await app.request(method, f"{PATH}/dev-1", json=body)
            assert reply.status == 403 and reply.json()["type"] == "forbidden"
        assert (await admin.request("DELETE", f"{PATH}/dev-1")).status == 204
        assert (await admin.request("DELETE", f"{PATH}/dev-1")).status == 404
        assert (await admin.request("GET", f"{PATH}/dev-1")).status == 404
        assert api.sup.credentials.psk(b"id-1") is None
        assert (await admin.request("POST", f"{PATH}/dev-1", json=body)).status == 405
    assert HEX not in caplog.text.lower()


async def test_an_identity_belongs_to_one_endpoint_409(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    async with api.client(ADMIN) as admin:
        body = {"psk_identity": "shared", "psk_key": HEX}
        assert (await admin.request("PUT", f"{PATH}/dev-1", json=body)).status == 201
        reply = await admin.request("PUT", f"{PATH}/dev-2", json=body)
        assert reply.status == 409
        assert reply.json()["type"] == "conflict" and "dev-1" in reply.json()["message"]
        assert (await admin.request("GET", f"{PATH}/dev-2")).status == 404
        # dev-1 takes a new identity: the old one is free for dev-2
        body2 = {"psk_identity": "other", "psk_key": HEX}
        assert (await admin.request("PUT", f"{PATH}/dev-1", json=body2)).status == 200
        assert (await admin.request("PUT", f"{PATH}/dev-2", json=body)).status == 201


async def test_typed_400s(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    api = await start_api(nursery, keys=KEYS)
    cases: list[tuple[object, str | None]] = [
        ({"psk_identity": "", "psk_key": HEX}, "psk_identity"),
        ({"psk_identity": "x" * 129, "psk_key": HEX}, "psk_identity"),
        ({"psk_identity": 7, "psk_key": HEX}, "psk_identity"),
        ({"psk_key": HEX}, "psk_identity"),
        ({"psk_identity": "id", "psk_key": HEX[:-2]}, "psk_key"),  # 15 bytes
        ({"psk_identity": "id", "psk_key": "ab" * 65}, "psk_key"),
        ({"psk_identity": "id", "psk_key": "xyz"}, "psk_key"),
        ({"psk_identity": "id"}, "psk_key"),
        ({"psk_identity": "id", "psk_key": HEX, "extra": 1}, None),  # unknown field
        ([1, 2], None),
    ]
    async with api.client(ADMIN) as admin:
        for body, field in cases:
            reply = await admin.request("PUT", f"{PATH}/dev-1", json=body)
            assert reply.status == 400, body
            error = reply.json()
            assert (error["object"], error["code"], error["type"]) == (
                "error", 400, "validation_error",
            )  # fmt: skip
            if field is not None:
                assert [f["name"] for f in error["fields"]] == [field], body
            assert "ab" * 65 not in reply.text
        reply = await admin.request("PUT", f"{PATH}/dev-1", body=b"{not json")
        assert reply.status == 400
        headers = [("content-type", "text/plain")]
        reply = await admin.request("PUT", f"{PATH}/dev-1", body=b"{}", headers=headers)
        assert reply.status == 415
        assert (await admin.request("GET", f"{PATH}?limit=1")).status == 400
        assert (await admin.request("GET", f"{PATH}/a/b")).status == 404
    assert len(api.sup.credentials) == 0


async def test_adding_credentials_ends_a_plain_coap_registration_which_cannot_come_back(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dm_actor")
    api = await start_api(nursery, keys=KEYS)
    dev = await online(api, nursery, ep="dev-1")
    other = await online(api, nursery, ep="dev-2")
    async with api.client(KEY_A) as app:
        assert (await app.request("GET", "/v2/notification/pull")).status == 204  # a channel
        async with api.client(ADMIN) as admin:
            body = {"psk_identity": "id-1", "psk_key": HEX}
            assert (await admin.request("PUT", f"{PATH}/dev-1", json=body)).status == 201
        assert "dev-1" not in api.sup.by_endpoint and "dev-2" in api.sup.by_endpoint
        assert (await pull(app))["de-registrations"] == ["dev-1"]
    # plain CoAP is refused from now on: a Register (UDP and TCP) and an Update, 4.03
    assert (await dev.update()).code == Code.NOT_FOUND  # (its registration is gone)
    assert (await dev.register()).code == Code.FORBIDDEN
    tcp = TcpDevice(api.server.tcp_addr, "dev-1")
    await tcp.connect(nursery)
    assert (await tcp.register()).code == Code.FORBIDDEN
    await tcp.disconnect()
    assert "dev-1" not in api.sup.by_endpoint
    assert api.sup.statistics["credentials_refused"] == 2
    refused = [r.message for r in caplog.records if r.message.startswith("refused Register")]
    assert len(refused) == 2, refused  # one line each (udp, tcp)
    assert all("4.03, the endpoint has device credentials" in line for line in refused)
    assert list(api.sup.by_endpoint) == ["dev-2"]
    # removed: plain CoAP is accepted again; the other device was never touched
    async with api.client(ADMIN) as admin:
        assert (await admin.request("DELETE", f"{PATH}/dev-1")).status == 204
    assert (await dev.register()).code == Code.CREATED
    assert (await other.update()).code == Code.CHANGED


async def test_an_update_over_plain_coap_is_refused_once_credentials_exist(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The registrar's rule on Updates (the registration is ended by the API first; here the
    index is written directly, as a race between the two would)."""
    api = await start_api(nursery, keys=KEYS)
    dev = await online(api, nursery, ep="dev-1")
    api.sup.credentials.put(Credential("dev-1", "id-1", bytes(16), 0.0))
    assert (await dev.update()).code == Code.FORBIDDEN
    assert "dev-1" in api.sup.by_endpoint  # nothing changed


async def test_the_answer_waits_for_the_store(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "store.sqlite3", commit_interval=0.5)
    nursery.start_soon(store.run)
    api = await start_api(nursery, keys=KEYS, store=store)
    async with api.client(ADMIN) as admin:
        body = {"psk_identity": "id-1", "psk_key": HEX}
        before = store.transactions
        reply = await admin.request("PUT", f"{PATH}/dev-1", json=body)
        assert reply.status == 201
        assert store.transactions > before  # committed before the answer
        reply = await admin.request("DELETE", f"{PATH}/dev-1")
        assert reply.status == 204
    store.close()
    again = SqliteStore(tmp_path / "store.sqlite3")
    assert again.load().credentials == []
    again.close()


async def test_a_command_in_flight_gets_its_async_response_when_credentials_end_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    api = await start_api(nursery, keys=KEYS)
    await online(api, nursery, ep="dev-1", answer=False)  # it never answers our requests
    async with api.client(KEY_A) as app:
        assert (await app.request("GET", "/v2/notification/pull")).status == 204
        reply = await app.request(
            "POST",
            "/v2/device-requests/dev-1?async-id=c-1",
            json={"method": "GET", "uri": "/3/0/1"},
        )
        assert reply.status == 202
        await trio.sleep(0.5)  # sent, not answered: in flight
        async with api.client(ADMIN) as admin:
            body = {"psk_identity": "id-1", "psk_key": HEX}
            assert (await admin.request("PUT", f"{PATH}/dev-1", json=body)).status == 201
        events: dict[str, list[object]] = {}
        while "async-responses" not in events or "de-registrations" not in events:
            for kind, items in (await pull(app)).items():
                events.setdefault(kind, []).extend(items)
        [response] = events["async-responses"]
        # (rule 8.2: the registration ended as by a De-register)
        assert response == {"id": "c-1", "status": 429, "error": "DEVICE_REMOVED_REGISTRATION"}
        assert events["de-registrations"] == ["dev-1"]
