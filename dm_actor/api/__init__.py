"""The northbound API: Pelion-compatible REST, notification channels and API keys."""

from __future__ import annotations

from dm_actor.api.auth import ApiKeys, load_api_keys
from dm_actor.api.server import HttpOptions, serve_http

__all__ = ["ApiKeys", "HttpOptions", "load_api_keys", "serve_http"]
