"""API keys: which application (or administrator) a request or a WebSocket belongs to.

An application is identified by a stable id derived from its key (so subscriptions and
channels stored under it survive restarts without storing the key itself). An administrator
key (`--admin-key`, `DM_ACTOR_ADMIN_KEY`, `[api] admin_keys`) is not an application's: it
owns no channel; its id starts with `ADMIN_PREFIX` (`is_admin`), so a handler tells the two
apart from the id alone. This module reads and writes only the key file in the data
directory; it never logs a key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

#: The environment variable that may hold keys (comma- or space-separated).
ENV_VAR = "DM_ACTOR_API_KEY"
#: The environment variable that may hold administrator keys (comma- or space-separated).
ADMIN_ENV_VAR = "DM_ACTOR_ADMIN_KEY"
#: The start of every administrator's id (an application id is 32 hex digits).
ADMIN_PREFIX = "admin-"
#: The file in the data directory that holds a generated key.
KEY_FILE = "api-key"
_BEARER = b"bearer "
_PELION_PREFIX = "pelion_"


def application_id(key: str) -> str:
    """The application id (32 hex digits, like Pelion's) that owns `key`'s channels."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def admin_id(key: str) -> str:
    """The id of an administrator key: `admin-` and 32 hex digits (never an application's)."""
    return ADMIN_PREFIX + application_id(key)


def is_admin(owner: str) -> bool:
    """Whether `owner` (an id `ApiKeys` gave) is an administrator's."""
    return owner.startswith(ADMIN_PREFIX)


def generate_key() -> str:
    """A new random key in Pelion's access-key shape (`ak_...`)."""
    return "ak_" + secrets.token_hex(24)


class ApiKeys:
    """The accepted keys, each mapped to its application id (the supervisor's `owner`), and
    the administrator keys, each mapped to its `admin_id`. A key given both ways is an
    administrator's only.

    Attributes:
        generated: the key created by `load_api_keys` on a first start, else None (for the
            caller to print once).
    """

    __slots__ = ("_owners", "generated")

    def __init__(
        self,
        keys: Iterable[str] | Mapping[str, str],
        generated: str | None = None,
        admin_keys: Iterable[str] = (),
    ) -> None:
        if isinstance(keys, Mapping):
            self._owners: dict[bytes, str] = {k.encode(): v for k, v in keys.items()}
        else:
            self._owners = {k.encode(): application_id(k) for k in keys}
        for key in admin_keys:
            self._owners[key.encode()] = admin_id(key)
        self.generated = generated

    def __len__(self) -> int:
        return len(self._owners)

    def applications(self) -> set[str]:
        """The applications these keys belong to (administrators' ids not included)."""
        return {owner for owner in self._owners.values() if not is_admin(owner)}

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
    data_dir: str | os.PathLike[str],
    configured: Iterable[str],
    env: Mapping[str, str],
    admin_keys: Iterable[str] = (),
) -> ApiKeys:
    """The keys to accept: the configured ones (settings file, `--api-key`) plus
    `DM_ACTOR_API_KEY`; when there are none, the key stored in `data_dir/api-key`, generated
    and stored there (mode 0600) on the first start and reported in `ApiKeys.generated`.
    Administrator keys: `admin_keys` (`[api] admin_keys`, `--admin-key`) plus
    `DM_ACTOR_ADMIN_KEY`; none is ever generated.

    Raises:
        OSError: the data directory or the key file cannot be read or written.
    """
    admins = [k.strip() for k in admin_keys if k.strip()]
    admins += _split(env.get(ADMIN_ENV_VAR, ""))
    keys = [k.strip() for k in configured if k.strip()]
    keys += _split(env.get(ENV_VAR, ""))
    if keys:
        return ApiKeys(list(dict.fromkeys(keys)), admin_keys=admins)
    path = Path(data_dir) / KEY_FILE
    try:
        stored = _split(path.read_text())
    except FileNotFoundError:
        stored = []
    if stored:
        return ApiKeys(stored, admin_keys=admins)
    key = generate_key()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return ApiKeys([key], generated=key, admin_keys=admins)
