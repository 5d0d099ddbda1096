"""Memory readings, the memory-pressure check and the Prometheus exposition.

The broadcaster keeps its figures as plain counters and hands them out as one
typed `Counters` snapshot; `stats()` and `render_metrics` are both built from
it, so the Prometheus names never depend on the spelling of the JSON keys.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import psutil

__all__ = [
    "Counters",
    "MemoryMetrics",
    "MemoryWatch",
    "process_memory_bytes",
    "process_memory_mb",
    "render_metrics",
    "rss_reads",
    "stats_snapshot",
]

logger = logging.getLogger("sse_broadcaster")

_MB = 1024 * 1024
_PROCESS: psutil.Process | None = None
_PROCESS_PID = -1
_RSS_READS = 0


def process_memory_bytes() -> int:
    """Resident set size of this process in bytes (psutil)."""
    global _PROCESS, _PROCESS_PID, _RSS_READS
    pid = os.getpid()
    if _PROCESS is None or pid != _PROCESS_PID:  # re-create after fork
        _PROCESS, _PROCESS_PID = psutil.Process(pid), pid
    _RSS_READS += 1
    return int(_PROCESS.memory_info().rss)


def process_memory_mb() -> float:
    """Resident set size of this process in MB (psutil)."""
    return process_memory_bytes() / _MB


def rss_reads() -> int:
    """How many times this process read its RSS through this module (for tests)."""
    return _RSS_READS


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryMetrics:
    """A snapshot of memory use and of the sweeps' work, from `EventBroadcaster.metrics`."""

    process_memory_mb: float
    """Resident set size of the whole process, in MB (0.0 from a sweep that took
    no reading: ``enable_metrics=False``)."""
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


#: The level `MemoryWatch` reports when process RSS crosses a threshold.
PressureLevel = Literal["warning", "critical"]

#: ``on_memory_pressure(level, metrics)``: called when process RSS crosses a threshold.
MemoryPressureHook = Callable[[PressureLevel, MemoryMetrics], object]


class Counters(NamedTuple):
    """Every figure of one broadcaster at one moment; `stats()` and /metrics render it."""

    sessions: int
    subscribers: int
    history_events: int
    published: int
    delivered: int
    dropped: int
    slow_disconnects: int
    gaps: int
    replays: int
    replayed_events: int
    expired_events: int
    dead_queues: int
    sessions_expired: int
    cleanups: int
    last_cleanup: float | None
    process_memory_bytes: int
    memory_estimate_bytes: int
    memory_pressure: PressureLevel | None
    # Resumable runs (#13); defaults so that a caller without runs need not name them.
    runs_running: int = 0
    runs_retained: int = 0
    runs_started: int = 0
    runs_finished: int = 0
    runs_failed: int = 0
    runs_cancelled: int = 0
    runs_expired: int = 0
    run_transcript_bytes: int = 0


class MemoryWatch:
    """Compares RSS with the thresholds after a sweep; logs and calls the hook once
    per crossing (not at every sweep spent above a threshold)."""

    __slots__ = ("_hook", "critical_mb", "level", "warning_mb")

    def __init__(
        self, warning_mb: float, critical_mb: float, hook: MemoryPressureHook | None
    ) -> None:
        self.warning_mb = warning_mb
        self.critical_mb = critical_mb
        self._hook = hook
        self.level: PressureLevel | None = None
        """The level of the last check (None: under both thresholds)."""

    async def check(self, metrics: MemoryMetrics) -> None:
        rss = metrics.process_memory_mb
        level: PressureLevel | None = None
        if rss >= self.critical_mb:
            level = "critical"
        elif rss >= self.warning_mb:
            level = "warning"
        previous, self.level = self.level, level
        if level is None:
            if previous is not None:
                logger.info("process memory back to %.1f MB, under the thresholds", rss)
            return
        if level == previous:
            return
        if level == "critical":
            logger.error(
                "process memory %.1f MB is over memory_critical_threshold_mb=%s "
                "(broadcaster estimate %.1f MB)",
                rss,
                self.critical_mb,
                metrics.broadcaster_memory_estimate_mb,
            )
        else:
            logger.warning(
                "process memory %.1f MB is over memory_warning_threshold_mb=%s "
                "(broadcaster estimate %.1f MB)",
                rss,
                self.warning_mb,
                metrics.broadcaster_memory_estimate_mb,
            )
        hook = self._hook
        if hook is not None:
            try:
                result = hook(level, metrics)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_memory_pressure hook failed")


# -- Prometheus --------------------------------------------------------------------------------

