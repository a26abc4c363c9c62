"""The log's two formats: text (the default) and JSON lines (`--log-format json`).

A JSON line is one object: `time` (UTC, ISO 8601 with milliseconds), `level`, `logger`,
`message`, and, where the record has one, `request_id`, `endpoint` and `async_id` (from
logging's `extra=`, or else from `LOG_CONTEXT`, which the HTTP server sets for the request
it is answering), and `exception` (the traceback's text). Nothing here is configured at
import; `cli` installs the formatter.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Protocol
from urllib.parse import parse_qsl, unquote

import msgspec


class Context(Protocol):
    """What `LOG_CONTEXT` holds: a field's value by name, or None (a dict is one)."""

    def get(self, name: str, /) -> str | None: ...


#: the fields of the request being handled in this task (the HTTP server sets them per
#: request; a device-side task may set `endpoint`)
LOG_CONTEXT: ContextVar[Context | None] = ContextVar("dm_actor_log_context", default=None)
CONTEXT_FIELDS = ("request_id", "endpoint", "async_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in a message are escaped)."""

    _encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.gmtime(record.created)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", seconds)
        out: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = LOG_CONTEXT.get()
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is None and context is not None:
                try:
                    value = context.get(name)
                except Exception:  # (a field never costs the record: the line is written)
                    value = None
            if value is not None:
                out[name] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(out).decode()


_DEVICE_ROUTES = frozenset(("device-requests", "endpoints", "subscriptions"))


class RequestLog:
    """The log fields of an HTTP request, worked out only when a record is written: the
    endpoint name in its path (`/v2/device-requests/{device-id}`, `/v2/endpoints/...`,
    `/v2/subscriptions/...`, `/v3/devices/{id}`), its `async-id` parameter, and the request
    id when the server gives one (`request_id`)."""

    __slots__ = ("request_id", "target")

    def __init__(self, target: bytes, request_id: str | None = None) -> None:
        self.target = target
        self.request_id = request_id

    def get(self, name: str, /) -> str | None:
        if name == "request_id":
            return self.request_id
        path, _, query = self.target.decode("ascii", "replace").partition("?")
        if name == "async_id":
            return dict(parse_qsl(query)).get("async-id") if "async-id=" in query else None
        if name == "endpoint":
            seg = path.split("/")[1:]  # (any target: `/v2`, `x` and `*` have fewer than 3)
            if len(seg) < 3 or seg[2] == "":
                return None
            if (seg[0] == "v2" and seg[1] in _DEVICE_ROUTES) or seg[:2] == ["v3", "devices"]:
                return unquote(seg[2])
        return None


def formatter(kind: str) -> logging.Formatter:
    """The formatter of `--log-format kind` ("text" or "json")."""
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)
