"""What every module that talks to the cluster's Redis shares: the errors that mean Redis is
unreachable (each caller then serves on without it), and a reply read as text (coredis answers
bytes). Importing it imports coredis: only cluster code does, lazily where the module is also
imported by a daemon that runs alone (drain.py, rebalance.py)."""

from __future__ import annotations

from typing import Any, Final

from coredis.exceptions import RedisError

REDIS_ERRORS: Final = (RedisError, OSError, TimeoutError)


def text(value: Any) -> str:
    """A Redis reply as text; None (a missing key) is the empty string."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
