from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

__all__ = ["MemoryMetrics", "process_memory_mb"]

_MB = 1024 * 1024
_PROCESS: psutil.Process | None = None
_PROCESS_PID = -1


def process_memory_mb() -> float:
    """Resident set size of this process in MB (psutil)."""
    global _PROCESS, _PROCESS_PID
    pid = os.getpid()
    if _PROCESS is None or pid != _PROCESS_PID:  # re-create after fork
        _PROCESS, _PROCESS_PID = psutil.Process(pid), pid
    return float(_PROCESS.memory_info().rss) / _MB


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryMetrics:
    """A snapshot of memory use and of the sweeps' work, from `EventBroadcaster.metrics`."""

    process_memory_mb: float
    """Resident set size of the whole process, in MB."""
    broadcaster_memory_estimate_mb: float
    """Estimate of what the broadcaster holds (history, queues, sessions), kept incrementally."""
    expired_events_cleaned: int
    """Events removed from history because they outlived ``event_ttl``."""
    dead_queues_cleaned: int
    """Subscriptions collected without being closed, removed by sweeps."""
    sessions_expired: int
    """Idle sessions removed after ``session_ttl``."""
    cleanup_count: int
    """Sweeps run so far."""
