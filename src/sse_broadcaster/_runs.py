"""Resumable runs (#13): an async generator published to a session by the broadcaster.

`EventBroadcaster.start_run` hands the generator to a `RunManager`, which runs it
in the broadcaster's task group and publishes each item to the session. The
run's state lives behind a `RunStore` (the seam a shared backend implements:
state in a Redis hash, cancel over Pub/Sub, a heartbeat key for the producer);
`MemoryRunStore` is the in-process one, for `MemoryBackend`.

The last event of every run is the end marker: ``event: end`` with JSON data
``{"state": "finished" | "failed" | "cancelled", "runId": ..., "events": n}``
(``"error"`` added when failed).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from typing_extensions import Self

from ._errors import BroadcasterClosedError, BroadcasterError
from ._event import Event, _check_name_and_retry
from ._run_state import RUN_END_EVENT, RunInfo, RunSource, RunState, RunStore
from ._subscription import Subscription
from ._types import check_session_id

if TYPE_CHECKING:
    from ._config import BroadcasterConfig
    from ._hub import Hub
    from ._types import Clock
    from .backends._base import Backend

__all__ = ["RunManager", "RunsMixin"]

logger = logging.getLogger("sse_broadcaster")

# Room kept under max_run_bytes for the end marker, so that it always fits.
_END_RESERVE = 512
# How much of a library-made reason the end marker carries.
_MAX_REASON = 200
# Seconds a generator's cleanup (its ``finally``) may take when its run ends while it
# is suspended at a ``yield`` (a cap, a refused item, a cancel between items): the
# close is shielded, and a cleanup that never returns must not hold up shutdown.
_CLOSE_TIMEOUT = 10.0


class _Publisher(Protocol):
    """What the manager needs of `EventBroadcaster`."""

    async def publish(
        self, session_id: str, data: Any, *, event: str | None = None, retry: int | None = None
    ) -> Event: ...


class _LocalRun:
    """A run started in this process: its task's cancel scope and progress."""

    __slots__ = ("cancelled", "done", "info", "scope")

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.scope = anyio.CancelScope()
        self.done = anyio.Event()
        self.cancelled = False


