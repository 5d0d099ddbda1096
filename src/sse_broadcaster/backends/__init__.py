"""Backends: where sessions' history lives and where live events come from.

`MemoryBackend` is the default. `sse_broadcaster.redis.RedisBackend` (with the
``redis`` extra) shares sessions between processes. Any object that follows
the `Backend` protocol can be passed as ``EventBroadcaster(backend=...)``; one
that also has a ``run_store()`` method returning a `RunStore` supports
resumable runs (`EventBroadcaster.start_run`).
"""

from .._run_state import RunCounts, RunStore, RunSweep
from .._run_store import MemoryRunStore
from ._base import Backend, BackendCounts, BackendHub, Replay, SweepResult
from .memory import MemoryBackend

__all__ = [
    "Backend",
    "BackendCounts",
    "BackendHub",
    "MemoryBackend",
    "MemoryRunStore",
    "Replay",
    "RunCounts",
    "RunStore",
    "RunSweep",
    "SweepResult",
]
