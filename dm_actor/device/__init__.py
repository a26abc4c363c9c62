"""The device machine: a registered device's decisions, sans-IO (see `machine.py`)."""
