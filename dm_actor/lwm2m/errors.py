"""Typed errors of the LwM2M layer.

Every error a `dm_actor.lwm2m` parser raises derives from `Lwm2mError`, so a caller can trust
that malformed input never escapes as a bare `IndexError` or `UnicodeDecodeError`. The input
errors are also `ValueError`s. Pure: no I/O.
"""

from __future__ import annotations


class Lwm2mError(Exception):
    """Base of every error raised by `dm_actor.lwm2m`."""


class InvalidPath(Lwm2mError, ValueError):
    """Text that is not an LwM2M path such as `/3/0/1`."""


class LinkFormatError(Lwm2mError, ValueError):
    """A payload that is not RFC 6690 link-format, or not an LwM2M object list."""
