"""docs/openapi.json is true: well-formed, the routes the server serves, the bodies it sends.

Three checks: (1) the document is structurally valid OpenAPI 3.1 (every `$ref` resolves, every
operation has responses, its schemas use only keywords the validator below understands) and
its component schemas name exactly the fields of the msgspec Structs in `api/schemas.py`;
(2) every documented operation is routed and a grid of undocumented method/path combinations
answers the server's route-not-found 404/405; (3) against `app.serve`, the real answers of
every operation (and the WebSocket and webhook messages) have a documented status, media type
and body. docs/api.md links the document and shows a curl example of every operation.
The JSON Schema subset validator here knows type, enum, pattern, minimum, maximum,
minLength, minItems, properties, required, additionalProperties, items, oneOf and `$ref`.
"""

from __future__ import annotations

import json
import re
import typing
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest.mock import ANY

import msgspec
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

import dm_actor
from dm_actor import app
from dm_actor.actors.supervisor import METHODS
from dm_actor.api import schemas
from dm_actor.api.auth import ApiKeys
from dm_actor.api.channels import CALLBACK, LONG_POLLING, WEB_SOCKET
from dm_actor.coap.numbers import Code
from dm_actor.config import ServerSettings, Settings
from tests.actors.support import Device

from .client import WEBSOCKET_PATH, HttpClient, Reply, next_message
from .test_webhook import Receiver

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from dm_actor.address import Address
    from dm_actor.coap.message import Message

DOC_FILE = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
DOC: dict[str, Any] = json.loads(DOC_FILE.read_text())
KEY = "ak_openapi"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
PROBE_METHODS = ("GET", "PUT", "POST", "DELETE", "PATCH")

# -- the document -----------------------------------------------------------------------------


