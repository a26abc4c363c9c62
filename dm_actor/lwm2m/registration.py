"""The LwM2M registration interface: Register, Update and De-register as pure functions.

Owns reading the interface's requests from decoded CoAP messages (`classify`, `parse_register`,
`parse_update`, `parse_deregister`), the `Registration` value they produce, the responses the
server sends back, and the update timing real clients use (`update_interval`).

Never owns the registry: looking registrations up, issuing registration ids and answering 4.04
for an unknown id are the caller's. Times come in as `now`; nothing here reads a clock or does
I/O. A parser never raises on bad input: it returns a `RegistrationError` carrying the CoAP
response code (LwM2M 1.1 TS 6.2 and Leshan's `RegistrationHandler`):

- 4.00 Bad Request: a missing or malformed parameter (`ep`, `lt`, `b`, `sms`, `Q`, a repeated
  parameter), a lifetime above the server's maximum, or a payload that is not link-format.
  An endpoint name (and an endpoint type) is 1..255 bytes of printable characters without
  spaces, `/`, `\\`, `?`, `#` or `%`, and not `.` or `..`: it names the device in the REST
  API's paths, log lines and file-like tools, so nothing that changes a path's meaning.
- 4.03 Forbidden is the caller's, for an endpoint the server refuses (none yet).
- 4.02 Bad Option: a part of object links sent in blocks (Block1, RFC 7959) that was not
  reassembled (the server reassembles them first: docs/api.md, "Device compatibility").
- 4.13 Request Entity Too Large: an object list of more links than the server takes.
- 4.12 Precondition Failed: an `lwm2m` version other than 1.0 or 1.1. LwM2M 1.2 is refused on
  purpose: what a 1.2 client may rely on (the `edge`, `con` and `hqmax` notification
  attributes, LwM2M Gateway prefixed paths, Bootstrap-Pack) is not implemented, and a 1.2
  client answered 4.12 registers again as 1.1 (Anjay does; docs/operations.md, "Device
  compatibility").
- 4.15 Unsupported Content-Format: a payload that is declared as anything but link-format.

Query parameters this module does not know (Pelion's `aid`, `iep`, `est`, ...) are ignored, as
are options such as the Uri-Port that libcoap adds.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from dm_actor.coap.errors import DecodeError
from dm_actor.coap.numbers import Code, ContentFormat, OptionNumber, is_request
from dm_actor.lwm2m.content import CODECS
from dm_actor.lwm2m.errors import LinkFormatError
from dm_actor.lwm2m.link_format import RegisteredObjects, shared_registered_objects

if TYPE_CHECKING:
    from dm_actor.coap.message import Message, Option
    from dm_actor.lwm2m.path import Path

#: LwM2M versions the server accepts; a Register without `lwm2m=` is 1.0. Others get 4.12,
#: after which a 1.2 client falls back to 1.1 (see the module docstring).
SUPPORTED_VERSIONS: tuple[str, ...] = ("1.0", "1.1")
MAX_LIFETIME = 0xFFFFFFFF
#: the most links a Register or Update may carry by default (more: 4.13), all kinds counted
MAX_LINKS = 512
#: CoAP's MAX_TRANSMIT_WAIT with the default parameters (RFC 7252 4.8.2).
MAX_TRANSMIT_WAIT = 93.0

#: What `classify` recognises. `bootstrap` (`/bs`) and `send` (`/dp`) are not served here.
Interface = Literal["register", "update", "deregister", "bootstrap", "send"]
#: A response as `(code, options)`, for the caller to frame for its transport.
Response = tuple[int, tuple["Option", ...]]

_VERSIONS = {v: v for v in SUPPORTED_VERSIONS}
_TRANSPORTS_1_0 = frozenset("UST")  # T is not LwM2M 1.0, but TCP clients send it
_TRANSPORTS_1_1 = frozenset("UTSN")
_KNOWN_PARAMS = frozenset(("ep", "lt", "lwm2m", "b", "sms", "Q", "et"))  # et: Pelion's type
_LOCATION_PATH = OptionNumber.LOCATION_PATH.value
_BLOCK1 = OptionNumber.BLOCK1.value
_POST = Code.POST.value
_DELETE = Code.DELETE.value

#: The formats that carry several values (an object, an instance, a multiple resource), in the
#: order the server asks for them when a device announces more than one: SenML first, as its
#: records carry each value's type (TLV and the pre-1.1 LwM2M JSON leave the bytes untyped
#: for the applications), CBOR before JSON as it is smaller. Only formats the server decodes.
PREFERRED_FORMATS: tuple[int, ...] = tuple(
    int(cf)
    for cf in (
        ContentFormat.SENML_CBOR,
        ContentFormat.SENML_JSON,
        ContentFormat.LWM2M_CBOR,
        ContentFormat.LWM2M_TLV,
        ContentFormat.LWM2M_JSON,
        ContentFormat.LWM2M_TLV_LEGACY,
        ContentFormat.LWM2M_JSON_LEGACY,
    )
    if cf in CODECS
)
_TLV = ContentFormat.LWM2M_TLV.value


@dataclass(frozen=True, slots=True)
class RegistrationError:
    """A refused registration request: `code` is the CoAP response code to answer with."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """A valid `POST /rd?ep=...`.

    Attributes:
        binding: the `b` parameter as sent (`"U"` when absent), Q included.
        queue_mode: Q in `b` (LwM2M 1.0) or the `Q` parameter (LwM2M 1.1+).
        sms: the MSISDN, or None.
        endpoint_type: the `et` parameter (Pelion's endpoint type, e.g. `default`), or None.
    """

    endpoint: str
    lifetime: int
    lwm2m_version: str
    binding: str
    queue_mode: bool
    sms: str | None
    objects: RegisteredObjects
    endpoint_type: str | None = None

    @property
    def transports(self) -> str:
        """The binding's transport letters (`U`, `T`, `S`, `N`) without Q."""
        return self.binding.replace("Q", "")


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """A valid `POST /rd/{reg_id}`; None means "not sent, keep what the registration has".

    `queue_mode` is True for `Q` in `b` or a `Q` parameter, False for a `b` without Q, None when
    neither was sent.
    """

    reg_id: str
    lifetime: int | None = None
    binding: str | None = None
    queue_mode: bool | None = None
    sms: str | None = None
    objects: RegisteredObjects | None = None


@dataclass(frozen=True, slots=True)
class DeregisterRequest:
    """A `DELETE /rd/{reg_id}`."""

    reg_id: str


@dataclass(frozen=True, slots=True)
class Registration:
    """One device's registration. `registered_at` and `updated_at` are the caller's `now`."""

    endpoint: str
    reg_id: str
    lifetime: int
    lwm2m_version: str
    binding: str
    queue_mode: bool
    sms: str | None
    objects: RegisteredObjects
    registered_at: float
    updated_at: float
    endpoint_type: str | None = None

    @classmethod
    def from_request(cls, request: RegisterRequest, reg_id: str, now: float) -> Registration:
        """The registration a successful Register creates."""
        return cls(
            endpoint=request.endpoint,
            reg_id=reg_id,
            lifetime=request.lifetime,
            lwm2m_version=request.lwm2m_version,
            binding=request.binding,
            queue_mode=request.queue_mode,
            sms=request.sms,
            objects=request.objects,
            registered_at=now,
            updated_at=now,
            endpoint_type=request.endpoint_type,
        )

    @property
    def transports(self) -> str:
        """The binding's transport letters (`U`, `T`, `S`, `N`) without Q."""
        return self.binding.replace("Q", "")

    def expires_at(self, grace: float = 0.0) -> float:
        """When the registration lapses without an Update: last update + lifetime + grace."""
        return self.updated_at + self.lifetime + grace

    def preferred_accept(self, path: Path) -> int | None:
        """The Accept for a Read or Observe of `path` when the application names no format.

        Pure and cheap (nothing is stored per device: it reads the shared `objects`).

        1. The device announced formats on its root link (`</>;ct=110`, `ct="110 112"`): the
           first of `PREFERRED_FORMATS` among them, for every path, single resources too
           (Wakaama built with SenML JSON only answers a read without Accept with 5.00, as it
           defaults to the TLV it lacks, for `/3/0/0` as for `/3/0`).
        2. Else LwM2M 1.0: TLV (11542) for an object or an instance, which 1.0 clients must
           support for them; None for a resource or resource instance, which a 1.0 client
           answers as text/plain or opaque (TLV for a multiple resource) by itself.
        3. Else (1.1, nothing announced): None. 1.1 made TLV optional and makes no multi-value
           format mandatory, so any format asked for blind may be refused with 4.06, while a
           client left to choose picks one it has (Anjay: SenML CBOR, else SenML JSON, else
           TLV; text/plain for a single resource). The server decodes all of them.

        Only for GET (Read, Observe); Discover asks for link-format (40) itself, and the
        methods that send a body say its Content-Format instead.
        """
        announced = self.objects.content_formats
        if announced:
            for cf in PREFERRED_FORMATS:
                if cf in announced:
                    return cf
        if self.lwm2m_version == "1.0" and path.resource_id is None:
            return _TLV
        return None

    def apply_update(self, update: UpdateRequest, now: float) -> Registration:
        """The registration after `update` at `now`.

        Queue mode follows the version's rules: in LwM2M 1.0 it is part of the binding, so a new
        `b` without Q turns it off; from 1.1 on Q is a Register parameter, so an Update can turn
        it on but not off (the client registers again for that).
        """
        queue_mode = self.queue_mode
        if update.queue_mode or (update.queue_mode is False and self.lwm2m_version == "1.0"):
            queue_mode = update.queue_mode
        return replace(
            self,
            lifetime=self.lifetime if update.lifetime is None else update.lifetime,
            binding=self.binding if update.binding is None else update.binding,
            queue_mode=queue_mode,
            sms=self.sms if update.sms is None else update.sms,
            objects=self.objects if update.objects is None else update.objects,
            updated_at=now,
        )


# -- parsing ----------------------------------------------------------------------------------


def classify(msg: Message) -> Interface | None:
    """Which registration-interface operation a request is, by method and Uri-Path.

    `POST /rd` is a Register, `POST /rd/{id}` an Update, `DELETE /rd/{id}` a De-register.
    `/bs...` is reported as `"bootstrap"` and `/dp...` as `"send"`, which this server does not
    serve (answer 4.04). Anything else, responses included, is None.
    """
    if not is_request(msg.code):
        return None
    try:
        path = msg.uri_path
    except DecodeError:
        return None
    if not path:
        return None
    head = path[0]
    if head == "rd":
        if len(path) == 1:
            return "register" if msg.code == _POST else None
        if len(path) == 2 and path[1]:
            if msg.code == _POST:
                return "update"
            if msg.code == _DELETE:
                return "deregister"
        return None
    if head == "bs":
        return "bootstrap"
    if head == "dp":
        return "send"
    return None


def parse_register(
    msg: Message,
    default_lifetime: int = 86400,
    max_lifetime: int = MAX_LIFETIME,
    max_links: int = MAX_LINKS,
) -> RegisterRequest | RegistrationError:
    """Read a Register (`POST /rd?ep=&lt=&lwm2m=&b=&sms=&Q&et=` with link-format objects).

    Args:
        msg: the decoded request.
        default_lifetime: the lifetime when `lt` is absent (the `lifetime` setting).
        max_lifetime: the longest lifetime accepted (longer: 4.00).
        max_links: the most object links accepted (more: 4.13).

    Returns:
        The request, or the error to answer with (see the module docstring for the codes).
    """
    try:
        if msg.code != _POST:
            raise _Refusal(Code.METHOD_NOT_ALLOWED, "Register is a POST")
        params = _query(msg)
        endpoint = params.get("ep")
        if not endpoint:
            raise _Refusal(Code.BAD_REQUEST, "missing endpoint name (ep)")
        _check_name("ep", endpoint)
        version = "1.0"
        if "lwm2m" in params:
            raw_version = params["lwm2m"]
            found = _VERSIONS.get(raw_version or "")
            if found is None:
                raise _Refusal(
                    Code.PRECONDITION_FAILED, f"unsupported lwm2m version {raw_version!r}"
                )
            version = found
        lifetime = _lifetime(params, max_lifetime)
        binding = _binding(params, _TRANSPORTS_1_0 if version == "1.0" else _TRANSPORTS_1_1)
        sms = _sms(params)
        queue = _queue_param(params)
        endpoint_type = params.get("et") or None  # (few distinct values: shared strings)
        if endpoint_type is not None:
            _check_name("et", endpoint_type)
        if not msg.payload:
            raise _Refusal(Code.BAD_REQUEST, "Register without object links")
        objects = _objects(msg, max_links)
    except _Refusal as refusal:
        return refusal.error
    binding = binding or "U"
    return RegisterRequest(
        endpoint=endpoint,
        lifetime=default_lifetime if lifetime is None else lifetime,
        lwm2m_version=version,
        binding=binding,
        queue_mode=queue or "Q" in binding,
        sms=sms,
        objects=objects,
        endpoint_type=None if endpoint_type is None else sys.intern(endpoint_type),
    )


def parse_update(
    msg: Message, max_lifetime: int = MAX_LIFETIME, max_links: int = MAX_LINKS
) -> UpdateRequest | RegistrationError:
    """Read an Update (`POST /rd/{id}?lt=&b=&sms=&Q`, optional link-format payload).

    Whether `{id}` names a registration is for the caller to check (4.04 when it does not).
    """
    try:
        reg_id = _reg_id(msg, _POST)
        params = _query(msg)
        lifetime = _lifetime(params, max_lifetime)
        binding = _binding(params, _TRANSPORTS_1_1 | _TRANSPORTS_1_0)
        sms = _sms(params)
        queue = _queue_param(params)
        objects = _objects(msg, max_links) if msg.payload else None
    except _Refusal as refusal:
        return refusal.error
    queue_mode: bool | None = None
    if queue or (binding is not None and "Q" in binding):
        queue_mode = True
    elif binding is not None:
        queue_mode = False
    return UpdateRequest(
        reg_id=reg_id,
        lifetime=lifetime,
        binding=binding,
        queue_mode=queue_mode,
        sms=sms,
        objects=objects,
    )


def parse_deregister(msg: Message) -> DeregisterRequest | RegistrationError:
    """Read a De-register (`DELETE /rd/{id}`); the caller checks that `{id}` exists."""
    try:
        return DeregisterRequest(_reg_id(msg, _DELETE))
    except _Refusal as refusal:
        return refusal.error


class _Refusal(Exception):
    """Internal: unwinds a parser to its entry point, which returns `error`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.error = RegistrationError(code, reason)


def _reg_id(msg: Message, method: int) -> str:
    try:
        path = msg.uri_path
    except DecodeError:
        raise _Refusal(Code.BAD_REQUEST, "Uri-Path is not UTF-8") from None
    if len(path) != 2 or path[0] != "rd" or not path[1]:
        raise _Refusal(Code.NOT_FOUND, "not a registration path /rd/{id}")
    if msg.code != method:
        raise _Refusal(Code.METHOD_NOT_ALLOWED, "method not allowed on /rd/{id}")
    return path[1]


def _query(msg: Message) -> dict[str, str | None]:
    try:
        items = msg.uri_query
    except DecodeError:
        raise _Refusal(Code.BAD_REQUEST, "Uri-Query is not UTF-8") from None
    params: dict[str, str | None] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if name in _KNOWN_PARAMS:
            if name in params:
                raise _Refusal(Code.BAD_REQUEST, f"parameter {name!r} repeated")
            params[name] = value if eq else None
    return params


def _lifetime(params: dict[str, str | None], max_lifetime: int) -> int | None:
    if "lt" not in params:
        return None
    raw = params["lt"] or ""
    lifetime = _lifetime_value(raw)
    if lifetime is None:
        raise _Refusal(Code.BAD_REQUEST, f"lifetime lt={raw[:16]!r} is not 1..2^32-1")
    if lifetime > max_lifetime:
        raise _Refusal(
            Code.BAD_REQUEST, f"lifetime lt={lifetime} is over the server's maximum {max_lifetime}"
        )
    return lifetime


_NAME_FORBIDDEN = frozenset(" /\\?#%")


def _name_ok(name: str) -> bool:
    return (
        len(name.encode()) <= 255
        and name.isprintable()
        and name not in (".", "..")
        and _NAME_FORBIDDEN.isdisjoint(name)
    )


def _check_name(param: str, name: str) -> None:
    if not _name_ok(name):
        raise _Refusal(Code.BAD_REQUEST, f"invalid {param}={name[:32]!r}")


@functools.lru_cache(maxsize=64)
def _lifetime_value(raw: str) -> int | None:
    # cached: a fleet uses a few lifetimes, and its registrations then share one int object
    if not (0 < len(raw) <= 10 and raw.isascii() and raw.isdigit()):
        return None
    lifetime = int(raw)
    return lifetime if 0 < lifetime <= MAX_LIFETIME else None


def _binding(params: dict[str, str | None], transports: frozenset[str]) -> str | None:
    if "b" not in params:
        return None
    raw = params["b"] or ""
    letters = raw.replace("Q", "", 1)
    if not letters or len(set(raw)) != len(raw) or not transports.issuperset(letters):
        raise _Refusal(Code.BAD_REQUEST, f"invalid binding b={raw[:16]!r}")
    return sys.intern(raw)


def _sms(params: dict[str, str | None]) -> str | None:
    if "sms" not in params:
        return None
    raw = params["sms"]
    if raw is None:
        raise _Refusal(Code.BAD_REQUEST, "sms parameter without a value")
    return raw or None


def _queue_param(params: dict[str, str | None]) -> bool:
    if "Q" not in params:
        return False
    if params["Q"] is not None:
        raise _Refusal(Code.BAD_REQUEST, "the Q parameter takes no value")
    return True


def _objects(msg: Message, max_links: int = MAX_LINKS) -> RegisteredObjects:
    block1 = msg.option(_BLOCK1)
    if block1 and block1[-1] & 0x08:  # (its M bit: more blocks follow)
        # a part: the server reassembles blocks before it parses (its last block's Block1
        # stays, to be echoed); a part here lists only some of the device's objects
        raise _Refusal(Code.BAD_OPTION, "object links sent in blocks were not reassembled")
    content_format = msg.content_format
    if content_format is not None and content_format != ContentFormat.LINK_FORMAT:
        raise _Refusal(
            Code.UNSUPPORTED_CONTENT_FORMAT, f"objects sent as Content-Format {content_format}"
        )
    payload = msg.payload
    links = payload.count(b",") + 1
    if links > max_links:
        raise _Refusal(
            Code.REQUEST_ENTITY_TOO_LARGE,
            f"{links} object links: the server takes at most {max_links}",
        )
    try:
        return shared_registered_objects(payload)  # (one value per distinct list)
    except LinkFormatError as exc:
        raise _Refusal(Code.BAD_REQUEST, f"invalid object links: {exc}") from None


# -- responses --------------------------------------------------------------------------------


def created(reg_id: str) -> Response:
    """2.01 Created with Location-Path `rd/{reg_id}`, the answer to a Register."""
    return Code.CREATED, ((_LOCATION_PATH, b"rd"), (_LOCATION_PATH, reg_id.encode()))


def changed() -> Response:
    """2.04 Changed, the answer to an Update."""
    return Code.CHANGED, ()


def deleted() -> Response:
    """2.02 Deleted, the answer to a De-register."""
    return Code.DELETED, ()


def error(err: RegistrationError) -> Response:
    """The error response for a refused request."""
    return err.code, ()


def update_interval(lifetime: float, max_transmit_wait: float = MAX_TRANSMIT_WAIT) -> float:
    """Seconds from one Register or Update to the next Update, as Wakaama and Anjay do it.

    Half the lifetime when it is at most MAX_TRANSMIT_WAIT, else the lifetime less
    MAX_TRANSMIT_WAIT (time for the Update's own retransmissions).
    """
    if lifetime <= max_transmit_wait:
        return lifetime / 2
    return lifetime - max_transmit_wait
