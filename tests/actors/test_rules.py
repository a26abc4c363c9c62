"""delivery.md, rule by rule, against devices speaking real CoAP over loopback UDP.

Every test runs in virtual time (autojump_clock): a 30-day expiry takes milliseconds.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dm_actor.actors.supervisor import Accepted, Rejected
from dm_actor.coap.numbers import Code
from dm_actor.config import parse_settings

from .support import Device, online, responses, settle

# -- 1. Accepting a command ---------------------------------------------------------------


async def test_rule_1_1_async_id_pattern(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _ = await online(nursery)
    submit = server.sup.submit
    for bad in ("", "a" * 41, "a b", "a/b", "é", "a:b"):
        assert await submit("dev", "GET", "/3/0/1", async_id=bad) == Rejected(
            400, "MALFORMED_ASYNC_ID"
        )
    for good in ("a" * 40, "A-b_9", "123e4567-e89b-12d3-a456-426614174000"):
        assert await submit("dev", "GET", "/3/0/1", async_id=good) == Accepted()


async def test_rule_1_2_malformed_request_and_uri_without_slash(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    assert await server.sup.submit("dev", "PATCH", "/3/0/1", async_id="a") == Rejected(
        400, "MALFORMED_JSON_CONTENT"
    )
    assert await server.sup.submit("dev", "GET", "/3/x/1", async_id="a") == Rejected(
        400, "MALFORMED_JSON_CONTENT"
    )
    assert await server.sup.submit("dev", "GET", "3/0/1", async_id="a") == Accepted()
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1"]


async def test_rule_1_3_retry_and_expiry_ranges_and_defaults(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _ = await online(nursery)
    submit = server.sup.submit
    assert await submit("dev", "GET", "/3/0/1", async_id="a", retry=11) == Rejected(
        400, "MALFORMED_RETRY"
    )
    assert await submit("dev", "GET", "/3/0/1", async_id="a", retry=-1) == Rejected(
        400, "MALFORMED_RETRY"
    )
    for expiry in (59, 2_592_001):
        assert await submit("dev", "GET", "/3/0/1", async_id="a", expiry=expiry) == Rejected(
            400, "MALFORMED_EXPIRY_SECONDS"
        )
    dev_actor = server.sup.by_endpoint["dev"]
    dev_actor.queue.reachable = False  # hold commands in the queue to look at them
    assert await submit("dev", "GET", "/3/0/1", async_id="d") == Accepted()
    assert await submit("dev", "GET", "/3/0/1", async_id="m", retry=10, expiry=2_592_000) == (
        Accepted()
    )
    d, m = dev_actor.queue.find("d"), dev_actor.queue.find("m")
    assert d is not None and m is not None
    assert (d.attempts_left, round(d.expires_at - d.accepted_at)) == (1, 7200)
    assert (m.attempts_left, round(m.expires_at - m.accepted_at)) == (11, 2_592_000)

    qdev = Device(server.addr, "sleepy", binding="UQ")
    await qdev.start(nursery)
    await qdev.register()
    await trio.sleep(100)  # asleep
    assert await submit("sleepy", "GET", "/3/0/1", async_id="q") == Accepted()
    q = server.sup.by_endpoint["sleepy"].queue.find("q")
    assert q is not None
    assert (q.attempts_left, round(q.expires_at - q.accepted_at)) == (3, 259_200)


async def test_rule_1_4_unknown_device_and_unregistered_path(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _ = await online(nursery)
    submit = server.sup.submit
    assert await submit("ghost", "GET", "/3/0/1", async_id="a") == Rejected(404, "DEVICE_NOT_FOUND")
    for uri in ("/5/0/1", "/3/1/1", "/3303/1"):
        assert await submit("dev", "GET", uri, async_id="a") == Rejected(
            404, "URI_PATH_DOES_NOT_EXISTS"
        )
    assert await submit("dev", "POST", "/3303", async_id="create") == Accepted()


async def test_rule_1_5_queue_full_at_21(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery, answer=False)
    for i in range(20):
        assert await server.sup.submit("dev", "GET", "/3/0/1", async_id=f"c{i}") == Accepted()
    assert await server.sup.submit("dev", "GET", "/3/0/1", async_id="c20") == Rejected(
        429, "QUEUE_IS_FULL"
    )
    assert len(server.sup.by_endpoint["dev"].queue) == 20


async def test_rule_1_6_every_accepted_command_ends_in_one_response(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery)
    ids = [f"c{i}" for i in range(15)]
    for async_id in ids:
        assert await server.sup.submit("dev", "GET", "/3/0/1", async_id=async_id) == Accepted()
    await trio.sleep(10)
    got = responses(server)
    assert sorted(got) == sorted(ids)
    assert all(item["status"] == 200 for item in got.values())
    await trio.sleep(3 * 86400)
    assert responses(server) == {}


async def test_rule_1_7_idempotent_async_id(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    submit = server.sup.submit
    assert await submit("dev", "PUT", "/3311/0/5850", async_id="a", payload=b"1") == Accepted()
    assert await submit("dev", "PUT", "/3311/0/5850", async_id="a", payload=b"1") == Accepted(
        duplicate=True
    )
    assert await submit("dev", "PUT", "/3311/0/5850", async_id="a", payload=b"0") == Rejected(
        409, "ASYNC_ID_IN_USE"
    )
    await trio.sleep(5)
    assert await submit("dev", "PUT", "/3311/0/5850", async_id="a", payload=b"1") == Accepted(
        duplicate=True
    )
    await trio.sleep(1)
    assert len(dev.executed) == 1
    assert list(responses(server)) == ["a"]


async def test_rule_1_7_another_applications_async_id_is_not_a_repeat(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Found by an attacker: application B's request with A's async-id was taken as A's
    repeat (202, nothing queued), and B never got an AsyncIDResponse."""
    server, _dev = await online(nursery)
    submit = server.sup.submit
    assert await submit("dev", "GET", "/3/0/1", async_id="r1", owner="A") == Accepted()
    assert await submit("dev", "GET", "/3/0/1", async_id="r1", owner="B") == Rejected(
        409, "ASYNC_ID_IN_USE"
    )
    await trio.sleep(5)
    # A's command finished: async-ids are unique per application, so B's r1 is B's own
    assert await submit("dev", "GET", "/3/0/1", async_id="r1", owner="B") == Accepted()
    assert await submit("dev", "GET", "/3/0/1", async_id="r1", owner="A") == Accepted(
        duplicate=True
    )
    await trio.sleep(5)
    assert [owners for _kind, _item, owners, _seq in server.sup.events.take()] == [
        frozenset("A"),
        frozenset("B"),
    ]