# (metric name, type, help, Counters field)
_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("sse_broadcaster_sessions", "gauge", "Sessions that exist now.", "sessions"),
    ("sse_broadcaster_subscribers", "gauge", "Open subscriptions.", "subscribers"),
    ("sse_broadcaster_history_events", "gauge", "Events retained in history.", "history_events"),
    ("sse_broadcaster_events_published_total", "counter", "Events published.", "published"),
    (
        "sse_broadcaster_events_delivered_total",
        "counter",
        "Events queued to subscribers.",
        "delivered",
    ),
    (
        "sse_broadcaster_events_dropped_total",
        "counter",
        "Events dropped by the drop_oldest / drop_newest policies.",
        "dropped",
    ),
    (
        "sse_broadcaster_slow_subscriber_disconnects_total",
        "counter",
        "Subscribers disconnected for falling behind.",
        "slow_disconnects",
    ),
    (
        "sse_broadcaster_gaps_total",
        "counter",
        "Subscriptions that resumed after events were lost.",
        "gaps",
    ),
    (
        "sse_broadcaster_replays_total",
        "counter",
        "Subscriptions that resumed from an id.",
        "replays",
    ),
    (
        "sse_broadcaster_replayed_events_total",
        "counter",
        "Events replayed from history.",
        "replayed_events",
    ),
    (
        "sse_broadcaster_expired_events_total",
        "counter",
        "Events removed from history by TTL.",
        "expired_events",
    ),
    (
        "sse_broadcaster_dead_queues_cleaned_total",
        "counter",
        "Abandoned subscriptions removed by sweeps.",
        "dead_queues",
    ),
    (
        "sse_broadcaster_sessions_expired_total",
        "counter",
        "Idle sessions expired.",
        "sessions_expired",
    ),
    ("sse_broadcaster_cleanups_total", "counter", "Sweeps run.", "cleanups"),
    (
        "sse_broadcaster_process_resident_memory_bytes",
        "gauge",
        "Process resident set size.",
        "process_memory_bytes",
    ),
    (
        "sse_broadcaster_memory_estimate_bytes",
        "gauge",
        "Estimate of the memory the broadcaster holds.",
        "memory_estimate_bytes",
    ),
    ("sse_broadcaster_runs_running", "gauge", "Runs running now.", "runs_running"),
    (
        "sse_broadcaster_runs_retained",
        "gauge",
        "Ended runs whose transcript is still resumable.",
        "runs_retained",
    ),
    ("sse_broadcaster_runs_started_total", "counter", "Runs started here.", "runs_started"),
    (
        "sse_broadcaster_runs_finished_total",
        "counter",
        "Runs started here that finished.",
        "runs_finished",
    ),
    (
        "sse_broadcaster_runs_failed_total",
        "counter",
        "Runs started here that failed.",
        "runs_failed",
    ),
    (
        "sse_broadcaster_runs_cancelled_total",
        "counter",
        "Runs started here that were cancelled.",
        "runs_cancelled",
    ),
    (
        "sse_broadcaster_runs_expired_total",
        "counter",
        "Run transcripts swept after run_ttl.",
        "runs_expired",
    ),
    (
        "sse_broadcaster_run_transcript_bytes",
        "gauge",
        "Encoded bytes retained for run transcripts.",
        "run_transcript_bytes",
    ),
)

# Figures only shared backends report, from `Backend.stats()`: (name, type, help, key).
_BACKEND_METRICS: tuple[tuple[str, str, str, str], ...] = (
    (
        "sse_broadcaster_backend_connected",
        "gauge",
        "1 when the backend is connected (shared backends only).",
        "connected",
    ),
    (
        "sse_broadcaster_backend_reconnects_total",
        "counter",
        "Reconnections to the backend.",
        "reconnects",
    ),
    (
        "sse_broadcaster_backend_recovered_events_total",
        "counter",
        "Events recovered from backend history after a lost connection.",
        "recoveredEvents",
    ),
)


def render_metrics(
    counters: Counters,
    backend_stats: Mapping[str, object] | None = None,
    extra: Iterable[tuple[str, str, str, float]] = (),
) -> str:
    """The broadcaster's figures in the Prometheus text format (0.0.4).

    `backend_stats` is `Backend.stats()`: the backend figures it lacks are left
    out. `extra` adds ``(name, type, help, value)`` samples (the adapters' open
    streams).
    """
    lines: list[str] = []

    def sample(name: str, kind: str, help_text: str, value: float) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {_number(value)}")

    for name, kind, help_text, field in _METRICS:
        sample(name, kind, help_text, getattr(counters, field))
    if backend_stats:
        for name, kind, help_text, key in _BACKEND_METRICS:
            value = backend_stats.get(key)
            if isinstance(value, bool):
                value = int(value)
            elif not isinstance(value, (int, float)):
                continue
            sample(name, kind, help_text, value)
    for name, kind, help_text, number in extra:
        sample(name, kind, help_text, number)
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def stats_snapshot(c: Counters, backend: dict[str, object]) -> dict[str, Any]:
    """`EventBroadcaster.stats`: the counters as the reference deployment's JSON.

    Its keys come first; ``totalEvents`` counts events retained in history.
    Further keys count what happened since start.
    """
    return {
        "memoryUsageMB": round(c.process_memory_bytes / _MB, 1),
        "totalSessions": c.sessions,
        "totalSubscribers": c.subscribers,
        "totalEvents": c.history_events,
        "cleanup": {
            "expiredEventsCleaned": c.expired_events,
            "deadQueuesCleaned": c.dead_queues,
            "sessionsExpired": c.sessions_expired,
            "lastCleanupTime": c.last_cleanup,
            "cleanupCount": c.cleanups,
        },
        "broadcasterMemoryEstimateMB": round(c.memory_estimate_bytes / _MB, 3),
        "eventsPublished": c.published,
        "eventsDelivered": c.delivered,
        "eventsDropped": c.dropped,
        "slowSubscriberDisconnects": c.slow_disconnects,
        "replays": c.replays,
        "replayedEvents": c.replayed_events,
        "gaps": c.gaps,
        "runs": {
            "running": c.runs_running,
            "retained": c.runs_retained,
            "started": c.runs_started,
            "finished": c.runs_finished,
            "failed": c.runs_failed,
            "cancelled": c.runs_cancelled,
            "expired": c.runs_expired,
            "transcriptBytes": c.run_transcript_bytes,
        },
        "memoryPressure": c.memory_pressure,
        "backend": backend,
    }
