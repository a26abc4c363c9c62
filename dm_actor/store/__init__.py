"""Persistence behind a protocol: what must survive a restart (registrations, queued commands,
subscriptions, pre-subscriptions, notification channels, access keys, undelivered events).
`memory` keeps it in dicts for tests and benchmarks; `sqlite` keeps it in one SQLite file.
"""
