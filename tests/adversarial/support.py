"""What the attacks on a real daemon share: the timed authenticated request, and room for
the attacking process's own descriptors."""

from __future__ import annotations

import resource


def authenticated_get(key: str) -> bytes:
    """One `GET /v3/devices?limit=2` with `key`, on a connection it closes."""
    return (
        b"GET /v3/devices?limit=2 HTTP/1.1\r\nHost: dm-actor\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\nConnection: close\r\n\r\n"
    )


def raise_descriptor_limit(wanted: int) -> None:
    """This process (and a daemon it starts, which inherits it) needs a descriptor per
    connection: raise the soft limit towards `wanted`, within the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
