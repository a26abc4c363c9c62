"""API keys: which application a request or a WebSocket belongs to.

An application is identified by a stable id derived from its key (so subscriptions and
channels stored under it survive restarts without storing the key itself). This module reads
and writes only the key file in the data directory; it never logs a key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

#: The environment variable that may hold keys (comma- or space-separated).
ENV_VAR = "DM_ACTOR_API_KEY"
#: The file in the data directory that holds a generated key.
KEY_FILE = "api-key"
_BEARER = b"bearer "
_PELION_PREFIX = "pelion_"


def application_id(key: str) -> str:
    """The application id (32 hex digits, like Pelion's) that owns `key`'s channels."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def generate_key() -> str:
    """A new random key in Pelion's access-key shape (`ak_...`)."""
    return "ak_" + secrets.token_hex(24)


class ApiKeys:
    """The accepted keys, each mapped to its application id (the supervisor's `owner`).

    Attributes:
        generated: the key created by `load_api_keys` on a first start, else None (for the
            caller to print once).
    """

    __slots__ = ("_owners", "generated")

    def __init__(
        self, keys: Iterable[str] | Mapping[str, str], generated: str | None = None
    ) -> None:
        if isinstance(keys, Mapping):
            self._owners: dict[bytes, str] = {k.encode(): v for k, v in keys.items()}
        else:
            self._owners = {k.encode(): application_id(k) for k in keys}
        self.generated = generated

    def __len__(self) -> int:
        return len(self._owners)

    def owner(self, key: str | bytes) -> str | None:
        """The application id of `key`, or None for an unknown key."""
        return self._owners.get(key.encode() if isinstance(key, str) else key)

    def from_authorization(self, value: bytes | None) -> str | None:
        """The application of an `Authorization: Bearer <key>` header value."""
        if value is None or value[:7].lower() != _BEARER:
            return None
        return self._owners.get(value[7:].strip())

    def from_subprotocols(self, offered: Iterable[str]) -> str | None:
        """The application named by a `pelion_<key>` WebSocket subprotocol, if any."""
        for proto in offered:
            if proto.startswith(_PELION_PREFIX):
                owner = self._owners.get(proto[len(_PELION_PREFIX) :].encode())
                if owner is not None:
                    return owner
        return None


def _split(text: str) -> list[str]:
    return [k for k in text.replace(",", " ").split() if k]


def load_api_keys(
    data_dir: str | os.PathLike[str], configured: Iterable[str], env: Mapping[str, str]
) -> ApiKeys:
    """The keys to accept: the configured ones (settings file, `--api-key`) plus
    `DM_ACTOR_API_KEY`; when there are none, the key stored in `data_dir/api-key`, generated
    and stored there (mode 0600) on the first start and reported in `ApiKeys.generated`.

    Raises:
        OSError: the data directory or the key file cannot be read or written.
    """
    keys = [k.strip() for k in configured if k.strip()]
    keys += _split(env.get(ENV_VAR, ""))
    if keys:
        return ApiKeys(list(dict.fromkeys(keys)))
    path = Path(data_dir) / KEY_FILE
    try:
        stored = _split(path.read_text())
    except FileNotFoundError:
        stored = []
    if stored:
        return ApiKeys(stored)
    key = generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return ApiKeys([key], generated=key)
