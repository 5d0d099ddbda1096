from __future__ import annotations

from dataclasses import dataclass

from ._types import OverflowPolicy
from ._validation import check_int, check_positive

__all__ = ["BroadcasterConfig"]


@dataclass(frozen=True, kw_only=True)
class BroadcasterConfig:
    """Limits and timings of an `EventBroadcaster`.

    The defaults are the production values of the reference deployment. Every
    value is checked when the config is created: a bad one raises `ValueError`
    (or `TypeError` for a wrong type) naming the field and the value.

    See the configuration reference in the documentation for what happens when
    each limit is reached.
    """

    max_queue_size: int = 1000
    """Events buffered per subscriber before the overflow policy applies."""
    max_history_per_session: int = 500
    """Events kept per session for replay (0 keeps none)."""
    event_ttl: float | None = 300.0
    """Seconds an event stays in history (None: no age limit)."""
    session_ttl: float = 1800.0
    """An idle session with no subscribers is removed after this many seconds."""
    cleanup_interval: float = 60.0
    """Seconds between background sweeps."""
    enable_metrics: bool = True
    """Take process memory readings and check the memory thresholds on each sweep."""
    memory_warning_threshold_mb: float = 100.0
    """Process RSS (MB) above which a sweep logs a warning and calls the pressure hook."""
    memory_critical_threshold_mb: float = 200.0
    """Process RSS (MB) above which a sweep logs an error and calls the pressure hook."""
    overflow_policy: OverflowPolicy = OverflowPolicy.DISCONNECT
    """What happens when a subscriber's queue is full (a string value is accepted)."""
    keepalive_interval: float = 15.0
    """Seconds between ``: ping`` comments sent by the adapters."""
    retry_ms: int | None = 3000
    """The ``retry:`` field the adapters send when a stream opens (None: not sent)."""
    max_sessions: int | None = 100_000
    """Sessions that may exist at once (None: no limit)."""
    max_subscribers_per_session: int | None = 10_000
    """Subscribers one session may have at once in this process (None: no limit)."""
    max_event_bytes: int = 65_536
    """Largest encoded SSE message (all its fields) that `publish` accepts."""
    max_queue_bytes: int = 1_048_576
    """Encoded bytes buffered per subscriber before the overflow policy applies."""
    max_history_bytes: int | None = 67_108_864
    """Encoded bytes of history across all sessions; the oldest events go first."""
    send_timeout: float = 5.0
    """Seconds the adapters wait for a client's socket to accept a write."""
    max_sessions_per_subscription: int = 16
    """Sessions one `EventBroadcaster.subscribe_many` may follow on one stream."""
    run_ttl: float = 3600.0
    """Seconds a run's transcript stays resumable after its end (then it is swept)."""
    max_run_events: int = 100_000
    """Events one run's transcript may hold, its end marker included; past it the run fails."""
    max_run_bytes: int = 8_388_608
    """Encoded bytes one run's transcript may hold; past it the run fails."""
    max_runs: int = 100
    """Runs holding a transcript (running, or ended within ``run_ttl``) at once; at most
    this many may run, and the oldest ended transcript goes early to make room."""
    run_heartbeat_timeout: float = 30.0
    """Shared backends: a running run whose producer is silent this long ends as failed."""

    def __post_init__(self) -> None:
        check_int("max_queue_size", self.max_queue_size, 1)
        check_int("max_history_per_session", self.max_history_per_session, 0)
        check_positive("event_ttl", self.event_ttl, optional=True)
        check_positive("session_ttl", self.session_ttl)
        check_positive("cleanup_interval", self.cleanup_interval)
        if not isinstance(self.enable_metrics, bool):
            raise TypeError(f"enable_metrics must be a bool, got {self.enable_metrics!r}")
        check_positive("memory_warning_threshold_mb", self.memory_warning_threshold_mb, unit="MB")
        check_positive("memory_critical_threshold_mb", self.memory_critical_threshold_mb, unit="MB")
        if self.memory_critical_threshold_mb < self.memory_warning_threshold_mb:
            raise ValueError(
                "memory_critical_threshold_mb must be >= memory_warning_threshold_mb "
                f"({self.memory_warning_threshold_mb!r}), got {self.memory_critical_threshold_mb!r}"
            )
        try:
            policy = OverflowPolicy(self.overflow_policy)
        except ValueError:
            choices = ", ".join(repr(p.value) for p in OverflowPolicy)
            raise ValueError(
                f"overflow_policy must be one of {choices}, got {self.overflow_policy!r}"
            ) from None
        object.__setattr__(self, "overflow_policy", policy)
        check_positive("keepalive_interval", self.keepalive_interval)
        check_int("retry_ms", self.retry_ms, 0, optional=True)
        check_int("max_sessions", self.max_sessions, 1, optional=True)
        check_int("max_subscribers_per_session", self.max_subscribers_per_session, 1, optional=True)
        check_int("max_event_bytes", self.max_event_bytes, 64)
        check_int("max_queue_bytes", self.max_queue_bytes, 1)
        if self.max_queue_bytes < self.max_event_bytes:
            raise ValueError(
                f"max_queue_bytes must be >= max_event_bytes ({self.max_event_bytes!r}) so that "
                f"every accepted event fits in a queue, got {self.max_queue_bytes!r}"
            )
        check_int("max_history_bytes", self.max_history_bytes, 1, optional=True)
        if self.max_history_bytes is not None and self.max_history_bytes < self.max_event_bytes:
            raise ValueError(
                f"max_history_bytes must be None or >= max_event_bytes ({self.max_event_bytes!r}) "
                f"so that history can hold an event, got {self.max_history_bytes!r}"
            )
        check_positive("send_timeout", self.send_timeout)
        check_int("max_sessions_per_subscription", self.max_sessions_per_subscription, 1)
        check_positive("run_ttl", self.run_ttl)
        check_int("max_run_events", self.max_run_events, 2)
        check_int("max_run_bytes", self.max_run_bytes, 1024)
        check_int("max_runs", self.max_runs, 1)
        check_positive("run_heartbeat_timeout", self.run_heartbeat_timeout)
