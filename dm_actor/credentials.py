"""Device credentials: which PSK identity (and key) belongs to which endpoint name, and the
identity rules a registration must pass. Pure: no I/O, no clock, no Trio.

Each PSK identity belongs to one endpoint name, and an endpoint has at most one identity.
`Credentials` is the index the server keeps in memory (restored from the store's
`credentials` table): the DTLS layer's PSK lookup (`Credentials.psk`, identity -> key) and
the registrar's rules (`admit`) read it; the credentials API and `dm-actor credentials`
write it (`Credentials.put` / `Credentials.remove`), refusing an identity another endpoint
holds (`IdentityTaken`, HTTP 409).

The identity rules (issue 15; `admit`):

- A Register over a DTLS session whose identity belongs to another endpoint (or to none) is
  refused 4.03 and changes nothing.
- An endpoint that has credentials is never accepted over plain CoAP (UDP or TCP): 4.03.
- An endpoint without credentials is accepted over plain CoAP as before.

The key material is never part of a `repr`, a log line or an API answer.
"""

from __future__ import annotations

from typing import NamedTuple

from dm_actor.coap.numbers import Code

#: bytes of a PSK identity (UTF-8) accepted by the API and the CLI (RFC 4279 allows up to
#: 2^16 - 1; LwM2M clients use short names)
MAX_IDENTITY = 128
#: bytes of a PSK key (AES-128-CCM-8's PSK suites need 16 at least: RFC 4279 section 5.1
#: allows up to 64)
MIN_KEY, MAX_KEY = 16, 64


class Credential(NamedTuple):
    """One endpoint's PSK credentials; `created_at` is wall-clock time (seconds)."""

    endpoint: str
    identity: str
    key: bytes
    created_at: float

    def __repr__(self) -> str:  # never the key
        size = len(self.key)
        return f"Credential({self.endpoint!r}, identity={self.identity!r}, key=<{size} bytes>)"


class IdentityTaken(Exception):
    """The PSK identity belongs to another endpoint (`holder`)."""

    def __init__(self, identity: str, holder: str) -> None:
        super().__init__(f"PSK identity {identity!r} belongs to endpoint {holder!r}")
        self.identity = identity
        self.holder = holder


class CredentialError(ValueError):
    """A credential the API or the CLI refuses (HTTP 400): `field` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def validate(endpoint: str, identity: object, key_hex: object) -> tuple[str, bytes]:
    """The identity and the key bytes of a credential given as text (the API's JSON, the
    CLI's flags).

    Raises:
        CredentialError: an empty endpoint name, an identity that is not 1..128 bytes of
            UTF-8 text, or a key that is not 16..64 bytes written in hex.
    """
    if not endpoint or len(endpoint.encode("utf-8", "surrogatepass")) > 256:
        raise CredentialError("endpoint", "the endpoint name must be 1..256 bytes")
    if not isinstance(identity, str):
        raise CredentialError("psk_identity", "psk_identity must be a string")
    try:
        size = len(identity.encode("utf-8"))
    except UnicodeEncodeError:
        raise CredentialError("psk_identity", "psk_identity must be UTF-8 text") from None
    if not 1 <= size <= MAX_IDENTITY:
        raise CredentialError("psk_identity", f"psk_identity must be 1..{MAX_IDENTITY} bytes")
    if not isinstance(key_hex, str):
        raise CredentialError("psk_key", "psk_key must be a string of hex digits")
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise CredentialError("psk_key", "psk_key must be hex digits") from None
    if not MIN_KEY <= len(key) <= MAX_KEY:
        raise CredentialError("psk_key", f"psk_key must be {MIN_KEY}..{MAX_KEY} bytes")
    return identity, key


class Credentials:
    """The PSK identities and keys of every endpoint that has credentials (in memory)."""

    __slots__ = ("_by_endpoint", "_by_identity")

    def __init__(self, records: list[Credential] | tuple[Credential, ...] = ()) -> None:
        self._by_identity: dict[str, Credential] = {}
        self._by_endpoint: dict[str, Credential] = {}
        for record in records:
            self.put(record)

    def __len__(self) -> int:
        return len(self._by_endpoint)

    def __contains__(self, endpoint: object) -> bool:
        """Whether `endpoint` has credentials (then plain CoAP is refused for it)."""
        return endpoint in self._by_endpoint

    def records(self) -> list[Credential]:
        """Every credential, by endpoint name."""
        return [self._by_endpoint[ep] for ep in sorted(self._by_endpoint)]

    def of_endpoint(self, endpoint: str) -> Credential | None:
        return self._by_endpoint.get(endpoint)

    def of_identity(self, identity: str) -> Credential | None:
        return self._by_identity.get(identity)

    def endpoint_of(self, identity: str) -> str | None:
        """The endpoint name `identity` belongs to, or None."""
        record = self._by_identity.get(identity)
        return None if record is None else record.endpoint

    def psk(self, identity: bytes) -> bytes | None:
        """The DTLS layer's PSK lookup: the key of `identity` (as sent in the
        ClientKeyExchange), or None for an identity that is unknown or not UTF-8."""
        try:
            record = self._by_identity.get(identity.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        return None if record is None else record.key

    def check(self, endpoint: str, identity: str) -> None:
        """Whether `endpoint` may take `identity`.

        Raises:
            IdentityTaken: `identity` belongs to another endpoint.
        """
        holder = self._by_identity.get(identity)
        if holder is not None and holder.endpoint != endpoint:
            raise IdentityTaken(identity, holder.endpoint)

    def put(self, record: Credential) -> Credential | None:
        """Give `record.endpoint` these credentials (replacing its earlier ones, returned).

        Raises:
            IdentityTaken: the identity belongs to another endpoint; nothing changed.
        """
        self.check(record.endpoint, record.identity)
        old = self._by_endpoint.get(record.endpoint)
        if old is not None:
            del self._by_identity[old.identity]
        self._by_endpoint[record.endpoint] = record
        self._by_identity[record.identity] = record
        return old

    def remove(self, endpoint: str) -> Credential | None:
        """Forget `endpoint`'s credentials; the removed ones, or None if it had none."""
        old = self._by_endpoint.pop(endpoint, None)
        if old is not None:
            del self._by_identity[old.identity]
        return old


def security_mode(credentials: Credentials, endpoint: str) -> str:
    """How `endpoint` connects, as LwM2M's Security Mode names it: "psk" when it has
    credentials (it is then accepted over DTLS only), else "nosec" (plain CoAP)."""
    return "psk" if endpoint in credentials else "nosec"


class Refusal(NamedTuple):
    """Why a registration request is refused by the identity rules (`admit`)."""

    code: int
    reason: str


#: an endpoint with credentials over plain CoAP
NEEDS_DTLS = "the endpoint has device credentials: only its DTLS session is accepted"


def admit(credentials: Credentials, endpoint: str, identity: str | None) -> Refusal | None:
    """The identity rules for a Register or an Update of `endpoint`, arriving over a DTLS
    session authenticated as PSK `identity` (None: plain CoAP, UDP or TCP). None: accepted;
    else the 4.03 to answer, and nothing may change.
    """
    if identity is None:
        if endpoint in credentials:
            return Refusal(Code.FORBIDDEN, NEEDS_DTLS)
        return None
    holder = credentials.endpoint_of(identity)
    if holder is None:
        return Refusal(Code.FORBIDDEN, f"PSK identity {identity!r} has no endpoint")
    if holder != endpoint:
        return Refusal(Code.FORBIDDEN, f"PSK identity {identity!r} belongs to another endpoint")
    return None
