"""`python -m dm_actor` is the `dm-actor` command."""

from __future__ import annotations

import sys

from dm_actor.cli import main

sys.exit(main())
