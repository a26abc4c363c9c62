"""Device credentials at run time: the in-memory index, the store, and the registrations they
end (issue 15).

`Provisioning` is the one writer of the server's `Credentials` index (the registrar reads it
for the identity rules, the DTLS layer for its PSK lookup: `Credentials.psk`). Setting,
replacing or removing an endpoint's credentials writes the store (the caller waits for
`store.durable()` before it answers) and ends the endpoint's registration, if it has one, as
a de-registration (its commands get their AsyncIDResponses, a `de-registrations` event is
published): a device registered over plain CoAP may not stay once it has credentials, and a
session authenticated with credentials that changed may not stay either. Each callable in
`Provisioning.revoked` is then called with the endpoint and its former identity (the DTLS
layer closes that identity's session there). The key is never logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dm_actor.actors.render import registration_item
from dm_actor.credentials import Credential, Credentials, admit, security_mode
from dm_actor.store.base import CredentialRecord, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from dm_actor.actors.device import DeviceActor
    from dm_actor.actors.registry import Registry
    from dm_actor.address import Address
    from dm_actor.lwm2m.registration import Registration, Response

log = logging.getLogger(__name__)


class IdentityRules:
    """The registrar's identity rules (`dm_actor.credentials.admit`), kept here: its base."""

    registry: Registry
    credentials: Credentials

    def session_refusal(self, actor: DeviceActor, addr: Address | None) -> Response | None:
        """`identity_refusal` for a request of `actor`'s that came from `addr` (a session
        address over DTLS; None over TCP)."""
        identity = None if addr is None else self.registry.identity_of(addr)
        return self.identity_refusal(actor.endpoint, identity)

    def identity_refusal(self, endpoint: str, identity: str | None) -> Response | None:
        """The identity rules (`dm_actor.credentials.admit`): 4.03, counted, when `endpoint`
        may not register or update over this transport (`identity` None: plain CoAP)."""
        refusal = admit(self.credentials, endpoint, identity)
        if refusal is None:
            return None
        stats = self.registry.statistics
        stats["credentials_refused"] = stats.get("credentials_refused", 0) + 1
        return refusal.code, ()

    def publish_registration(self, kind: str, reg: Registration) -> None:
        """A `registrations` or `reg-updates` event, with how the device connects."""
        item = registration_item(reg, security_mode(self.credentials, reg.endpoint))
        self.registry.events.publish(kind, item)


class Provisioning:
    """Sets and removes device credentials (`credentials` is the registrar's index)."""

    def __init__(self, registry: Registry, credentials: Credentials) -> None:
        self.registry = registry
        self.credentials = credentials
        #: called with (endpoint, former identity or None) after credentials changed and the
        #: registration ended: the DTLS layer closes the identity's session there
        self.revoked: list[Callable[[str, str | None], None]] = []

    def restore(self, records: Iterable[CredentialRecord]) -> None:
        """Bring back the stored credentials (before serving)."""
        for r in records:
            self.credentials.put(Credential(r.endpoint, r.psk_identity, r.psk_key, r.created_at))

    def end_older_registrations(self, secured: Iterable[str] = ()) -> int:
        """After `restore` and the registrations' restore: end each registration older than
        its endpoint's credentials (they were added by `dm-actor credentials` while the
        server was stopped, so it was made without them), and each of `secured` (made over
        DTLS) whose endpoint has no credentials now (removed while stopped). Returns how
        many ended."""
        registry = self.registry
        offset = registry.wall_offset
        ended = 0
        for endpoint in secured:
            if endpoint not in self.credentials:
                ended += self.end_registration(endpoint, None)
        for cred in self.credentials.records():
            actor = registry.by_endpoint.get(cred.endpoint)
            if actor is not None and actor.reg.updated_at + offset < cred.created_at:
                ended += self.end_registration(cred.endpoint, None)
        return ended

    def set(self, endpoint: str, identity: str, key: bytes) -> tuple[Credential, bool]:
        """Give `endpoint` these credentials; returns them and whether anything changed
        (the same identity and key again change nothing, and end nothing). Wait for
        `store.durable()` before answering.

        Raises:
            IdentityTaken: `identity` belongs to another endpoint; nothing changed.
        """
        creds = self.credentials
        creds.check(endpoint, identity)
        old = creds.of_endpoint(endpoint)
        if old is not None and old.identity == identity and old.key == key:
            return old, False
        record = Credential(
            endpoint, identity, key, self.registry.wall_offset + self.registry.now()
        )
        creds.put(record)
        self.registry.store.put_credential(
            CredentialRecord(endpoint, identity, key, record.created_at)
        )
        log.info(
            "credentials of %s %s (PSK identity %r)",
            endpoint, "replaced" if old is not None else "added", identity,
        )  # fmt: skip
        self.end_registration(endpoint, None if old is None else old.identity)
        return record, True

    def remove(self, endpoint: str) -> Credential | None:
        """Forget `endpoint`'s credentials and end its registration; the removed ones, or
        None when it had none. Wait for `store.durable()` before answering."""
        old = self.credentials.remove(endpoint)
        if old is None:
            return None
        self.registry.store.delete_credential(endpoint)
        log.info("credentials of %s removed (PSK identity %r)", endpoint, old.identity)
        self.end_registration(endpoint, old.identity)
        return old

    def end_registration(self, endpoint: str, identity: str | None) -> bool:
        """End `endpoint`'s registration as a de-registration (if it has one), then tell
        `revoked`. True if a registration ended."""
        registry = self.registry
        actor = registry.by_endpoint.get(endpoint)
        ended = False
        if actor is not None and not actor.mailbox.closed:
            log.info("registration of %s ended: its credentials changed", endpoint)
            try:
                actor.end(registry.now(), expired=False)
            except StoreError:
                raise
            except Exception as exc:  # its state is broken: contained as a peer's failure
                registry.contain(actor, exc, "the end of its registration")
            ended = True
        for hook in self.revoked:
            hook(endpoint, identity)
        return ended
