from __future__ import annotations

import inspect
import json
import logging
import re
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from typing_extensions import Self

from ._config import BroadcasterConfig
from ._errors import BroadcasterClosedError, SubscriberLimitError
from ._event import Event
from ._metrics import MemoryMetrics, process_memory_mb
from ._subscription import Subscription, _SubscriberRef
from ._types import Clock, MemoryPressureHook, PressureLevel
from .backends._base import Backend
from .backends.memory import MemoryBackend

__all__ = ["EventBroadcaster"]

logger = logging.getLogger("sse_broadcaster")

_MAX_SESSION_ID = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SUBSCRIPTION_OVERHEAD = 400  # Subscription, its weakref and set entry (bytes, estimate)
_MB = 1024 * 1024


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
    if not session_id:
        raise ValueError("session_id must not be empty")
    if len(session_id) > _MAX_SESSION_ID:
        raise ValueError(
            f"session_id must be at most {_MAX_SESSION_ID} characters, got {len(session_id)}"
        )
    match = _CONTROL.search(session_id)
    if match is not None:
        raise ValueError(
            f"session_id must not contain control characters, got {match.group()!r} "
            f"in {session_id!r}"
        )
    return session_id


class _Fanout:
    """This process's subscribers of one session, held weakly."""

    __slots__ = ("refs", "snapshot")

    def __init__(self) -> None:
        self.refs: set[_SubscriberRef] = set()
        self.snapshot: tuple[_SubscriberRef, ...] | None = None


