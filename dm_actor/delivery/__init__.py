"""Guaranteed command delivery as a pure state machine (delivery.md sections 1-10).

No I/O, no clock: times come in as `now` (seconds, the adapter's clock). The device actor owns
one `DeviceQueue` and feeds it; `dm_actor.actors` turns its decisions into CoAP exchanges.
"""
