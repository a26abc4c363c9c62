"""/metrics and /readyz of cluster nodes (real nodes on a real PostgreSQL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from tests.cluster.harness import KEY, Cluster, Device, Node, names_owned, pytestmark_common
from tests.daemon import request
from tests.store.postgres import pg_dsn, pg_server

if TYPE_CHECKING:
    from pathlib import Path

    from tests.store.postgres import PostgresServer

__all__ = ["pg_dsn", "pg_server"]
pytestmark = pytestmark_common


class _Public(Cluster):
    """Nodes whose /metrics need no administrator key."""

    def _config(self, node: Node) -> str:
        return super()._config(node).replace("[api]\n", "[api]\nmetrics_public = true\n", 1)


def _value(text: str, line_start: str) -> float:
    [line] = [x for x in text.splitlines() if x.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


async def test_each_node_reports_its_slots_rounds_and_forwarded_datagrams(
    tmp_path: Path, pg_server: PostgresServer, pg_dsn: str
) -> None:
    cluster = _Public(tmp_path, pg_server, pg_dsn, "B")
    try:
        with trio.fail_after(60):
            await cluster.start("a", "b")
            table = await cluster.settled()
            a, b = cluster.nodes["a"], cluster.nodes["b"]
            [name] = names_owned(table, {"b"}, 1, "m")
            device = Device(name, a.coap)  # talks to a, owned by b: forwarded
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                assert (await device.register()) is not None
                nursery.cancel_scope.cancel()
            texts: dict[str, str] = {}
            while True:  # (until the handovers of the join are over)
                for node in (a, b):
                    assert (await request(node.http, "GET", "/readyz", KEY))[0] == 200
                    status, body = await request(node.http, "GET", "/metrics", KEY)
                    assert status == 200
                    texts[node.name] = body.decode()
                slots = [_value(texts[n], "dm_actor_cluster_slots ") for n in "ab"]
                if sum(slots) == cluster.slots:
                    break
                await trio.sleep(0.2)
    finally:
        await cluster.close()
    assert min(slots) > 0
    for n in "ab":
        assert _value(texts[n], 'dm_actor_cluster_node_total{kind="rounds"}') > 0
    assert _value(texts["a"], 'dm_actor_cluster_link_total{kind="forwarded"}') >= 1
    assert _value(texts["b"], 'dm_actor_cluster_link_total{kind="backwarded"}') >= 1
