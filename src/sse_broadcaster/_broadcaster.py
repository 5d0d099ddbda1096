from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from typing_extensions import Self

from . import _metrics
from ._config import BroadcasterConfig
from ._event import Event
from ._hub import Hub
from ._metrics import (
    Counters,
    MemoryMetrics,
    MemoryPressureHook,
    MemoryWatch,
    render_metrics,
    stats_snapshot,
)
from ._multi import MultiSubscription, open_many
from ._runs import RunManager, RunsMixin, _UntilEnd
from ._subscription import Subscription
from ._types import Clock, check_session_id
from .backends._base import Backend
from .backends.memory import MemoryBackend

__all__ = ["EventBroadcaster"]

logger = logging.getLogger("sse_broadcaster")

_SUBSCRIPTION_OVERHEAD = 400  # Subscription, its weakref and set entry (bytes, estimate)
_MB = 1024 * 1024


class EventBroadcaster(RunsMixin):
    """Fans events out to the subscribers of each session, with bounded memory.

    ::

        async with EventBroadcaster(BroadcasterConfig()) as broadcaster:
            await broadcaster.publish("room-1", {"text": "hi"}, event="chat")
            async with broadcaster.subscribe("room-1", last_event_id=None) as sub:
                async for event in sub:
                    ...

    Entering it starts the background sweeper; leaving it (or `aclose`) ends
    every subscription and stops the sweeper. `publish` and `subscribe` need a
    running broadcaster.

    Args:
        config: limits and timings; `BroadcasterConfig()` by default.
        backend: where history lives; a new `MemoryBackend` by default.
        clock: returns the time in seconds since the epoch (``time.time``);
            event timestamps, TTLs and session expiry use it. Tests inject one.
        on_memory_pressure: ``hook(level, metrics)``, sync or async, called when
            a sweep finds process RSS above a threshold (level "warning" or "critical").
        json_dumps: serialises data that is neither str nor bytes; compact
            ``json.dumps`` by default.
    """

    def __init__(
        self,
        config: BroadcasterConfig | None = None,
        *,
        backend: Backend | None = None,
        clock: Clock | None = None,
        on_memory_pressure: MemoryPressureHook | None = None,
        json_dumps: Callable[[Any], str] | None = None,
    ) -> None:
        if config is None:
            config = BroadcasterConfig()
        elif not isinstance(config, BroadcasterConfig):
            raise TypeError(f"config must be a BroadcasterConfig, got {type(config).__name__}")
        self._config = config
        self._backend: Backend = backend if backend is not None else MemoryBackend()
        self._clock: Clock = clock if clock is not None else time.time
        self._json_dumps = json_dumps or _compact_json
        # The subscribers of this process and the fan-out; the backend and the
        # subscriptions see the broadcaster only through it.
        self._hub = Hub(config, self._clock, self._backend)
        self._memory = MemoryWatch(
            config.memory_warning_threshold_mb,
            config.memory_critical_threshold_mb,
            on_memory_pressure,
        )
        self._task_group: TaskGroup | None = None
        # The sweeper's own scope: cancelling the task group's scope instead would also
        # cancel the body of 'async with broadcaster:', which runs inside it.
        self._sweeper_scope: anyio.CancelScope | None = None
        # counters (those of fan-out are kept by the hub)
        self._published = 0
        self._expired_events = 0
        self._sessions_expired = 0
        self._cleanups = 0
        self._last_cleanup: float | None = None
        self._runs: RunManager | None = None  # resumable runs (#13), made on entry

    @property
    def config(self) -> BroadcasterConfig:
        """The configuration in force."""
        return self._config

    @property
    def clock(self) -> Clock:
        """The clock used for timestamps, TTLs and expiry."""
        return self._clock

    @property
    def backend(self) -> Backend:
        """The backend holding sessions and history."""
        return self._backend

    @property
    def running(self) -> bool:
        """True between entering and closing."""
        return self._hub.running

    def __repr__(self) -> str:
        hub = self._hub
        state = "running" if hub.running else ("closed" if hub.closed else "not started")
        return (
            f"<EventBroadcaster {state} backend={type(self._backend).__name__} "
            f"subscribers={hub.subscribers}>"
        )

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        hub = self._hub
        if hub.running or hub.closed:
            raise RuntimeError("an EventBroadcaster can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await self._backend.start(hub)
            self._runs = await self._start_runs()
        except BaseException:
            # Nothing runs in the task group yet: close it without handing it the
            # error, which it would wrap in an ExceptionGroup.
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        self._task_group = task_group
        hub.running = True
        # Made here, not in __init__: a CancelScope needs a running event loop.
        self._sweeper_scope = anyio.CancelScope()
        task_group.start_soon(self._sweeper, self._sweeper_scope, name="sse_broadcaster sweeper")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        task_group, self._task_group = self._task_group, None
        if task_group is None:  # pragma: no cover - __aenter__ always sets it
            return None
        if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
            return await task_group.__aexit__(exc_type, exc, tb)
        # The body raised. The sweeper is already cancelled, so the task group ends at
        # once; the body's exception propagates as it is, not wrapped by the task
        # group in an ExceptionGroup.
        await task_group.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """End every subscription, stop the sweeper and close the backend. Idempotent.

        Subscribers receive what was queued, then their iteration ends, so open
        streams finish promptly and servers shut down without waiting for them.
        """
        hub = self._hub
        if hub.closed:
            return
        hub.closed = True
        if self._runs is not None and hub.running:
            # Running runs end first, as cancelled, while their end marker can still be
            # published (publish needs `running`) and read from history.
            with anyio.CancelScope(shield=True):
                await self._runs.aclose()
        hub.running = False
        hub.end_all()
        if self._sweeper_scope is not None:
            self._sweeper_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._backend.aclose()

    # -- publish ---------------------------------------------------------------------------

    async def publish(
        self,
        session_id: str,
        data: Any,
        *,
        event: str | None = None,
        retry: int | None = None,
    ) -> Event:
        """Publish `data` to every subscriber of the session and keep it in history.

        `data` may be str, bytes (UTF-8) or anything `json_dumps` accepts. The
        event is encoded once and shared by every queue and history. With the
        in-memory backend this never yields to the event loop: a tight loop of
        publishes should ``await anyio.sleep(0)`` now and then so that
        subscribers can drain.

        Returns:
            The published event, with its id.

        Raises:
            ValueError: bad session id, event name, retry, or bytes that are not UTF-8.
            TypeError: data that cannot be serialised.
            EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
            SessionLimitError: a new session would exceed ``max_sessions``.
            BackendUnavailableError: the backend could not store the event.
            BroadcasterClosedError: the broadcaster is not running.
        """
        hub = self._hub
        if not hub.running:
            hub.check_running()
        # A session with subscribers here was validated when they subscribed.
        if type(session_id) is not str or session_id not in hub.fanouts:
            check_session_id(session_id)
        if type(data) is not str:
            data = self._serialise(data)
        published = await self._backend.publish(session_id, data, event, retry)
        self._published += 1
        return published

    def _serialise(self, data: Any) -> str:
        if isinstance(data, str):
            return data
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                return bytes(data).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"data bytes are not valid UTF-8: {exc}") from None
        try:
            text = self._json_dumps(data)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"data must be str, bytes or JSON-serialisable, got {type(data).__name__}: {exc}"
            ) from exc
        if not isinstance(text, str):
            raise TypeError(f"json_dumps must return a str, got {type(text).__name__}")
        return text

    # -- subscribe ---------------------------------------------------------------------------

    def subscribe(
        self, session_id: str, *, last_event_id: str | None = None, until_end: bool = False
    ) -> Subscription:
        """A subscription to the session; enter it with ``async with``.

        On entry, the retained events after `last_event_id` are queued first,
        then live events follow with no duplicate and no hole between the two.
        ``subscription.gap`` is True when `last_event_id` is unknown, malformed,
        from an earlier run, or older than what is retained; everything still
        retained is replayed then. An empty `last_event_id` counts as None.

        With `until_end`, the subscription ends cleanly (iteration stops, the
        receive calls raise ``anyio.EndOfStream``) right after the first end
        marker of a run (``event: end``) it delivers; entered with the id of the
        session's latest end marker, it ends at once; entered without an id
        while the session retains a run, it replays that run from its first event.

        Raises:
            ValueError: bad session id (here); on entry, `SessionLimitError`,
                `SubscriberLimitError` or `BroadcasterClosedError`.
        """
        check_session_id(session_id)
        if last_event_id == "":
            last_event_id = None
        elif last_event_id is not None and not isinstance(last_event_id, str):
            raise TypeError(f"last_event_id must be a str or None, got {last_event_id!r}")
        if until_end:
            run_info = functools.partial(self._until_end_info, session_id)
            return _UntilEnd(self._hub, session_id, last_event_id, run_info)
        return Subscription(self._hub, session_id, last_event_id)

    def subscribe_many(
        self, session_ids: Sequence[str], *, cursor: str | None = None
    ) -> MultiSubscription:
        """One subscription to several sessions, resumable with one cursor (an SSE id).

        Enter it with ``async with``; it enters one `Subscription` per session,
        with the usual limits. `cursor` is a `MultiSubscription.cursor` the
        client received (its Last-Event-ID): each session resumes from its
        position in it, with no duplicate and no hole. A session the cursor has
        no position for (added since, or a cursor that is malformed, too long,
        of another version or of other sessions) resumes with a gap and replays
        what is retained; such a cursor never raises. None (or "") is a new
        subscriber: no replay, no gap.

        Raises:
            ValueError: no session, more than ``max_sessions_per_subscription``,
                a session twice, or a bad session id (here); on entry,
                `SessionLimitError`, `SubscriberLimitError` or
                `BroadcasterClosedError` (the sessions entered before are closed).
        """
        return open_many(self._hub, session_ids, cursor, self._config.max_sessions_per_subscription)

    def subscriber_count(self, session_id: str) -> int:
        """Subscriptions of the session open in this process (0 for an unknown session).

        Only this process's: with a shared backend, other processes have their own.
        A subscription dropped without being closed counts until the next sweep
        removes it.
        """
        return self._hub.subscriber_count(session_id)

    def disconnect_subscribers(self, session_id: str) -> int:
        """End this process's subscriptions of the session, keeping its history.

        Subscribers receive what was queued, then their iteration stops; an SSE
        client then reconnects with its Last-Event-ID and resumes with no gap.
        (`close_session` also drops the history.)

        Returns:
            How many subscriptions were ended.
        """
        check_session_id(session_id)
        return self._hub.end_subscriptions(session_id)

    # -- history and sessions ----------------------------------------------------------------

    async def history(self, session_id: str, after: str | None = None) -> list[Event]:
        """Retained events of the session, oldest first; only those after `after` if known.

        An unknown or malformed `after` returns everything retained.
        """
        check_session_id(session_id)
        self._hub.check_running()
        return await self._backend.history(session_id, after or None)

    async def close_session(self, session_id: str) -> bool:
        """End the session's subscriptions and drop its history.

        Subscribers receive what was queued, then their iteration stops.

        Returns:
            True when the session existed.
        """
        check_session_id(session_id)
        hub = self._hub
        hub.check_running()
        had_subscribers = hub.has_subscribers(session_id)
        if self._runs is not None:
            await self._runs.cancel(session_id)
            await self._runs.store.forget(session_id)
        try:
            # A shared backend ends this process's subscriptions itself once the
            # events published before the close have reached them; whatever is
            # left (and everything, with the in-memory backend) ends here.
            existed = await self._backend.close_session(session_id)
        finally:
            hub.end_session(session_id)
        return existed or had_subscribers

    # -- sweeps ------------------------------------------------------------------------------

    async def _sweeper(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self._config.cleanup_interval)
                try:
                    await self.cleanup()
                except Exception:
                    logger.exception("sse_broadcaster sweep failed; retrying next interval")

    async def cleanup(self) -> MemoryMetrics:
        """Run one sweep now: expired events, dead subscribers, idle sessions, memory.

        The background sweeper calls this every ``cleanup_interval``. The
        process RSS is read, and checked against the thresholds, only with
        ``enable_metrics``; without it the metrics returned say 0.0 MB for it.

        Returns:
            The metrics after the sweep.
        """
        hub = self._hub
        hub.check_running()
        dead = hub.collect_abandoned()
        emptied = [sid for sid in dead if not hub.has_subscribers(sid)]
        for session_id in emptied:
            await self._backend.detach(session_id)
        if self._runs is not None:
            await self._runs.sweep()
        result = await self._backend.sweep()
        self._expired_events += result.expired_events
        self._sessions_expired += result.sessions_expired
        for session_id in result.expired_session_ids:
            hub.end_session(session_id)
        self._cleanups += 1
        self._last_cleanup = self._clock()
        if not self._config.enable_metrics:
            return self._memory_metrics(None)
        metrics = self._memory_metrics(_metrics.process_memory_bytes())
        await self._memory.check(metrics)
        return metrics

    # -- metrics -----------------------------------------------------------------------------

    def _estimate_bytes(self) -> int:
        estimate = self._backend.counts().estimate_bytes
        return estimate + self._hub.subscribers * _SUBSCRIPTION_OVERHEAD

    def _memory_metrics(self, rss_bytes: int | None) -> MemoryMetrics:
        return MemoryMetrics(
            process_memory_mb=0.0 if rss_bytes is None else round(rss_bytes / _MB, 3),
            broadcaster_memory_estimate_mb=round(self._estimate_bytes() / _MB, 3),
            expired_events_cleaned=self._expired_events,
            dead_queues_cleaned=self._hub.dead_queues,
            sessions_expired=self._sessions_expired,
            cleanup_count=self._cleanups,
        )

    def metrics(self) -> MemoryMetrics:
        """Memory readings and sweep counters (reads process RSS)."""
        return self._memory_metrics(_metrics.process_memory_bytes())

    def _counters(self) -> Counters:
        """Every figure at once (reads process RSS): what `stats` and /metrics render."""
        hub = self._hub
        sessions, events, estimate = self._backend.counts()
        return Counters(
            sessions=sessions,
            subscribers=hub.subscribers,
            history_events=events,
            published=self._published,
            delivered=hub.delivered,
            dropped=hub.dropped,
            slow_disconnects=hub.slow_disconnects,
            gaps=hub.gaps,
            replays=hub.replays,
            replayed_events=hub.replayed_events,
            expired_events=self._expired_events,
            dead_queues=hub.dead_queues,
            sessions_expired=self._sessions_expired,
            cleanups=self._cleanups,
            last_cleanup=self._last_cleanup,
            process_memory_bytes=_metrics.process_memory_bytes(),
            memory_estimate_bytes=estimate + hub.subscribers * _SUBSCRIPTION_OVERHEAD,
            memory_pressure=self._memory.level,
            **self._run_counters(),
        )

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot, the body of a ``/stats`` route.

        The keys of the reference deployment come first; ``totalEvents`` counts
        events retained in history. Further keys count what happened since start.
        """
        return stats_snapshot(self._counters(), self._backend.stats())

    def _prometheus_text(self, extra: Iterable[tuple[str, str, str, float]] = ()) -> str:
        """Every figure in the Prometheus text format, for the adapters' /metrics."""
        return render_metrics(self._counters(), self._backend.stats(), extra)


def _compact_json(data: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON, and a browser's JSON.parse rejects them.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
