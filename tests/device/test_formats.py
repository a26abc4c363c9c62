"""A read without `accept` asks for the format the device announced (issue 13 item 4): the
device machine puts `Registration.preferred_accept` in the request, with Wakaama's Register
bytes (it announces SenML JSON with `</>;ct=110` and, built so, has no TLV)."""

from __future__ import annotations

from dm_actor.coap.numbers import ContentFormat, OptionNumber
from dm_actor.delivery.queue import DeliveryPolicy, DeviceQueue
from dm_actor.device.machine import DeviceMachine
from tests.device.support import ADDR, Driver, command, make_machine, requests
from tests.lwm2m.test_preferred_accept import first_register, registration

ACCEPT = OptionNumber.ACCEPT.value
SENML_JSON = ContentFormat.SENML_JSON.value


def wakaama() -> tuple[DeviceMachine, Driver]:
    reg = registration(first_register("wakaama-client-udp"))
    config = make_machine().config
    m = DeviceMachine(config, reg, DeviceQueue(DeliveryPolicy(), queue_mode=False, now=0.0),
                      addr=ADDR)  # fmt: skip
    return m, Driver(m)


def first_request_accept(m: DeviceMachine, d: Driver, *args: object, **kw: object) -> int | None:
    m.submit(command(*args, **kw), 0.0)  # type: ignore[arg-type]
    d.take()
    (req,) = requests(d.durable(0.0))
    m.end(0.0)
    return req.uint_option(ACCEPT)


def test_a_read_or_observe_without_accept_asks_for_the_announced_format() -> None:
    for uri in ("/3/0", "/3/0/0"):
        for observe in (False, True):
            m, d = wakaama()
            assert first_request_accept(m, d, "GET", uri, observe=observe) == SENML_JSON


def test_the_applications_accept_wins_and_writes_ask_for_nothing() -> None:
    m, d = wakaama()
    assert first_request_accept(m, d, "GET", "/3/0", accept=11542) == 11542
    m, d = wakaama()
    assert first_request_accept(m, d, "PUT", "/3/0/14", b"+02") is None


def test_a_device_that_announced_nothing_gets_no_accept() -> None:
    m = make_machine()  # LwM2M 1.1, no root link
    assert first_request_accept(m, Driver(m), "GET", "/3/0") is None