def resolve(ref: str) -> Any:
    """The node a local `$ref` (`#/a/b`) names; KeyError if there is none."""
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(node["$ref"])
    return node


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object in `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path template, operation) for every documented operation."""
    for template, item in DOC["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield method.upper(), template, item[method]


def match(template: str, path: str) -> bool:
    """Does `path` (percent-decoded segments) fill `template`? `{resource-path}` takes the
    rest of the path (several segments), any other `{name}` exactly one segment."""
    want, got = template.strip("/").split("/"), path.strip("/").split("/")
    for i, part in enumerate(want):
        if part == "{resource-path}":
            return len(got) > i and all(got[i:])
        if i >= len(got) or not got[i] or (part != got[i] and not part.startswith("{")):
            return False
    return len(got) == len(want)


def operation_for(method: str, target: str) -> tuple[str, dict[str, Any]]:
    path = target.partition("?")[0]
    found = [(t, op) for m, t, op in operations() if m == method and match(t, path)]
    assert len(found) == 1, f"{method} {target}: documented as {[t for t, _ in found]}"
    return found[0]


def schemas_in(node: Any) -> Iterator[dict[str, Any]]:
    """Every Schema Object in `node` (a path item, a component, ...), nested ones too."""
    for obj in walk(node):
        if "schema" in obj and isinstance(obj["schema"], dict):
            yield from _sub_schemas(obj["schema"])
    for schema in node.get("schemas", {}).values() if isinstance(node, dict) else ():
        yield from _sub_schemas(schema)


def _sub_schemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from _sub_schemas(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _sub_schemas(schema[key])
    for sub in schema.get("oneOf", ()):
        yield from _sub_schemas(sub)


# -- a JSON Schema subset validator -----------------------------------------------------------

VALIDATED = frozenset(("$ref", "type", "enum", "pattern", "minimum", "maximum", "minLength",
                       "minItems", "properties", "required", "additionalProperties", "items",
                       "oneOf"))  # fmt: skip
ANNOTATIONS = frozenset(("description", "default", "format", "contentEncoding"))
TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
    "boolean": bool, "null": type(None),
}  # fmt: skip


def is_type(value: Any, name: str) -> bool:
    return isinstance(value, TYPES[name]) and not (isinstance(value, bool) and name != "boolean")


def errors(value: Any, schema: dict[str, Any], at: str = "$") -> list[str]:
    """Why `value` does not validate against `schema` (empty: it does)."""
    if "$ref" in schema:
        return errors(value, resolve(schema["$ref"]), at)
    if "oneOf" in schema:
        passing = sum(not errors(value, sub, at) for sub in schema["oneOf"])
        return [] if passing == 1 else [f"{at}: {passing} of oneOf match {value!r}"]
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(is_type(value, n) for n in names):
            return [f"{at}: {value!r} is not {names}"]
    out = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            out.append(f"{at}: {value!r} too short")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", value) <= value <= schema.get("maximum", value):
        out.append(f"{at}: {value!r} out of range")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{at}: too few items")
        for i, item in enumerate(value):
            out += errors(item, schema.get("items", {}), f"{at}[{i}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        missing = [name for name in schema.get("required", ()) if name not in value]
        out += [f"{at}: {name!r} missing" for name in missing]
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                out += errors(item, properties[name], f"{at}.{name}")
            elif extra is False:
                out.append(f"{at}: undocumented key {name!r}")
            elif isinstance(extra, dict):
                out += errors(item, extra, f"{at}.{name}")
    return out


def test_the_validator_rejects_what_it_should() -> None:
    message = {"$ref": "#/components/schemas/NotificationMessage"}
    good = {"async-responses": [{"id": "a", "status": 200, "payload": "NDI="}],
            "de-registrations": ["dev", {"ep": "dev2", "uid": "u"}]}  # fmt: skip
    assert errors(good, message) == []
    assert errors({"async-responses": [{"id": "a"}]}, message)  # required
    assert errors({"async-responses": [{"id": "a", "status": True}]}, message)  # bool no int
    assert errors({"async-responses": [{"id": "a", "status": 200, "x": 1}]}, message)  # extra
    assert errors({"de-registrations": [7]}, message)  # oneOf
    assert errors({"order": "UP"}, {"properties": {"order": {"enum": ["ASC"]}}})
    assert errors("x", {"type": "string", "pattern": "^y$"})
    assert errors(99, {"type": "integer", "minimum": 100})
    assert errors([], {"type": "array", "minItems": 1})
    assert errors({"h": 1}, {"type": "object", "additionalProperties": {"type": "string"}})
    assert errors(None, {"type": ["string", "null"]}) == []
    assert errors(True, {"type": ["integer", "string"]})


# -- (1) structure ----------------------------------------------------------------------------


def test_the_document_is_structurally_valid_openapi() -> None:
    assert DOC["openapi"].startswith("3.1.")
    assert DOC["info"]["title"] and DOC["info"]["version"] == dm_actor.__version__
    for obj in walk(DOC):
        if "$ref" in obj:
            assert isinstance(obj["$ref"], str)
            resolve(obj["$ref"])  # raises KeyError when it does not resolve
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    operation_ids = []
    for method, template, op in operations():
        where = f"{method} {template}"
        assert op["responses"], where
        for status, response in op["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", status), where
            assert deref(response)["description"], (where, status)
        operation_ids.append(op["operationId"])
        for requirement in op.get("security", DOC["security"]):
            assert set(requirement) <= set(schemes), where
        parameters = DOC["paths"][template].get("parameters", []) + op.get("parameters", [])
        declared = {p["name"] for p in map(deref, parameters) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}]+)\}", template)), where
    assert len(operation_ids) == len(set(operation_ids))
    for schema in schemas_in(DOC["paths"]):
        assert set(schema) <= VALIDATED | ANNOTATIONS, schema
    for schema in schemas_in(DOC["components"]):
        assert set(schema) <= VALIDATED | ANNOTATIONS, schema


#: component schema -> (Struct, decoded from requests): the documented fields are the Struct's
STRUCTS: dict[str, tuple[type[msgspec.Struct], bool]] = {
    "DeviceRequest": (schemas.DeviceRequest, True),
    "ChannelRequest": (schemas.ChannelRequest, True),
    "CallbackRequest": (schemas.CallbackRequest, True),
    "SerializationOptions": (schemas.Serialization, True),
    "SerializationConfigOptions": (schemas.SerializationConfig, True),
    "PresubscriptionEntry": (schemas.PresubscriptionEntry, True),
    "Serialization": (schemas.Serialization, False),
    "SerializationConfig": (schemas.SerializationConfig, False),
    "CallbackChannel": (schemas.CallbackChannel, False),
    "WebsocketChannel": (schemas.WebsocketChannel, False),
    "DeliveryMechanism": (schemas.DeliveryMechanism, False),
    "Resource": (schemas.Resource, False),
    "DeviceData": (schemas.DeviceData, False),
    "DeviceList": (schemas.DeviceList, False),
    "ErrorResponse": (schemas.ErrorResponse, False),
    "QueuedCommand": (schemas.QueuedCommand, False),
    "DeviceQueueView": (schemas.DeviceQueueView, False),
}


def test_component_schemas_match_the_msgspec_structs() -> None:
    defined = {
        v
        for v in vars(schemas).values()
        if isinstance(v, type)
        and issubclass(v, msgspec.Struct)
        and v.__module__ == schemas.__name__
    }
    assert {struct for struct, _ in STRUCTS.values()} == defined
    components = DOC["components"]["schemas"]
    for name, (struct, decoded) in STRUCTS.items():
        schema = components[name]
        fields = msgspec.structs.fields(struct)
        assert set(schema["properties"]) == {f.encode_name for f in fields}, name
        # requests may leave out what has a default; responses always carry every field,
        # except a Struct that omits its defaults
        omits = struct.__struct_config__.omit_defaults
        required = {f.encode_name for f in fields if f.required or not (decoded or omits)}
        assert set(schema["required"]) == required, name
        # msgspec ignores unknown keys of a request; a response has no undocumented key
        assert schema["additionalProperties"] is (decoded or False), name
    assert set(components["DeviceRequest"]["properties"]["method"]["enum"]) == METHODS
    mechanisms = components["DeliveryMechanism"]["properties"]["delivery_mechanism"]["enum"]
    assert mechanisms == [WEB_SOCKET, LONG_POLLING, CALLBACK]
    status = components["WebsocketChannel"]["properties"]["status"]["enum"]
    assert status == list(
        typing.get_args(typing.get_type_hints(schemas.WebsocketChannel)["status"])
    )


def test_api_md_links_the_document_and_has_a_curl_example_for_every_operation() -> None:
    text = (DOC_FILE.parent / "api.md").read_text()
    assert "(openapi.json)" in text
    commands = re.findall(r"^ *(curl .*)$", text.replace("\\\n", " "), re.MULTILINE)
    shown = set()
    for command in commands:
        method = re.search(r" -X (\w+)", command)
        [path] = re.findall(r'"\$S(/[^"?]*)', command)
        method_name = method[1] if method else "GET"
        shown.add((method_name, operation_for(method_name, path)[0]))
    assert shown == {(m, t) for m, t, _ in operations()}


# -- a running server -------------------------------------------------------------------------


async def serve(nursery: trio.Nursery, tmp_path: Path) -> app.Listening:
    settings = Settings(
        server=ServerSettings(
            host="127.0.0.1", coap_port=0, http_port=0, store="memory", data_dir=str(tmp_path)
        )
    )
    listening: app.Listening = await nursery.start(
        partial(app.serve, settings, api_keys=ApiKeys([KEY]))
    )
    return listening


async def online(listening: app.Listening, nursery: trio.Nursery, ep: str, **kw: Any) -> Device:
    dev = Device(listening.coap_udp, ep, **kw)
    await dev.start(nursery)
    assert (await dev.register()).code == Code.CREATED
    return dev


def not_found_on_delete(request: Message) -> tuple[int, bytes, int | None] | None:
    return (Code.NOT_FOUND, b"", None) if request.code == Code.DELETE else None


def http(listening: app.Listening) -> Address:
    assert listening.http is not None
    return listening.http


def route_missing(reply: Reply) -> bool:
    """The server's own 404/405 for a path or method it does not route."""
    if reply.status not in (404, 405) or reply.headers.get(b"content-type") != b"application/json":
        return False
    return reply.json()["message"] in ("No such resource.", "Method not allowed on this resource.")


def concrete(template: str) -> str:
    return template.replace("{device-id}", "dev").replace("{resource-path}", "3303/0/5700")


async def test_the_documented_operations_are_exactly_the_routed_ones(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    await online(listening, nursery, "dev")
    documented = {(m, t) for m, t, _ in operations()}
    async with HttpClient(http(listening), KEY) as client:
        for method, template in sorted(documented):
            reply = await client.request(method, concrete(template))
            assert not route_missing(reply), (method, template, reply.status, reply.body)
        extra_paths = ["/", "/v2", "/v3", "/v2/device-requests", "/v2/device-requests/dev/3",
                       "/v2/endpoints", "/v2/endpoints/dev/3/0", "/v2/notification",
                       "/v2/notification/other", "/v2/notification/pull/x", "/v3/devices/dev/echo",
                       "/v3/other", "/v2/other/dev"]  # fmt: skip
        grid = [(m, concrete(t)) for t in DOC["paths"] for m in PROBE_METHODS
                if (m, t) not in documented]  # fmt: skip
        grid += [(m, p) for p in extra_paths for m in PROBE_METHODS]
        for method, target in grid:
            reply = await client.request(method, target)
            assert route_missing(reply), (method, target, reply.status, reply.body)


class Checked:
    """Checks each answer against the document and records which operations succeeded."""

    def __init__(self, client: HttpClient) -> None:
        self.client = client
        self.succeeded: set[tuple[str, str]] = set()

    async def __call__(self, method: str, target: str, status: int, **kw: Any) -> Reply:
        reply = await self.client.request(method, target, **kw)
        where = f"{method} {target} -> {reply.status} {reply.body[:200]!r}"
        assert reply.status == status, where
        template, op = operation_for(method, target)
        responses = op["responses"]
        response = deref(responses.get(str(status)) or responses[f"{status // 100}XX"])
        media = reply.headers.get(b"content-type", b"").decode().partition(";")[0]
        if "content" not in response:
            assert (media, reply.body) == ("", b""), where
        else:
            assert media in response["content"], where
            body = reply.json() if media == "application/json" else reply.text
            assert errors(body, response["content"][media]["schema"]) == [], where
        if status < 300:
            self.succeeded.add((method, template))
            sent = kw.get("json")
            if sent is not None:  # what the server accepted, the document allows
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                assert errors(sent, schema) == [], where
        return reply


def message_schema(method: str, template: str) -> dict[str, Any]:
    """What the documentation says a channel delivers (the long poll's 200 body, the
    WebSocket's frames, the webhook's PUT body): the same `NotificationMessage`."""
    op = DOC["paths"][template][method]
    if "x-websocket-message" in op:
        schema: dict[str, Any] = op["x-websocket-message"]
    elif "callbacks" in op:
        [callback] = op["callbacks"].values()
        [item] = callback.values()
        schema = item["put"]["requestBody"]["content"]["application/json"]["schema"]
    else:
        schema = op["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/NotificationMessage"}
    return schema


async def test_real_answers_match_the_documented_responses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    listening = await serve(nursery, tmp_path)
    async with HttpClient(http(listening), KEY) as client:
        call = Checked(client)
        await _devices_and_requests(call, listening, nursery)
        await _subscriptions(call)
        await _websocket(call, listening, nursery)
        await _callback(call, nursery)
        await call("GET", "/v3/devices", 401, key="ak_wrong")
        await call("POST", "/v2/device-requests/dev?async-id=big", 413, body=b"x" * (1 << 20 | 1))
    # every one, with success (the administrators' in tests/console/test_console_openapi.py)
    assert call.succeeded == {(m, t) for m, t, _ in operations() if not t.startswith("/admin/")}


@asynccontextmanager
async def websocket(addr: Address, subprotocols: list[str]) -> AsyncIterator[WebSocketConnection]:
    stream = await trio.open_tcp_stream(*addr[:2])
    async with stream, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, "127.0.0.1", WEBSOCKET_PATH, subprotocols=subprotocols
        )
        yield ws
        with trio.move_on_after(5):
            await ws.aclose()
        nursery.cancel_scope.cancel()


async def pull_until(call: Checked, kind: str) -> list[Any]:
    """Long-poll (checking each message) until one has `kind`; its items."""
    pulled = message_schema("get", "/v2/notification/pull")
    while True:
        message = (await call("GET", "/v2/notification/pull", 200)).json()
        assert errors(message, pulled) == [], message
        if kind in message:
            items: list[Any] = message[kind]
            return items


async def _devices_and_requests(call: Checked, listening: app.Listening, nursery: Any) -> None:
    assert (await call("GET", "/v3/devices", 200)).json()["data"] == []
    await call("GET", "/v2/notification/pull", 204)  # creates the channel
    await online(listening, nursery, "dev", handler=not_found_on_delete)
    await pull_until(call, "registrations")
    await online(listening, nursery, "quiet", answer=False)
    post = "/v2/device-requests/dev?async-id="
    await call("POST", post + "r1", 202, json={"method": "GET", "uri": "/3/0/1"})
    assert [r["id"] for r in await pull_until(call, "async-responses")] == ["r1"]
    await call("POST", post + "r1", 409, json={"method": "GET", "uri": "/3/0/2"})
    await call("POST", post + "bad%20id", 400, json={"method": "GET", "uri": "/3/0/1"})
    await call("POST", post + "r2&retry=11", 400, json={"method": "GET", "uri": "/3/0/1"})
    await call("POST", post + "r2", 400, body=b"{not json")
    await call("POST", post + "r2", 404, json={"method": "GET", "uri": "/5/0/1"})
    await call("POST", "/v2/device-requests/ghost?async-id=r2", 404,
               json={"method": "GET", "uri": "/3/0/1"})  # fmt: skip
    quiet = "/v2/device-requests/quiet?retry=10&async-id="
    await call("POST", quiet + "q1", 202, json={"method": "GET", "uri": "/3/0/1"})
    await call("POST", quiet + "q2", 202, json={"method": "PUT", "uri": "/3/0/14",
               "content-type": "text/plain", "payload-b64": "KzAx"})  # fmt: skip
    view = (await call("GET", "/v2/device-requests/quiet", 200)).json()
    assert [c["waiting_for"] for c in view["commands"]] == ["response", "earlier-commands"]
    await call("GET", "/v2/device-requests/ghost", 404)
    await call("GET", "/v2/endpoints/dev", 200)
    await call("GET", "/v2/endpoints/ghost", 404)
    reply = await call("GET", "/v3/devices?limit=2&order=desc&filter=state%3Dregistered", 200)
    assert [d["id"] for d in reply.json()["data"]] == ["quiet", "dev"]
    await call("GET", "/v3/devices?after=dev&state__eq=registered&include=total_count", 200)
    await call("GET", "/v3/devices?limit=1", 400)
    await call("GET", "/v3/devices?filter=colour%3Dred", 400)
    await call("GET", "/v3/devices/dev", 200)
    await call("GET", "/v3/devices/ghost", 404)


async def _subscriptions(call: Checked) -> None:
    await call("PUT", "/v2/subscriptions/dev/3303/0/5700", 200)
    [notification] = await pull_until(call, "notifications")
    assert notification["path"] == "/3303/0/5700"
    await call("PUT", "/v2/subscriptions/dev/5/0/1", 404)
    await call("PUT", "/v2/subscriptions/ghost/3/0/1", 404)
    await call("GET", "/v2/subscriptions/dev/3303/0/5700", 200)
    await call("GET", "/v2/subscriptions/dev/3/0/1", 404)
    assert (await call("GET", "/v2/subscriptions/dev", 200)).text == "/3303/0/5700"
    await call("GET", "/v2/subscriptions/ghost", 404)
    await call("DELETE", "/v2/subscriptions/dev/3303/0/5700", 204)
    await call("DELETE", "/v2/subscriptions/ghost/3303/0/5700", 404)
    await call("GET", "/v2/subscriptions/dev", 404)
    await call("DELETE", "/v2/subscriptions/dev", 204)
    body = [{"endpoint-name": "node-*", "resource-path": ["/3303/*"]}, {"endpoint-type": "x"}]
    await call("PUT", "/v2/subscriptions", 204, json=body)
    assert (await call("GET", "/v2/subscriptions", 200)).json() == body
    await call("PUT", "/v2/subscriptions", 400, json=[{"resource-path": []}])
    await call("DELETE", "/v2/subscriptions", 204)
    await call("GET", "/v2/notification/channel", 200)
    assert (await call("DELETE", "/v2/notification/pull", 200)).text == "REMOVED"
    assert (await call("DELETE", "/v2/notification/pull", 200)).text == "ALREADY_DELETED"
    await call("GET", "/v2/notification/channel", 404)


async def _websocket(call: Checked, listening: app.Listening, nursery: Any) -> None:
    every_option = {"serialization": {"max_chunk_size": "500", "cfg": {
        "deregistrations_as_object": True, "include_uid": True, "include_timestamp": "true",
        "include_original_ep": True}}}  # fmt: skip
    await call("GET", "/v2/notification/websocket", 404)
    await call("PUT", "/v2/notification/websocket", 400, json={"serialization": {"type": "v9"}})
    await call("PUT", "/v2/notification/websocket", 201, json=every_option)
    await call("PUT", "/v2/notification/websocket", 200)
    await call("GET", "/v2/notification/websocket", 200)
    await call("GET", "/v2/notification/pull", 400)
    await call("GET", "/v2/notification/websocket-connect", 426)
    await call("GET", "/v2/notification/websocket-connect", 400,
               headers=[("upgrade", "websocket"), ("connection", "Upgrade")])  # fmt: skip
    await call("GET", "/v2/notification/websocket-connect", 401, key=None,
               headers=[("upgrade", "websocket"), ("connection", "Upgrade")])  # fmt: skip
    framed = message_schema("get", "/v2/notification/websocket-connect")
    async with websocket(http(listening), ["wss", f"pelion_{KEY}"]) as ws:
        assert ws.subprotocol == "wss"  # the 101 answered, with the documented header
        op = DOC["paths"]["/v2/notification/websocket-connect"]["get"]
        assert "Sec-WebSocket-Protocol" in op["responses"]["101"]["headers"]
        call.succeeded.add(("GET", "/v2/notification/websocket-connect"))
        post = "/v2/device-requests/dev?async-id="
        await call("POST", post + "w1", 202, json={"method": "PUT", "uri": "/3/0/14",
                   "content-type": "text/plain", "payload-b64": "KzAx"})  # fmt: skip
        await call("POST", post + "w2", 202, json={"method": "DELETE", "uri": "/3/0"})
        gone = await online(listening, nursery, "gone")
        await gone.deregister()
        seen: dict[str, list[Any]] = {}
        while "de-registrations" not in seen:
            message = await next_message(ws)
            assert errors(message, framed) == [], message
            for kind, items in message.items():
                seen.setdefault(kind, []).extend(items)
        answers = {r["id"]: r for r in seen["async-responses"]}
        assert answers["w1"] == {"id": "w1", "status": 200, "uid": ANY, "timestamp": ANY}
        assert (answers["w2"]["status"], answers["w2"]["error"]) == (404, "NOT_FOUND")
        assert "registrations" in seen
        assert seen["de-registrations"][0]["original-ep"] == "gone"
    await call("DELETE", "/v2/notification/websocket", 204)
    await call("DELETE", "/v2/notification/websocket", 404)


async def _callback(call: Checked, nursery: Any) -> None:
    receiver = Receiver()
    url = await receiver.start(nursery)
    hook = "/v2/notification/callback"
    await call("GET", hook, 404)
    await call("PUT", hook, 400, json={"headers": {}})
    await call("PUT", hook, 400, json={"url": "https://example.com/"})
    await call("PUT", hook, 400, json={"url": url, "headers": {"Host": "x"}})
    await call("PUT", hook, 204, json={"url": url, "headers": {"X-App": "1"}})
    await call("GET", hook, 200)
    await call("POST", "/v2/device-requests/dev?async-id=c1", 202,
               json={"method": "GET", "uri": "/3/0/1"})  # fmt: skip
    assert (await receiver.next()).body == b"{}"  # the test PUT
    delivered = (await receiver.next()).json()
    assert errors(delivered, message_schema("put", hook)) == [], delivered
    assert "c1" in [r["id"] for r in delivered["async-responses"]]
    await call("PUT", "/v2/notification/websocket", 400)
    await call("DELETE", hook, 204)
    await call("DELETE", hook, 404)
