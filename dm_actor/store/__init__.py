"""Persistence behind a protocol: what must survive a restart (registrations, queued commands,
subscriptions). `memory` keeps it in dicts for tests and benchmarks; SQLite comes later.
"""