class RunManager:
    """Runs this process's generators in the broadcaster's task group (private)."""

    def __init__(
        self, publisher: _Publisher, store: RunStore, config: BroadcasterConfig, clock: Clock
    ) -> None:
        self._publisher = publisher
        self.store = store
        self._config = config
        self._clock = clock
        self._local: dict[str, _LocalRun] = {}
        self.started = 0
        self.expired = 0
        self.ended = {RunState.FINISHED: 0, RunState.FAILED: 0, RunState.CANCELLED: 0}
        self._closing = False

    async def start(self) -> None:
        await self.store.start(self._on_cancel)

    def _on_cancel(self, session_id: str, run_id: str) -> None:
        local = self._local.get(session_id)
        if local is not None and local.info.run_id == run_id:
            local.cancelled = True
            local.scope.cancel()

    async def start_run(
        self,
        task_group: TaskGroup,
        session_id: str,
        source: RunSource,
        event: str | None,
    ) -> RunInfo:
        if self._closing:
            raise BroadcasterClosedError("the EventBroadcaster is closing")
        if event == RUN_END_EVENT:
            raise ValueError(f"event {RUN_END_EVENT!r} is reserved for the end of a run")
        iterable = source() if callable(source) else source
        if not isinstance(iterable, AsyncIterable):
            raise TypeError(
                "a run needs an async iterable (an async generator) or a callable "
                f"returning one, got {type(iterable).__name__}"
            )
        info = await self.store.claim(session_id, secrets.token_hex(8), self._clock())
        local = _LocalRun(info)
        self._local[session_id] = local
        self.started += 1
        task_group.start_soon(
            self._run, local, iterable, event, name=f"sse_broadcaster run {session_id!r}"
        )
        interval = self.store.heartbeat_interval
        if interval is not None:
            task_group.start_soon(
                self._heartbeat,
                local,
                interval,
                name=f"sse_broadcaster run heartbeat {session_id!r}",
            )
        return info

    async def _heartbeat(self, local: _LocalRun, interval: float) -> None:
        """Tell the store the producer lives, until the run ends (shared stores only)."""
        while not local.done.is_set():
            try:
                await self.store.heartbeat(local.info)
            except Exception:
                # A missed beat is retried; enough of them and the store's sweep
                # ends the run as failed, which is right for a producer it cannot see.
                logger.exception(
                    "sse_broadcaster: run heartbeat of %r failed", local.info.session_id
                )
            with anyio.move_on_after(interval):
                await local.done.wait()

    def snapshot(self, session_id: str) -> RunInfo | None:
        """The live state of a run started here (None: not running here)."""
        local = self._local.get(session_id)
        return None if local is None else local.info

    async def info(self, session_id: str) -> RunInfo | None:
        local = self._local.get(session_id)
        if local is not None:
            return local.info
        return await self.store.get(session_id)

    async def cancel(self, session_id: str) -> bool:
        info = await self.store.cancel(session_id)
        if info is None:
            return False
        local = self._local.get(session_id)
        if local is not None and local.info.run_id == info.run_id:
            local.cancelled = True
            local.scope.cancel()
            await local.done.wait()
        return True

    async def aclose(self) -> None:
        """Cancel every local run and wait for their end markers."""
        self._closing = True
        locals_ = list(self._local.values())
        for local in locals_:
            local.cancelled = True
            local.scope.cancel()
        for local in locals_:
            await local.done.wait()
        with anyio.CancelScope(shield=True):
            await self.store.aclose()

    async def sweep(self) -> int:
        result = await self.store.sweep()
        self.expired += result.expired
        for dead in result.dead:
            try:
                await self._publish_end(
                    replace(dead, state=RunState.FAILED, error="the run's producer stopped"),
                    "the run's producer stopped",
                )
            except BroadcasterError:
                logger.exception("sse_broadcaster: could not end dead run of %r", dead.session_id)
        return result.expired

    async def _publish_end(self, info: RunInfo, reason: str | None) -> RunInfo:
        data: dict[str, Any] = {"state": info.state.value, "runId": info.run_id}
        data["events"] = info.events
        if reason is not None:
            data["error"] = reason[:_MAX_REASON]
        end = await self._publisher.publish(
            info.session_id, json.dumps(data, separators=(",", ":")), event=RUN_END_EVENT
        )
        info = replace(info, end_event_id=end.id, ended_at=self._clock())
        await self.store.ended(info)
        return info

    async def _run(self, local: _LocalRun, items: AsyncIterable[Any], event: str | None) -> None:
        state = RunState.FINISHED
        reason: str | None = None  # what clients see
        error: str | None = None  # what the server keeps
        config = self._config
        max_events = config.max_run_events - 1  # the end marker is one of them
        max_bytes = config.max_run_bytes - _END_RESERVE
        iterator: AsyncIterator[Any] = aiter(items)
        try:
            with local.scope:
                while True:
                    try:
                        item = await iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    try:
                        data, name, retry = _split(item, event)
                        published = await self._publisher.publish(
                            local.info.session_id, data, event=name, retry=retry
                        )
                    except (BroadcasterError, ValueError, TypeError) as exc:
                        # The library refused the item: its own message is safe to show.
                        state = RunState.FAILED
                        reason = error = f"item {local.info.events + 1} refused: {exc}"
                        break
                    # Counted before the checkpoint below: a cancel landing there must
                    # not leave a published item out of the end marker's count.
                    info = local.info
                    local.info = replace(
                        info,
                        first_event_id=info.first_event_id or published.id,
                        events=info.events + 1,
                        bytes=info.bytes + len(published._wire),
                    )
                    if local.info.events >= max_events or local.info.bytes >= max_bytes:
                        state = RunState.FAILED
                        reason = error = (
                            f"the run's transcript reached its cap (max_run_events="
                            f"{config.max_run_events}, max_run_bytes={config.max_run_bytes})"
                        )
                        break
                    # Publishing never yields with the memory backend: let readers drain
                    # (and a cancel land) between items, as a paced producer would.
                    await anyio.lowlevel.checkpoint()
            if local.cancelled or local.scope.cancelled_caught:
                state = RunState.CANCELLED
        except Exception as exc:
            state = RunState.FAILED
            reason = _client_reason(exc)
            error = f"{type(exc).__name__}: {exc}"[:1000]
            logger.exception("sse_broadcaster run of session %r failed", local.info.session_id)
        except BaseException:
            # Cancelled from outside (the host's scope): end it as cancelled, then go.
            state = RunState.CANCELLED
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await _aclose(iterator)
                info = replace(local.info, state=state, error=error)
                try:
                    local.info = await self._publish_end(info, reason)
                except Exception:
                    logger.exception(
                        "sse_broadcaster: the end of the run of %r was not published",
                        info.session_id,
                    )
                    local.info = replace(info, ended_at=self._clock())
                    await self.store.ended(local.info)
                self.ended[state] += 1
                if self._local.get(info.session_id) is local:
                    del self._local[info.session_id]
                local.done.set()


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    """Close the generator so that its ``finally`` runs now (and only once)."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        with anyio.move_on_after(_CLOSE_TIMEOUT):
            await aclose()
    except Exception:
        logger.exception("sse_broadcaster: closing a run's generator raised")


_ITEM_KEYS = frozenset({"data", "event", "retry"})


def _split(item: Any, default_event: str | None) -> tuple[Any, str | None, int | None]:
    """(data, event name, retry) of one item of a run."""
    if isinstance(item, Mapping) and "data" in item and item.keys() <= _ITEM_KEYS:
        name = item.get("event", default_event)
        if name == RUN_END_EVENT:
            raise ValueError(f"event {RUN_END_EVENT!r} is reserved for the end of a run")
        return item["data"], name, item.get("retry")
    return item, default_event, None


def _client_reason(exc: Exception) -> str:
    """What a client may read of a generator's exception: its class name only.

    Messages of arbitrary exceptions can carry internals (queries, paths,
    tokens); the full text is logged and kept in `RunInfo.error`.
    """
    return f"the run raised {type(exc).__name__}"


class _UntilEnd(Subscription):
    """A subscription that ends cleanly after yielding a run's end marker."""

    __slots__ = ("_run_info", "_seen_end")

    def __init__(
        self,
        owner: Any,
        session_id: str,
        last_event_id: str | None,
        run_info: Callable[[], Awaitable[RunInfo | None]],
    ) -> None:
        super().__init__(owner, session_id, last_event_id)
        self._run_info = run_info
        self._seen_end = False

    async def __aenter__(self) -> Self:
        info = await self._run_info()
        if self.last_event_id is None and info is not None and info.retained:
            # A new reader (a second tab) follows the session's run from its first event.
            self.last_event_id = info.replay_from
        await super().__aenter__()
        if info is not None and info.is_end(self.last_event_id):
            self._seen_end = True  # resumed after the end: nothing more will come
            self._end(None)
        return self

    def _cut(self, events: list[Event]) -> list[Event]:
        if self._seen_end:
            return []
        for i, event in enumerate(events):
            if event.event == RUN_END_EVENT:
                self._seen_end = True
                self._end(None)
                return events[: i + 1]
        return events

    def _check_done(self) -> None:
        if self._seen_end:
            self.close()
            raise anyio.EndOfStream

    def receive_nowait(self) -> Event:
        self._check_done()
        return self._cut([super().receive_nowait()])[0]

    async def receive(self) -> Event:
        self._check_done()
        return self._cut([await super().receive()])[0]

    async def receive_batch(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        self._check_done()
        # It drains through drain_nowait, which cuts after the end marker.
        return await super().receive_batch(max_events, max_bytes)

    def drain_nowait(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        return self._cut(super().drain_nowait(max_events, max_bytes))

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class RunsMixin:
    """The run methods of `EventBroadcaster` (#13), kept here beside their machinery."""

    _backend: Backend
    _clock: Clock
    _config: BroadcasterConfig
    _hub: Hub
    _runs: RunManager | None
    _task_group: TaskGroup | None

    async def _start_runs(self) -> RunManager | None:
        make_store = getattr(self._backend, "run_store", None)
        if make_store is None:
            return None  # this backend keeps no runs: start_run says so
        store: RunStore = make_store()
        manager = RunManager(cast(_Publisher, self), store, self._config, self._clock)
        await manager.start()
        return manager

    def _require_runs(self) -> RunManager:
        self._hub.check_running()
        if self._runs is None:
            raise BroadcasterError(
                f"the backend {type(self._backend).__name__} does not support runs "
                "(it has no run_store())"
            )
        return self._runs

    async def start_run(
        self, session_id: str, source: RunSource, *, event: str | None = None
    ) -> RunInfo:
        """Run an async generator in the background, publishing each item to the session.

        Returns at once; the run lives in the broadcaster's task group, not in the
        caller's request. Each item is published as `publish` would (str, bytes
        or JSON-able data), or, when it is a mapping with a ``"data"`` key and
        at most ``"event"`` and ``"retry"`` besides, as those fields. Items are
        named `event` unless they say otherwise. The run's last event is its end
        marker (``event: end``). At most one run per session runs at a time.

        Args:
            session_id: the session the run publishes to.
            source: an async iterable (an async generator), or a callable without
                arguments returning one.
            event: the event name of the run's items (None: unnamed, "message").

        Returns:
            The run's state now (running).

        Raises:
            RunActiveError: the session has a running run.
            RunLimitError: ``max_runs`` runs are running.
            ValueError: bad session id, or `event` is bad or "end".
            TypeError: `source` is not an async iterable.
            SessionLimitError: the session is new and ``max_sessions`` is reached.
            BroadcasterClosedError: the broadcaster is not running.
        """
        check_session_id(session_id)
        if event is not None:
            _check_name_and_retry(event, None)
        runs = self._require_runs()
        task_group = self._task_group
        if task_group is None:  # pragma: no cover - running implies entered
            self._hub.check_running()
            raise RuntimeError("no task group")
        return await runs.start_run(task_group, session_id, source, event)

    async def run_info(self, session_id: str) -> RunInfo | None:
        """The session's latest run: running, ended and retained, or swept.

        A swept run (``retained`` False) is remembered for ``session_ttl``; None
        when the session has had no run (or it was forgotten).
        """
        check_session_id(session_id)
        return await self._require_runs().info(session_id)

    async def cancel_run(self, session_id: str) -> bool:
        """Cancel the session's running run, wherever it runs.

        The generator is cancelled at its current ``await`` (its ``finally``
        runs), then the end marker says ``"cancelled"``. With a run of this
        process, this returns once the end marker is published.

        Returns:
            True when a running run was asked to stop; False when none was running.
        """
        check_session_id(session_id)
        return await self._require_runs().cancel(session_id)

    async def _until_end_info(self, session_id: str) -> RunInfo | None:
        self._hub.check_running()
        return None if self._runs is None else await self._runs.info(session_id)

    def _run_counters(self) -> dict[str, int]:
        runs = self._runs
        if runs is None:
            return {}
        counts = runs.store.counts()
        return {
            "runs_running": counts.running,
            "runs_retained": counts.finished + counts.failed + counts.cancelled,
            "runs_started": runs.started,
            "runs_finished": runs.ended[RunState.FINISHED],
            "runs_failed": runs.ended[RunState.FAILED],
            "runs_cancelled": runs.ended[RunState.CANCELLED],
            "runs_expired": runs.expired,
            "run_transcript_bytes": counts.transcript_bytes,
        }
