"""Registration flood against a real `dm-actor serve` (issue 10, item 7), bounded for CI.

`DEVICES` new devices register at `RATE` per second offered (open loop, honest CoAP clients:
retransmissions, 5.03 obeyed after its Max-Age) from `bench/flood.py --load`, while
`bench/flood.py --app` works as an application: `GET /v3/devices?limit=2` every 50 ms on a
keep-alive connection, and a command (GET /3/0/0) to a device registered before the flood
every 0.5 s, timed from the POST to its AsyncIDResponse on the WebSocket channel (which also
receives every registration event). Asserted: the server stays alive, answers every GET
within 5 s and every command (its AsyncIDResponse within 10 s), and answers every device of
the flood (2.01, or 5.03 with Max-Age when it sheds). The
goals, GET p99 < 500 ms and every command answered within 2 s, are checked last: while they
are not met the test reports xfail with the figures. The full-size run (100k
devices, pinned cores) is `bench/flood.py`; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.adversarial.conftest import KEY, PYTHON
from tests.daemon import ROOT

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tests.adversarial.conftest import Driven, Served

DEVICES = 20_000
RATE = 5000
HEALTHY = 4
GET_P99_MS = 500
COMMAND_MS = 2000
GENEROUS_MS = 5000  # every GET, on any machine


async def test_registration_flood(
    start_daemon: Callable[..., Awaitable[Served]],
    spawn: Callable[[list[str]], Awaitable[Driven]],
) -> None:
    served = await start_daemon()
    script = str(ROOT / "bench" / "flood.py")
    load = await spawn([PYTHON, script, "--load", served.coap])
    app = await spawn([PYTHON, script, "--app", str(served.http_port), KEY])
    healthy = await load.ask(f"register {HEALTHY} {HEALTHY}", seconds=30)
    assert healthy["done"] == HEALTHY
    assert (await app.ask("channel", seconds=30))["status"] in (200, 201)
    await app.send(f"probe 0.05 0.5 bench- {HEALTHY}")
    flood = await load.ask(f"flood {DEVICES} {RATE} 10", seconds=DEVICES / RATE + 60)
    probe = await app.ask("stop", seconds=30)
    report = f"flood {flood}\nprobe {probe}"
    # what must hold on any machine: alive, every device registered in the end, every GET
    # answered within a generous bound, every command accepted and answered
    assert served.alive, served.log_text()[-3000:]
    # every device was answered: registered (2.01), or told to come back later (5.03 with
    # Max-Age `[registration] retry_after`, 60 s: after the test). How many are registered
    # depends on the CPU the server gets (10 % of them on a loaded machine, all when idle)
    assert flood["answered_devices"] > DEVICES * 0.99, report
    assert flood["registered"] > 0, report
    assert probe["gets"] > 50 and probe["statuses"].get("get_200") == probe["gets"], report
    assert probe["get_max_ms"] < GENEROUS_MS, report
    assert probe["commands"] >= 3, report
    assert probe["statuses"].get("post_202") == probe["commands"], report
    assert "unanswered_in_10s" not in probe["statuses"], report
    assert "Traceback" not in served.log_text()
    # the goals (issue 10, item 7): not met yet; while they are not, the test reports xfail
    # with the figures. The device's answer waits behind the flood in the UDP socket's
    # receive queue (or is dropped there and the request retransmitted after 2-3 s); the
    # GETs wait for the loop (docs/benchmarks.md, "Registration flood")
    missed = []
    if probe["get_p99_ms"] >= GET_P99_MS:
        missed.append(f"GET p99 {probe['get_p99_ms']} ms")
    if probe["command_max_ms"] >= COMMAND_MS:
        missed.append(f"a command took {probe['command_max_ms']} ms")
    if missed:
        pytest.xfail(f"issue 10 item 7: {', '.join(missed)}: {report}")
