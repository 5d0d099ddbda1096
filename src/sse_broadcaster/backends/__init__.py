"""Backends: where sessions' history lives and where live events come from.

`MemoryBackend` is the default. `sse_broadcaster.redis.RedisBackend` (with the
``redis`` extra) shares sessions between processes. Any object that follows
the `Backend` protocol can be passed as ``EventBroadcaster(backend=...)``.
"""

from ._base import Backend, BackendCounts, BackendHub, Replay, SweepResult
from .memory import MemoryBackend

__all__ = ["Backend", "BackendCounts", "BackendHub", "MemoryBackend", "Replay", "SweepResult"]
