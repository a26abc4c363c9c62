"""`--log-format json`: every line a real `dm-actor serve` writes is one JSON object with
time, level, logger and message (and the request's fields where there are some); the text
format stays the default. The formatter's fields from `extra=` and from the request's
context are checked in-process."""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import TYPE_CHECKING

import trio

from dm_actor import logformat
from dm_actor.coap.numbers import Code
from tests.actors.support import Device
from tests.daemon import Daemon, free_ports, request

if TYPE_CHECKING:
    from pathlib import Path

KEY = "ak_log_format_test"
ADMIN = "ak_log_format_admin"
FIELDS = {"time", "level", "logger", "message"}


async def run_daemon(tmp_path: Path, *flags: str) -> tuple[int, str]:
    """Start a daemon, register a device, send it a command and a few bad requests, stop it
    with SIGTERM; (exit code, its log)."""
    coap, http = free_ports(2)
    args = ["--host", "127.0.0.1", "--coap-port", str(coap), "--http-port", str(http),
            "--data-dir", str(tmp_path / "data"), "--api-key", KEY, "--admin-key", ADMIN,
            *flags]  # fmt: skip
    daemon = Daemon(args, ("127.0.0.1", http), tmp_path / "log")
    await daemon.start()
    try:
        with trio.fail_after(20):
            await daemon.ready()
            async with trio.open_nursery() as nursery:
                dev = Device(("127.0.0.1", coap), "d1")
                await dev.start(nursery)
                assert (await dev.register()).code == Code.CREATED
                body = {"method": "GET", "uri": "/3/0/0"}
                target = "/v2/device-requests/d1?async-id=a1"
                status, _ = await request(daemon.http, "POST", target, KEY, body)
                assert status == 202
                status, _ = await request(daemon.http, "GET", "/v3/devices", "wrong-key")
                assert status == 401
                status, _ = await request(daemon.http, "GET", "/metrics", ADMIN)
                assert status == 200
                assert (await dev.deregister()).code == Code.DELETED
                nursery.cancel_scope.cancel()
            proc = daemon.proc
            assert proc is not None
            proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
            daemon.proc = None
    finally:
        await daemon.kill()
    return code, daemon.log.read_text()


async def test_every_line_of_a_real_run_is_a_json_object(tmp_path: Path) -> None:
    code, log = await run_daemon(tmp_path, "--log-format", "json", "--log-level", "debug")
    assert code == 0, log
    lines = log.splitlines()
    assert len(lines) >= 5, log
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    for rec in records:
        assert isinstance(rec, dict)
        assert rec.keys() >= FIELDS, rec
        assert rec["time"].endswith("Z") and rec["time"][10] == "T"
        assert rec["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    messages = [r["message"] for r in records]
    assert any(m.startswith("HTTP listening on") for m in messages), messages
    assert any("stopping" in m for m in messages), messages
    assert {r["logger"] for r in records} >= {"dm_actor.api.server", "dm_actor.cli"}
    # the server's debug line about the command carries its request id, device and async-id
    about = [r for r in records if "/v2/device-requests/d1?async-id=a1" in r["message"]]
    assert about, messages
    for rec in about:
        assert (rec["endpoint"], rec["async_id"]) == ("d1", "a1"), rec
        assert len(rec["request_id"]) == 32 and rec["request_id"] in rec["message"], rec


async def test_text_stays_the_default(tmp_path: Path) -> None:
    code, log = await run_daemon(tmp_path)
    assert code == 0, log
    first = log.splitlines()[0]
    assert not first.startswith("{")
    assert " INFO dm_actor." in first


def record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("dm_actor.test", logging.WARNING, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_the_request_fields_come_from_extra_or_the_request_context() -> None:
    fmt = logformat.JsonFormatter()
    plain = json.loads(fmt.format(record("one\ntwo")))
    assert plain.keys() == FIELDS
    assert plain["message"] == "one\ntwo"  # one line: the newline is escaped
    assert "\n" not in fmt.format(record("one\ntwo"))
    token = logformat.LOG_CONTEXT.set(
        logformat.RequestLog(b"/v2/device-requests/ep%201?async-id=x7&retry=2", "r-1")
    )
    try:
        shown = json.loads(fmt.format(record("accepted")))
        assert (shown["endpoint"], shown["async_id"], shown["request_id"]) == ("ep 1", "x7", "r-1")
        other = json.loads(fmt.format(record("m", endpoint="ep9", async_id="a9")))
        assert (other["endpoint"], other["async_id"]) == ("ep9", "a9")  # extra= wins
    finally:
        logformat.LOG_CONTEXT.reset(token)
    token = logformat.LOG_CONTEXT.set(logformat.RequestLog(b"/v3/devices/dev-2"))
    try:
        shown = json.loads(fmt.format(record("read")))
        assert shown["endpoint"] == "dev-2" and "async_id" not in shown
    finally:
        logformat.LOG_CONTEXT.reset(token)
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("failed", exc_info=sys.exc_info())
    assert "ValueError: boom" in json.loads(fmt.format(failed))["exception"]
