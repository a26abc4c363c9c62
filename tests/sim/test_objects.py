"""The simulated device's objects: LwM2M operations and the notification rules, sans-IO."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from dm_actor.coap.numbers import Code, ContentFormat
from dm_actor.lwm2m import content
from dm_actor.lwm2m.content import ResourceValue
from dm_actor.sim.objects import (
    WANT_OBJECTS,
    WANT_REBOOT,
    WANT_UPDATE,
    ObjectTree,
    Rules,
    World,
    next_check,
    notification_due,
)

SENML = ContentFormat.SENML_JSON.value
TLV = ContentFormat.LWM2M_TLV.value
TEXT = ContentFormat.TEXT.value


def tree(seed: int = 1, now: float = 0.0) -> ObjectTree:
    return ObjectTree("dev-1", World(random.Random(seed), sample_period=5.0), now, lifetime=300)


def value(t: ObjectTree, ids: tuple[int, ...], now: float) -> float:
    values = t.read(ids, now)
    assert isinstance(values, list) and isinstance(values[0].value, float)
    return values[0].value


def test_read_single_resource_is_text_plain_by_default() -> None:
    t = tree()
    assert t.read_encoded((3, 0, 0), None, 0.0)[:3] == (Code.CONTENT, TEXT, b"dm-actor")
    assert t.read_encoded((3, 0, 2), None, 0.0)[2] == b"SN-dev-1"
    assert t.read_encoded((1, 0, 1), None, 0.0)[2] == b"300"
    assert t.read_encoded((3311, 0, 5850), None, 0.0)[2] == b"0"


def test_read_instance_is_senml_json_or_what_accept_asks() -> None:
    t = tree()
    code, ct, payload, _ = t.read_encoded((3, 0), None, 7200.0)
    assert (code, ct) == (Code.CONTENT, SENML)
    records = json.loads(payload)
    assert records[0] == {"bn": "/3/0/", "n": "0", "vs": "dm-actor"}
    assert {"n": "9", "v": 98} in records  # battery: 1 % an hour
    assert {"n": "11/0", "v": 0} in records  # a resource with instances
    code, ct, payload, _ = t.read_encoded((3, 0), TLV, 0.0)
    assert (code, ct) == (Code.CONTENT, TLV)
    decoded = content.decode(TLV, payload, "/3/0")
    assert decoded[0] == ResourceValue("/3/0/0", b"dm-actor")
    code, ct, payload, _ = t.read_encoded((3303,), SENML, 0.0)
    assert json.loads(payload)[0]["bn"] == "/3303/0/"


def test_read_errors() -> None:
    t = tree()
    assert t.read((5, 0), 0.0) == Code.NOT_FOUND  # no such object
    assert t.read((3, 1), 0.0) == Code.NOT_FOUND  # no such instance
    assert t.read((3, 0, 99), 0.0) == Code.NOT_FOUND  # no such resource
    assert t.read((3, 0, 0, 0), 0.0) == Code.NOT_FOUND  # a single resource has no instances
    assert t.read((3, 0, 11, 1), 0.0) == Code.NOT_FOUND
    assert t.read((3, 0, 11, 0), 0.0) == [ResourceValue("/3/0/11/0", 0)]
    assert t.read((3, 0, 4), 0.0) == Code.METHOD_NOT_ALLOWED  # executable only
    assert t.read_encoded((3, 0), TEXT, 0.0)[0] == Code.NOT_ACCEPTABLE  # many values as text
    assert t.read_encoded((3, 0, 0), 9999, 0.0)[0] == Code.NOT_ACCEPTABLE


def test_write_resource_and_instance() -> None:
    t = tree()
    assert t.write((3311, 0, 5850), TEXT, b"1", 10.0) == Code.CHANGED
    assert t.read((3311, 0, 5850), 10.0) == [ResourceValue("/3311/0/5850", True)]
    assert t.read((3311, 0, 5852), 25.0) == [ResourceValue("/3311/0/5852", 15)]  # on-time
    senml = b'[{"bn":"/3311/0/","n":"5851","v":40},{"n":"5850","vb":false}]'
    assert t.write((3311, 0), SENML, senml, 30.0) == Code.CHANGED
    assert t.light(0).dimmer == 40 and t.light(0).on_since is None
    tlv = content.encode(TLV, [ResourceValue("/3311/0/5851", 7)], "/3311/0/5851")
    assert t.write((3311, 0, 5851), TLV, tlv, 31.0) == Code.CHANGED
    assert t.light(0).dimmer == 7
    assert t.write((3, 0, 13), TEXT, b"1700000000", 5.0) == Code.CHANGED
    assert t.read((3, 0, 13), 15.0) == [ResourceValue("/3/0/13", 1700000010)]


def test_write_errors_change_nothing() -> None:
    t = tree()
    assert t.write((3, 0, 0), TEXT, b"x", 0.0) == Code.METHOD_NOT_ALLOWED  # read-only
    assert t.write((3,), TEXT, b"x", 0.0) == Code.METHOD_NOT_ALLOWED  # an object
    assert t.write((3311, 0, 5851), TEXT, b"101", 0.0) == Code.BAD_REQUEST  # out of range
    assert t.write((3311, 0, 5851), TEXT, b"dim", 0.0) == Code.BAD_REQUEST
    assert t.write((3311, 0, 5851), 9999, b"1", 0.0) == Code.UNSUPPORTED_CONTENT_FORMAT
    assert t.write((3311, 7, 5851), TEXT, b"1", 0.0) == Code.NOT_FOUND
    mixed = b'[{"bn":"/3311/0/","n":"5851","v":40},{"n":"5852","v":1}]'
    assert t.write((3311, 0), SENML, mixed, 0.0) == Code.METHOD_NOT_ALLOWED
    assert t.light(0).dimmer == 100  # the valid half was not applied either
    assert t.write((3311, 0), None, b"", 0.0) == Code.BAD_REQUEST
    assert t.wants == 0


def test_lifetime_write_and_update_trigger_want_an_update() -> None:
    t = tree()
    assert t.write((1, 0, 1), TEXT, b"600", 0.0) == Code.CHANGED
    assert (t.lifetime, t.wants) == (600, WANT_UPDATE)
    t.wants = 0
    assert t.write((1, 0, 1), TEXT, b"0", 0.0) == Code.BAD_REQUEST
    assert t.execute((1, 0, 8), 0.0) == Code.CHANGED
    assert t.wants == WANT_UPDATE


def test_execute() -> None:
    t = tree()
    assert t.execute((3, 0, 4), 0.0) == Code.CHANGED
    assert t.wants == WANT_REBOOT
    assert t.execute((3, 0, 0), 0.0) == Code.METHOD_NOT_ALLOWED
    assert t.execute((3, 0), 0.0) == Code.METHOD_NOT_ALLOWED
    assert t.execute((3, 0, 99), 0.0) == Code.NOT_FOUND
    assert t.execute((3303, 0, 5605), 0.0) == Code.CHANGED


def test_create_and_delete() -> None:
    t = tree()
    body = b'[{"bn":"/3311/3/","n":"5850","vb":true}]'
    assert t.create(3311, SENML, body, 1.0) == (Code.CREATED, 3)
    assert t.light(3).on_since == 1.0 and t.wants == WANT_OBJECTS
    assert t.create(3311, SENML, body, 1.0) == (Code.BAD_REQUEST, None)  # id in use
    assert t.create(3303, None, b"", 1.0) == (Code.CREATED, 1)  # lowest free id
    assert t.create(3, None, b"", 1.0) == (Code.METHOD_NOT_ALLOWED, None)
    assert t.create(9, None, b"", 1.0) == (Code.NOT_FOUND, None)
    assert b"</3311/3>" in t.object_links() and b"</3303/1>" in t.object_links()
    assert t.delete((3311, 3)) == Code.DELETED
    assert t.delete((3311, 3)) == Code.NOT_FOUND
    assert t.delete((3, 0)) == Code.METHOD_NOT_ALLOWED
    assert t.delete((3311,)) == Code.METHOD_NOT_ALLOWED
    assert t.delete((3311, 0, 5850)) == Code.METHOD_NOT_ALLOWED
    assert t.read((3311, 3), 2.0) == Code.NOT_FOUND


def test_discover_lists_resources_with_written_attributes() -> None:
    t = tree()
    assert t.discover((3303, 0, 5700)) == b"</3303/0/5700>"
    assert t.write_attributes((3303, 0, 5700), "pmin=10&st=0.5") == Code.CHANGED
    assert t.write_attributes((3303, 0), "pmax=60") == Code.CHANGED
    assert t.discover((3303, 0)) == (
        b"</3303/0>;pmax=60,</3303/0/5601>,</3303/0/5602>,</3303/0/5605>,"
        b"</3303/0/5700>;pmin=10;st=0.5,</3303/0/5701>"
    )
    whole = t.discover((3,))
    assert isinstance(whole, bytes) and whole.startswith(b"</3>,</3/0>,</3/0/0>,")
    assert b"</3/0/11>;dim=1" in whole
    assert t.discover((9,)) == Code.NOT_FOUND


def test_write_attributes_validate_merge_and_unset() -> None:
    t = tree()
    assert t.write_attributes((3303, 0, 5700), "pmin=10&pmax=5") == Code.BAD_REQUEST
    assert t.write_attributes((3303, 0, 5700), "bogus=1") == Code.BAD_REQUEST
    assert t.write_attributes((3303, 9, 5700), "pmin=1") == Code.NOT_FOUND
    assert t.write_attributes((3303, 0, 5700), "pmax=20") == Code.CHANGED
    assert t.write_attributes((3303, 0, 5700), "pmin=30") == Code.BAD_REQUEST  # merged: 30 > 20
    assert t.write_attributes((3303, 0, 5700), "pmin=5&gt=30") == Code.CHANGED
    assert t.rules((3303, 0, 5700)) == Rules(pmin=5.0, pmax=20.0, gt=30.0)
    assert t.write_attributes((3303, 0, 5700), "pmax&gt") == Code.CHANGED  # unset
    assert t.rules((3303, 0, 5700)) == Rules(pmin=5.0)


def test_rules_inherit_from_instance_object_and_server_defaults() -> None:
    t = tree()
    assert t.write((1, 0, 3), TEXT, b"300", 0.0) == Code.CHANGED  # default pmax
    assert t.rules((3303, 0, 5700)) == Rules(pmin=0.0, pmax=300.0)
    t.write_attributes((3303,), "pmin=2&lt=0")
    t.write_attributes((3303, 0), "pmin=4")
    assert t.rules((3303, 0, 5700)) == Rules(pmin=4.0, pmax=300.0, lt=0.0)


@pytest.mark.parametrize(
    ("rules", "last", "value", "elapsed", "due"),
    [
        (Rules(), 20.0, 20.0, 100.0, False),  # no change, no pmax
        (Rules(), 20.0, 20.1, 0.0, True),  # any change, pmin 0
        (Rules(pmin=10), 20.0, 25.0, 9.9, False),  # before pmin: never
        (Rules(pmin=10), 20.0, 25.0, 10.0, True),
        (Rules(pmax=60), 20.0, 20.0, 60.0, True),  # pmax: even unchanged
        (Rules(pmax=60), 20.0, 20.0, 59.0, False),
        (Rules(gt=30), 29.0, 29.5, 5.0, False),  # changed, but no crossing
        (Rules(gt=30), 29.0, 30.5, 5.0, True),  # crossed upwards
        (Rules(gt=30), 31.0, 29.5, 5.0, True),  # and downwards
        (Rules(lt=0), 1.0, -1.0, 5.0, True),
        (Rules(lt=0), 1.0, 2.0, 5.0, False),
        (Rules(st=1.0), 20.0, 20.9, 5.0, False),
        (Rules(st=1.0), 20.0, 21.0, 5.0, True),
        (Rules(st=1.0), 20.0, 18.5, 5.0, True),
        (Rules(st=1.0, gt=30), 20.0, 20.5, 5.0, False),
        (Rules(st=1.0), "a", "b", 5.0, True),  # not a number: any change
        (Rules(pmin=10, pmax=5), 1.0, 1.0, 5.0, True),  # pmax wins
    ],
)
def test_notification_due(
    rules: Rules, last: object, value: object, elapsed: float, due: bool
) -> None:
    assert notification_due(rules, last, 100.0, value, 100.0 + elapsed) is due


def test_next_check_waits_for_pmin_and_not_beyond_pmax() -> None:
    assert next_check(Rules(), 100.0, 103.0) == 103.0
    assert next_check(Rules(pmin=10), 100.0, 103.0) == 110.0
    assert next_check(Rules(pmin=10, pmax=20), 100.0, 150.0) == 120.0


def test_temperature_walks_at_sampling_steps_reproducibly() -> None:
    a, b = tree(seed=5), tree(seed=5)
    c = tree(seed=6)
    series_a = [value(a, (3303, 0, 5700), t) for t in range(100)]
    assert series_a == [value(b, (3303, 0, 5700), t) for t in range(100)]  # same seed, same reads
    assert series_a != [value(c, (3303, 0, 5700), t) for t in range(100)]
    changes = sum(1 for x, y in itertools.pairwise(series_a) if x != y)
    assert 15 <= changes <= 20  # one step every 5 s
    first = a.next_change(100.0)
    assert 100.0 < first <= 105.0
    assert a.tick(first) == a.tick(100.0) + 1
    assert value(a, (3303, 0, 5601), 100.0) == min(series_a)
    assert value(a, (3303, 0, 5602), 100.0) == max(series_a)