class EventBroadcaster:
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
        self._on_memory_pressure = on_memory_pressure
        self._json_dumps = json_dumps or _compact_json
        self._fanouts: dict[str, _Fanout] = {}
        self._abandoned: list[_SubscriberRef] = []
        self._running = False
        self._closed = False
        self._task_group: TaskGroup | None = None
        # The sweeper's own scope: cancelling the task group's scope instead would also
        # cancel the body of 'async with broadcaster:', which runs inside it.
        self._sweeper_scope: anyio.CancelScope | None = None
        self._pressure: PressureLevel | None = None
        # counters
        self._subscribers = 0
        self._published = 0
        self._delivered = 0
        self._dropped = 0
        self._slow_disconnects = 0
        self._replays = 0
        self._replayed_events = 0
        self._gaps = 0
        self._expired_events = 0
        self._dead_queues = 0
        self._sessions_expired = 0
        self._cleanups = 0
        self._last_cleanup: float | None = None
        self._last_rss_mb = 0.0

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
        return self._running

    def __repr__(self) -> str:
        state = "running" if self._running else ("closed" if self._closed else "not started")
        return (
            f"<EventBroadcaster {state} backend={type(self._backend).__name__} "
            f"subscribers={self._subscribers}>"
        )

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._running or self._closed:
            raise RuntimeError("an EventBroadcaster can be entered only once")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        try:
            await self._backend.start(self)
        except BaseException:
            # Nothing runs in the task group yet: close it without handing it the
            # error, which it would wrap in an ExceptionGroup.
            task_group.cancel_scope.cancel()
            await task_group.__aexit__(None, None, None)
            raise
        self._task_group = task_group
        self._running = True
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
        if self._closed:
            return
        self._closed = True
        self._running = False
        for session_id in list(self._fanouts):
            self.end_session(session_id)
        if self._sweeper_scope is not None:
            self._sweeper_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._backend.aclose()

    def _check_running(self) -> None:
        if not self._running:
            if self._closed:
                raise BroadcasterClosedError("the EventBroadcaster is closed")
            raise BroadcasterClosedError(
                "the EventBroadcaster is not running: enter it first "
                "('async with broadcaster:' or the adapters' lifespan helper)"
            )

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
        if not self._running:
            self._check_running()
        # A session with subscribers here was validated when they subscribed.
        if type(session_id) is not str or session_id not in self._fanouts:
            _check_session_id(session_id)
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

    # BackendHub: called by the backend -------------------------------------------------

    def deliver(self, session_id: str, event: Event) -> None:
        """Queue a live event for this process's subscribers of the session."""
        fanout = self._fanouts.get(session_id)
        if fanout is None:
            return
        snapshot = fanout.snapshot
        if snapshot is None:
            snapshot = fanout.snapshot = tuple(fanout.refs)
        size = len(event._wire)
        max_items = self._config.max_queue_size
        max_bytes = self._config.max_queue_bytes - size
        for ref in snapshot:
            # Subscription._push, inlined for the common case: room in an open queue
            # (``items`` is None unless the subscription is open and has had an
            # event). The subscription itself is only looked up on the slow path.
            items = ref.items
            if items is not None and len(items) < max_items and ref.bytes <= max_bytes:
                items.append(event)
                ref.bytes += size
                waker = ref.waker
                if waker is not None:
                    ref.waker = None
                    waker.unpark()
            else:
                sub = ref()
                if sub is not None:
                    sub._push(event, size)
        self._delivered += len(snapshot)

    def end_session(self, session_id: str, error: BaseException | None = None) -> None:
        """End this process's subscriptions of the session after their queued events.

        Their iteration stops (or raises `error` when given).
        """
        fanout = self._fanouts.pop(session_id, None)
        if fanout is None:
            return
        for ref in list(fanout.refs):
            subscription = ref()
            if subscription is not None:
                subscription._end(error)
            else:
                # Collected before a sweep removed it: the sweep will skip it now.
                self._subscribers -= 1
                self._dead_queues += 1

    def has_subscribers(self, session_id: str) -> bool:
        """Whether this process has subscribers of the session."""
        return session_id in self._fanouts

    # -- subscribe ---------------------------------------------------------------------------

    def subscribe(self, session_id: str, *, last_event_id: str | None = None) -> Subscription:
        """A subscription to the session; enter it with ``async with``.

        On entry, the retained events after `last_event_id` are queued first,
        then live events follow with no duplicate and no hole between the two.
        ``subscription.gap`` is True when `last_event_id` is unknown, malformed,
        from an earlier run, or older than what is retained; everything still
        retained is replayed then. An empty `last_event_id` counts as None.

        Raises:
            ValueError: bad session id (here); on entry, `SessionLimitError`,
                `SubscriberLimitError` or `BroadcasterClosedError`.
        """
        _check_session_id(session_id)
        if last_event_id == "":
            last_event_id = None
        elif last_event_id is not None and not isinstance(last_event_id, str):
            raise TypeError(f"last_event_id must be a str or None, got {last_event_id!r}")
        return Subscription(self, session_id, last_event_id)

    async def _attach(self, subscription: Subscription) -> None:
        self._check_running()
        session_id = subscription.session_id
        limit = self._config.max_subscribers_per_session
        fanout = self._fanouts.get(session_id)
        if limit is not None and fanout is not None and len(fanout.refs) >= limit:
            raise SubscriberLimitError(
                f"session {session_id!r} has {len(fanout.refs)} subscribers: "
                f"max_subscribers_per_session={limit} reached"
            )

        def register() -> None:
            fanout = self._fanouts.get(session_id)
            if fanout is None:
                fanout = self._fanouts[session_id] = _Fanout()
            ref = _SubscriberRef(subscription, self._on_abandoned)
            ref.session_id = session_id
            ref.items = None
            ref.bytes = 0
            ref.waker = None
            ref.attached = True
            subscription._ref = subscription._inbox = ref
            fanout.refs.add(ref)
            fanout.snapshot = None
            self._subscribers += 1

        replay = await self._backend.attach(session_id, subscription.last_event_id, register)
        subscription._start(replay.events, replay.gap)
        if subscription.last_event_id is not None:
            self._replays += 1
            self._replayed_events += len(replay.events)
        if replay.gap:
            self._gaps += 1

    def _detach(self, subscription: Subscription) -> None:
        ref, subscription._ref = subscription._ref, None
        if ref is None:
            return
        # The producer's fast path stops here; the consumer has taken what it needs.
        ref.attached = False
        ref.items = None
        ref.bytes = 0
        self._subscribers -= 1
        fanout = self._fanouts.get(ref.session_id)
        if fanout is not None:
            fanout.refs.discard(ref)
            fanout.snapshot = None
            if not fanout.refs:
                del self._fanouts[ref.session_id]

    async def _release_session(self, session_id: str) -> None:
        if session_id not in self._fanouts and not self._closed:
            await self._backend.detach(session_id)

    def _count_drops(self, n: int) -> None:
        self._dropped += n

    def _slow_subscriber(self, subscription: Subscription) -> None:
        self._slow_disconnects += 1
        logger.info(
            "disconnecting a slow subscriber of session %r (queue full)", subscription.session_id
        )

    # -- history and sessions ----------------------------------------------------------------

    async def history(self, session_id: str, after: str | None = None) -> list[Event]:
        """Retained events of the session, oldest first; only those after `after` if known.

        An unknown or malformed `after` returns everything retained.
        """
        _check_session_id(session_id)
        self._check_running()
        return await self._backend.history(session_id, after or None)

    async def close_session(self, session_id: str) -> bool:
        """End the session's subscriptions and drop its history.

        Subscribers receive what was queued, then their iteration stops.

        Returns:
            True when the session existed.
        """
        _check_session_id(session_id)
        self._check_running()
        had_subscribers = session_id in self._fanouts
        try:
            # A shared backend ends this process's subscriptions itself once the
            # events published before the close have reached them; whatever is
            # left (and everything, with the in-memory backend) ends here.
            existed = await self._backend.close_session(session_id)
        finally:
            self.end_session(session_id)
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

        The background sweeper calls this every ``cleanup_interval``.

        Returns:
            The metrics after the sweep.
        """
        self._check_running()
        dead = self._collect_abandoned()
        emptied = [sid for sid in dead if sid not in self._fanouts]
        for session_id in emptied:
            await self._backend.detach(session_id)
        result = await self._backend.sweep()
        self._expired_events += result.expired_events
        self._sessions_expired += result.sessions_expired
        for session_id in result.expired_session_ids:
            self.end_session(session_id)
        self._cleanups += 1
        self._last_cleanup = self._clock()
        metrics = self.metrics()
        if self._config.enable_metrics:
            await self._check_memory(metrics)
        return metrics

    def _on_abandoned(self, ref: weakref.ref[Subscription]) -> None:
        # Runs inside the garbage collector, perhaps in the middle of a publish:
        # only note it; the next sweep removes the entry. A subscription that was
        # detached properly still holds its ref, so this also runs when it is freed.
        assert isinstance(ref, _SubscriberRef)
        if ref.attached:
            ref.items = None  # free the abandoned queue now, not at the next sweep
            self._abandoned.append(ref)

    def _collect_abandoned(self) -> set[str]:
        """Remove subscriptions collected without being closed; their session ids."""
        abandoned, self._abandoned = self._abandoned, []
        sessions: set[str] = set()
        for ref in abandoned:
            fanout = self._fanouts.get(ref.session_id)
            if fanout is None or ref not in fanout.refs:
                continue
            fanout.refs.discard(ref)
            fanout.snapshot = None
            if not fanout.refs:
                del self._fanouts[ref.session_id]
            self._subscribers -= 1
            self._dead_queues += 1
            sessions.add(ref.session_id)
        return sessions

    async def _check_memory(self, metrics: MemoryMetrics) -> None:
        rss = metrics.process_memory_mb
        config = self._config
        level: PressureLevel | None = None
        if rss >= config.memory_critical_threshold_mb:
            level = "critical"
        elif rss >= config.memory_warning_threshold_mb:
            level = "warning"
        previous, self._pressure = self._pressure, level
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
                config.memory_critical_threshold_mb,
                metrics.broadcaster_memory_estimate_mb,
            )
        else:
            logger.warning(
                "process memory %.1f MB is over memory_warning_threshold_mb=%s "
                "(broadcaster estimate %.1f MB)",
                rss,
                config.memory_warning_threshold_mb,
                metrics.broadcaster_memory_estimate_mb,
            )
        hook = self._on_memory_pressure
        if hook is not None:
            try:
                result = hook(level, metrics)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_memory_pressure hook failed")

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self) -> MemoryMetrics:
        """Memory readings and sweep counters (reads process RSS)."""
        estimate = self._backend.counts().estimate_bytes
        estimate += self._subscribers * _SUBSCRIPTION_OVERHEAD
        self._last_rss_mb = process_memory_mb()
        return MemoryMetrics(
            process_memory_mb=round(self._last_rss_mb, 3),
            broadcaster_memory_estimate_mb=round(estimate / _MB, 3),
            expired_events_cleaned=self._expired_events,
            dead_queues_cleaned=self._dead_queues,
            sessions_expired=self._sessions_expired,
            cleanup_count=self._cleanups,
        )

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot, the body of a ``/stats`` route.

        The keys of the reference deployment come first; ``totalEvents`` counts
        events retained in history. Further keys count what happened since start.
        """
        metrics = self.metrics()
        sessions, events, _ = self._backend.counts()
        return {
            "memoryUsageMB": round(metrics.process_memory_mb, 1),
            "totalSessions": sessions,
            "totalSubscribers": self._subscribers,
            "totalEvents": events,
            "cleanup": {
                "expiredEventsCleaned": self._expired_events,
                "deadQueuesCleaned": self._dead_queues,
                "sessionsExpired": self._sessions_expired,
                "lastCleanupTime": self._last_cleanup,
                "cleanupCount": self._cleanups,
            },
            "broadcasterMemoryEstimateMB": metrics.broadcaster_memory_estimate_mb,
            "eventsPublished": self._published,
            "eventsDelivered": self._delivered,
            "eventsDropped": self._dropped,
            "slowSubscriberDisconnects": self._slow_disconnects,
            "replays": self._replays,
            "replayedEvents": self._replayed_events,
            "gaps": self._gaps,
            "memoryPressure": self._pressure,
            "backend": self._backend.stats(),
        }


def _compact_json(data: Any) -> str:
    # allow_nan=False: NaN and Infinity are not JSON, and a browser's JSON.parse rejects them.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
