"""30 % datagram loss in both directions: every command completes and runs exactly once."""

from __future__ import annotations

import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted
from dm_actor.coap.numbers import Code

from .support import Device, responses, start_server

COMMANDS = 20  # the queue holds 20: two waves of them


async def test_commands_complete_exactly_once_under_30_percent_loss(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    dev = Device(server.addr, "lossy", lifetime=3600, loss=0.3)
    await dev.start(nursery)
    while (await dev.register()).code != Code.CREATED:
        pass
    got: dict[str, dict[str, object]] = {}
    for wave in range(2):
        ids = range(wave * COMMANDS, (wave + 1) * COMMANDS)
        for i in ids:
            result = await server.sup.submit(
                "lossy", "PUT", "/3311/0/5850", async_id=f"c{i}", payload=b"%d" % i,
                content_format=0, retry=10, expiry=86400,
            )  # fmt: skip
            assert result == Accepted()
        with trio.fail_after(86400):
            while len(got) < ids.stop:
                # a real client's contacts: an Update now and then (each one retransmitted
                # under loss by the client's own CoAP layer)
                await trio.sleep(100)
                await dev.update()
                got.update(responses(server))
    assert all(item["status"] == 200 for item in got.values()), got
    # each command ran once on the device, in order: deduplication and same-MID resends held
    assert [e.payload for e in dev.executed] == [b"%d" % i for i in range(2 * COMMANDS)]
    # and the loss was real: some attempts failed and were resent later as the same exchange
    puts = [(t, m.mid) for t, m in dev.arrivals if m.code == Code.PUT]
    first_seen: dict[int, float] = {}
    for t, mid in puts:
        first_seen.setdefault(mid, t)
    assert any(t - first_seen[mid] > 126 for t, mid in puts)
