"""The aiocoap baseline: a registration responder built the way aiocoap intends.

A `Site` with a resource at `/rd` and a path-capable one below it: a POST to
`/rd?ep=NAME&...` (a Register) gets 2.01 Created with `Location-Path: rd/<id>` (the same
endpoint keeps its id), a POST to `/rd/<id>` (an Update) gets 2.04 Changed, or 4.04 for an
unknown id. Only the UDP transport is enabled (`AIOCOAP_SERVER_TRANSPORT=udp6`, set here), so
aiocoap does what dm_actor's UDP path does: deduplication, piggy-backed ACKs, the message layer.

    python bench/baselines/aiocoap_rd.py PORT
"""

from __future__ import annotations

import asyncio
import os
import sys

os.environ.setdefault("AIOCOAP_SERVER_TRANSPORT", "udp6")

import contextlib

import aiocoap
import aiocoap.resource


class Directory(aiocoap.resource.Resource):  # type: ignore[misc]
    """`/rd`: Registers."""

    def __init__(self) -> None:
        super().__init__()
        self.by_endpoint: dict[str, str] = {}
        self.ids: set[str] = set()

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        endpoint = ""
        for q in request.opt.uri_query:
            if q.startswith("ep="):
                endpoint = q[3:]
        if not endpoint:
            return aiocoap.Message(code=aiocoap.BAD_REQUEST)
        rid = self.by_endpoint.get(endpoint)
        if rid is None:
            rid = self.by_endpoint[endpoint] = f"{len(self.by_endpoint):x}"
            self.ids.add(rid)
        return aiocoap.Message(code=aiocoap.CREATED, location_path=("rd", rid))


class Registrations(aiocoap.resource.Resource, aiocoap.resource.PathCapable):  # type: ignore[misc]
    """`/rd/<id>`: Updates."""

    def __init__(self, directory: Directory) -> None:
        super().__init__()
        self.directory = directory

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        if len(path) == 1 and path[0] in self.directory.ids:
            return aiocoap.Message(code=aiocoap.CHANGED)
        return aiocoap.Message(code=aiocoap.NOT_FOUND)


async def main(port: int) -> None:
    site = aiocoap.resource.Site()
    directory = Directory()
    site.add_resource(["rd"], directory)
    site.add_resource(["rd"], Registrations(directory))
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port))
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(int(sys.argv[1])))
