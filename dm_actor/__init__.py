"""dm_actor: an LwM2M/CoAP device-management server on Trio with guaranteed command delivery."""

from __future__ import annotations

__version__ = "0.1.0"