# -- 2. One command at a time ---------------------------------------------------------------


async def test_rule_2_1_in_order_one_at_a_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    for i in range(5):
        await server.sup.submit("dev", "GET", f"/3/0/{i}", async_id=f"c{i}")
    await trio.sleep(5)
    assert [e.path for e in dev.executed] == [f"/3/0/{i}" for i in range(5)]


async def test_rule_2_2_never_two_requests_in_flight(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(125)
    assert {e.path for e in dev.executed} == {"/3/0/1"}
    assert all(m.uri_path == ("3", "0", "1") for _, m in dev.arrivals if m.code == Code.GET)


# -- 3. An attempt --------------------------------------------------------------------------


async def test_rule_3_1_expired_command_is_not_sent(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(100)  # asleep: commands wait
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a", expiry=60)
    await trio.sleep(61)
    await dev.update()  # wake-up, after the expiry but (maybe) before the sweep
    await trio.sleep(1)
    assert dev.executed == []
    assert responses(server)["a"]["error"] == "REQUEST_EXPIRED"


async def test_rule_3_2_backoff_2_4_8_16_32_64_and_give_up_at_126(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, answer=False)
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(200)
    sent = [round(t - t0, 3) for t in dev.requests_at()]
    assert sent == [0, 2, 6, 14, 30, 62]
    assert len({m.mid for _, m in dev.arrivals if m.code == Code.GET}) == 1  # one message
    [(_kind, item)] = server.take("async-responses")
    assert item == {"id": "a", "status": 504, "error": "TIMEOUT"}


async def test_rule_3_2_settings_change_the_schedule(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    settings = parse_settings("[delivery]\nack_timeout = 1.0\nmax_retransmit = 2\n")
    server, dev = await online(nursery, settings=settings, answer=False)
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(10)
    assert [round(t - t0, 3) for t in dev.requests_at()] == [0, 1, 3]
    assert responses(server)["a"]["status"] == 504


async def test_rule_3_3_any_response_is_success(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery, handler=lambda req: (Code.NOT_FOUND, b"", None))
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(1)
    assert responses(server)["a"] == {"id": "a", "status": 404, "error": "NOT_FOUND"}


async def test_rule_3_4_reset_fails_the_attempt(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, reset=True)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(1)
    assert responses(server)["a"] == {"id": "a", "status": 503, "error": "NOT_CONNECTED"}
    assert len(dev.requests_at()) == 1


async def test_rule_3_4_icmp_port_unreachable_fails_the_attempt_at_once(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, dev = await online(nursery)
    dev.close()  # a sleeping client closes its socket: the server meets ICMP port-unreachable
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(1)
    assert responses(server)["a"] == {"id": "a", "status": 503, "error": "NOT_CONNECTED"}
    assert server.udp.statistics().unreachable == 1
    assert trio.current_time() - t0 < 2  # not after 126 s


async def test_rule_3_5_failed_attempt_uses_a_retry_and_goes_back_to_the_head(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, dev = await online(nursery, reset=True)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a", retry=1)
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(1)
    queue = server.sup.by_endpoint["dev"].queue
    assert [c.async_id for c in queue.queue] == ["a", "b"]
    a = queue.find("a")
    assert a is not None and a.attempts_left == 1
    dev.reset = False
    await trio.sleep(200)
    await dev.update()  # contact after the grace period: a, then b
    await trio.sleep(1)
    got = responses(server)
    assert (got["a"]["status"], got["b"]["status"]) == (200, 200)
    assert [e.path for e in dev.executed] == ["/3/0/1", "/3/0/2"]


async def test_rule_3_6_expiry_during_transmission(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="ok", expiry=60)
    await trio.sleep(61)  # expired while the attempt is in flight: not stopped
    assert server.take("async-responses") == []
    assert len(dev.requests_at()) == 5  # 0, 2, 6, 14, 30 and still going
    await trio.sleep(100)
    assert responses(server)["ok"]["error"] == "REQUEST_EXPIRED"  # failed: expired at once

    dev.answer = True
    await dev.update()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="late", expiry=60)
    await trio.sleep(1)
    assert responses(server)["late"]["status"] == 200


# -- 4. Non-queue devices ---------------------------------------------------------------------


async def test_rule_4_1_attempted_at_once_when_reachable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery)
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await settle()
    assert dev.requests_at() == [t0]  # no virtual time passed


async def test_rule_4_2_appended_behind_the_head(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await settle()
    queue = server.sup.by_endpoint["dev"].queue
    assert queue.in_flight is not None and queue.in_flight.async_id == "a"
    assert [c.async_id for c in queue.queue] == ["b"]


async def test_rule_4_3_unreachable_until_next_contact(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, answer=False)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a", retry=2)
    await trio.sleep(130)  # first attempt timed out
    dev.answer = True
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    await trio.sleep(600)
    assert len(dev.executed) == 1  # nothing more sent: believed unreachable
    await dev.update()  # contact: delivery restarts from the head
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1", "/3/0/1", "/3/0/2"]
    got = responses(server)
    assert (got["a"]["status"], got["b"]["status"]) == (200, 200)


# -- 5. Expiry --------------------------------------------------------------------------------


async def test_rule_5_1_expiry_counts_from_acceptance_up_to_30_days(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    long_lived = parse_settings(f"[registration]\nmax_lifetime = {40 * 86400}\n")
    server, _dev = await online(nursery, settings=long_lived, binding="UQ", lifetime=40 * 86400)
    await trio.sleep(100)
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="month", expiry=2_592_000)
    await trio.sleep(2_592_000 - 61)
    assert server.take("async-responses") == []
    await trio.sleep(122)
    [(_, item)] = server.take("async-responses")
    assert item == {"id": "month", "status": 429, "error": "REQUEST_EXPIRED"}
    assert trio.current_time() - t0 >= 2_592_000


async def test_rule_5_2_sweep_every_60_seconds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(100)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a", expiry=60)
    t_accept = trio.current_time()
    while not (got := server.take("async-responses")):  # noqa: ASYNC110 - polling virtual time
        await trio.sleep(1)
    finished = trio.current_time()
    assert 60 <= finished - t_accept <= 121  # found by a sweep, at most one interval late
    assert got == [("async-responses", {"id": "a", "status": 429, "error": "REQUEST_EXPIRED"})]
    assert dev.executed == []


# -- 6. Queue-mode devices --------------------------------------------------------------------


async def test_rule_6_1_nothing_sent_to_a_sleeping_device(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(3600)
    assert dev.executed == []


async def test_rule_6_2_wake_up_drains_the_queue(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    for i in range(3):
        await server.sup.submit("dev", "GET", f"/3/0/{i}", async_id=f"c{i}")
    await dev.update()
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/0", "/3/0/1", "/3/0/2"]
    assert sorted(responses(server)) == ["c0", "c1", "c2"]


async def test_rule_6_3_failed_attempt_means_asleep_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")
    dev.answer = False
    await dev.update()
    dev.close()  # it falls asleep right after the Update: the resend meets ICMP
    await trio.sleep(5)
    queue = server.sup.by_endpoint["dev"].queue
    assert [c.async_id for c in queue.queue] == ["a", "b"]
    assert not queue.awake(trio.current_time())


async def test_rule_6_4_awake_for_93_seconds_after_any_message(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(92)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="awake")
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1"]  # delivered like a non-queue device
    await trio.sleep(93)
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="asleep")
    await trio.sleep(1)
    assert len(dev.executed) == 1


# -- 7. Grace period --------------------------------------------------------------------------


async def test_rule_7_1_resend_grace(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, reset=True)
    t0 = trio.current_time()
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a", retry=3)
    await trio.sleep(1)
    dev.reset = False
    await trio.sleep(60 - (trio.current_time() - t0))
    await dev.update()  # a contact inside the grace period: no resend, no retry used
    await trio.sleep(1)
    a = server.sup.by_endpoint["dev"].queue.find("a")
    assert a is not None and a.attempts == 1 and a.attempts_left == 3
    await server.sup.submit("dev", "GET", "/3/0/2", async_id="b")  # never attempted, queued
    await trio.sleep(120 - (trio.current_time() - t0))
    await dev.update()  # 120 s after the attempt started: resend
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1", "/3/0/2"]


# -- 8. Registration changes ------------------------------------------------------------------


async def test_rule_8_1_register_again_keeps_the_queue(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    dev.close()
    await dev.start(nursery)  # rebooted: a new source port, a full Register
    assert (await dev.register()).code == Code.CREATED
    await trio.sleep(1)
    assert [e.path for e in dev.executed] == ["/3/0/1"]
    assert responses(server)["a"]["status"] == 200
    assert [k for k, _ in server.take()] == ["registrations"]


async def test_rule_8_2_deregister_finishes_every_command(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, binding="UQ")
    await trio.sleep(94)
    for i in range(3):
        await server.sup.submit("dev", "GET", "/3/0/1", async_id=f"c{i}")
    # De-register wakes the device too, so answer only the De-register (close after sending)
    dev.answer = False
    assert (await dev.deregister()).code == Code.DELETED
    await trio.sleep(1)
    events = server.take()
    assert ("de-registrations", "dev") in events
    got = [item for kind, item in events if kind == "async-responses"]
    assert got == [
        {"id": f"c{i}", "status": 429, "error": "DEVICE_REMOVED_REGISTRATION"} for i in range(3)
    ]
    assert await server.sup.submit("dev", "GET", "/3/0/1", async_id="x") == Rejected(
        404, "DEVICE_NOT_FOUND"
    )


async def test_rule_8_3_lifetime_expiry(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, _dev = await online(nursery, binding="UQ", lifetime=300)
    await trio.sleep(94)
    await server.sup.submit("dev", "GET", "/3/0/1", async_id="a")
    await trio.sleep(200)
    assert server.take() == []
    await trio.sleep(30)  # 300 s lifetime + a small grace
    events = server.take()
    assert ("registrations-expired", "dev") in events
    removed = {"id": "a", "status": 429, "error": "DEVICE_REMOVED_REGISTRATION"}
    assert ("async-responses", removed) in events
    assert "dev" not in server.sup.by_endpoint


async def test_rule_8_3_updates_keep_the_registration(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, lifetime=60)
    for _ in range(10):
        await trio.sleep(30)
        assert (await dev.update()).code == Code.CHANGED
    assert "dev" in server.sup.by_endpoint
    assert [k for k, _ in server.take()] == ["reg-updates"] * 10


# -- 10. The AsyncIDResponse ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "error"),
    [
        (Code.CHANGED, 200, None),
        (Code.BAD_REQUEST, 400, "BAD_REQUEST"),
        (Code.NOT_FOUND, 404, "NOT_FOUND"),
        (Code.METHOD_NOT_ALLOWED, 405, "METHOD_NOT_ALLOWED"),
        (Code.NOT_ACCEPTABLE, 406, "NOT_ACCEPTABLE"),
        (Code.PRECONDITION_FAILED, 412, "PRECONDITION_FAILED"),
        (Code.REQUEST_ENTITY_TOO_LARGE, 413, "REQUEST_ENTITY_TOO_LARGE"),
        (Code.UNSUPPORTED_CONTENT_FORMAT, 415, "UNSUPPORTED_CONTENT_FORMAT"),
        (Code.INTERNAL_SERVER_ERROR, 500, "INTERNAL_SERVER_ERROR"),
        (Code.SERVICE_UNAVAILABLE, 503, "SERVICE_UNAVAILABLE"),
        (Code.GATEWAY_TIMEOUT, 504, "GATEWAY_TIMEOUT"),
    ],
)
async def test_rule_10_status_mapping(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    code: int,
    status: int,
    error: str | None,
) -> None:
    server, dev = await online(nursery, handler=lambda req: (code, b"", None))
    await server.sup.submit("dev", "PUT", "/3/0/1", async_id="a", payload=b"x", content_format=0)
    await trio.sleep(1)
    expected: dict[str, object] = {"id": "a", "status": status}
    if error is not None:
        expected["error"] = error
    assert responses(server)["a"] == expected
    [put] = dev.executed
    assert put.payload == b"x"


# -- 0. Device identity -----------------------------------------------------------------------


async def test_rule_0_updates_only_through_the_registration_they_name(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server, dev = await online(nursery, ep="urn:imei:490154203237518")
    other = Device(server.addr, "intruder")
    await other.start(nursery)
    assert (await other.request(Code.POST, "/rd/0")).code == Code.NOT_FOUND  # a guess
    assert (await other.request(Code.DELETE, "/rd/deadbeef0000")).code == Code.NOT_FOUND
    assert "urn:imei:490154203237518" in server.sup.by_endpoint
    assert len(dev.location.split("/")[-1]) == 12  # 48 random bits
    assert (await dev.update()).code == Code.CHANGED
    await server.sup.submit("urn:imei:490154203237518", "GET", "/3/0/1", async_id="a")
    await trio.sleep(1)
    assert responses(server)["a"]["status"] == 200
