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

import enum
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from typing_extensions import Self

from ._errors import BroadcasterClosedError, BroadcasterError, RunActiveError, RunLimitError
from ._event import Event
from ._subscription import Subscription

if TYPE_CHECKING:
    from ._config import BroadcasterConfig
    from ._types import Clock

__all__ = [
    "RUN_END_EVENT",
    "MemoryRunStore",
    "RunCounts",
    "RunInfo",
    "RunSource",
    "RunState",
    "RunStore",
    "RunSweep",
]

logger = logging.getLogger("sse_broadcaster")

RUN_END_EVENT = "end"
"""The event name of a run's end marker (reserved: a run's items may not use it)."""

# Room kept under max_run_bytes for the end marker, so that it always fits.
_END_RESERVE = 512
# How much of a library-made reason the end marker carries.
_MAX_REASON = 200

#: What `EventBroadcaster.start_run` accepts: an async iterable of items, or a
#: callable without arguments returning one (an async generator function).
RunSource: TypeAlias = AsyncIterable[Any] | Callable[[], AsyncIterable[Any]]


class RunState(str, enum.Enum):
    """Where a run is in its life."""

    RUNNING = "running"
    FINISHED = "finished"
    """The generator was exhausted."""
    FAILED = "failed"
    """The generator raised, an item was refused, a cap was reached, or the producer died."""
    CANCELLED = "cancelled"
    """`cancel_run`, `close_session` or the broadcaster closing stopped it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunInfo:
    """A snapshot of a run, from `EventBroadcaster.start_run` and `run_info`."""

    session_id: str
    run_id: str
    """Random, unique per run; also in the end marker's data (``runId``)."""
    state: RunState
    started_at: float
    replay_from: str | None = None
    """The Last-Event-ID that replays the run from its first event (the session's
    last id before the run; opaque, as every id)."""
    ended_at: float | None = None
    first_event_id: str | None = None
    """Id of the run's first event (None until it publishes one)."""
    end_event_id: str | None = None
    """Id of the end marker (None while running)."""
    events: int = 0
    """Items published so far (the end marker not counted)."""
    bytes: int = 0
    """Encoded bytes of those items."""
    error: str | None = None
    """Why it failed, for the server's eyes (may name internals; clients get less)."""
    retained: bool = True
    """False once the transcript was swept (``run_ttl`` after the end): not resumable."""

    @property
    def ended(self) -> bool:
        return self.state is not RunState.RUNNING

    def is_end(self, last_event_id: str | None) -> bool:
        """True when `last_event_id` is this run's end marker: nothing more will come.

        The HTTP adapters answer such a reconnect with 204 so that an
        EventSource stops reconnecting.
        """
        return last_event_id is not None and last_event_id == self.end_event_id


@dataclass(frozen=True, slots=True)
class RunCounts:
    """What `RunStore.counts` answers: runs whose state this store holds."""

    running: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    transcript_bytes: int = 0


@dataclass(frozen=True, slots=True)
class RunSweep:
    """What one `RunStore.sweep` did."""

    expired: int = 0
    """Ended runs whose transcript was dropped (``run_ttl`` passed)."""
    dead: Sequence[RunInfo] = ()
    """Running runs whose producer stopped heartbeating: the manager ends them as failed."""


@runtime_checkable
class RunStore(Protocol):
    """Where the state of runs lives, and how cancellation reaches the producer.

    The `RunManager` of each process runs the generators it started and calls
    these; a backend offers one through a ``run_store()`` method. The memory
    store keeps everything in this process. A shared one (Redis) keeps each
    run in a hash, delivers `cancel` to the owning process over Pub/Sub (that
    process's `on_cancel` callback), and has the owner refresh a heartbeat key
    with a TTL of ``run_heartbeat_timeout`` every `heartbeat_interval`: `sweep`
    reports runs whose key expired as `RunSweep.dead`.
    """

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between `heartbeat` calls of a running run (None: not needed)."""

    async def start(self, on_cancel: Callable[[str, str], None]) -> None:
        """Begin; ``on_cancel(session_id, run_id)`` stops a run started in this process."""

    async def aclose(self) -> None:
        """Release resources (the broadcaster has ended every local run)."""

    async def claim(self, session_id: str, run_id: str, now: float) -> RunInfo:
        """Record a new running run of the session and retain its transcript in full.

        Raises:
            RunActiveError: a run of the session is running (in any process).
            RunLimitError: ``max_runs`` runs are running.
            SessionLimitError: the session is new and ``max_sessions`` is reached.
        """

    async def ended(self, info: RunInfo) -> None:
        """Record the run's end (its end marker is published); ``run_ttl`` starts."""

    async def get(self, session_id: str) -> RunInfo | None:
        """The session's latest run (running, retained, or swept but remembered)."""

    async def cancel(self, session_id: str) -> RunInfo | None:
        """Ask the process running the session's run to cancel it; the run, if running."""

    async def heartbeat(self, info: RunInfo) -> None:
        """The run's producer is alive (called every `heartbeat_interval`)."""

    async def forget(self, session_id: str) -> None:
        """Drop the session's run record (the session is being closed)."""

    async def sweep(self) -> RunSweep:
        """Drop transcripts ``run_ttl`` after their end; find dead producers."""

    def counts(self) -> RunCounts:
        """Runs by state and transcript bytes, in O(1)."""


class PinningBackend(Protocol):
    """What `MemoryRunStore` needs of `MemoryBackend`: retain a session's history in full."""

    def pin(self, session_id: str, *, reset: bool) -> str: ...

    def unpin(self, session_id: str) -> None: ...

    def pinned_bytes(self) -> int: ...


class MemoryRunStore:
    """Run state in this process, for `MemoryBackend` (made by its ``run_store()``).

    A running or retained run *pins* its session in the backend: its history is
    then trimmed neither by ``max_history_per_session`` nor by ``event_ttl`` nor
    by ``max_history_bytes``, only by ``max_run_events`` / ``max_run_bytes``,
    and the session holds its ``max_sessions`` slot. A swept run is remembered
    (``retained=False``) for ``session_ttl``, at most ``max_sessions`` of them
    (10,000 without that limit), so that a late reconnect learns that it expired.
    """

    def __init__(self, backend: PinningBackend, config: BroadcasterConfig, clock: Clock) -> None:
        self._backend = backend
        self._config = config
        self._clock = clock
        self._on_cancel: Callable[[str, str], None] | None = None
        self._runs: dict[str, RunInfo] = {}
        # Ended, retained runs by session id, in order of their end (the sweep's order).
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._running = 0
        self._by_state = {RunState.FINISHED: 0, RunState.FAILED: 0, RunState.CANCELLED: 0}
        # Swept runs, for `get`: session id -> (info, when swept).
        self._swept: OrderedDict[str, tuple[RunInfo, float]] = OrderedDict()

    @property
    def heartbeat_interval(self) -> float | None:
        return None  # the producer is this process: it cannot die without the store

    async def start(self, on_cancel: Callable[[str, str], None]) -> None:
        self._on_cancel = on_cancel

    async def aclose(self) -> None:
        self._runs.clear()
        self._ended.clear()
        self._swept.clear()

    async def claim(self, session_id: str, run_id: str, now: float) -> RunInfo:
        current = self._runs.get(session_id)
        if current is not None and current.state is RunState.RUNNING:
            raise RunActiveError(
                f"session {session_id!r} already has a running run ({current.run_id}); "
                "cancel it (cancel_run) or wait for its end"
            )
        limit = self._config.max_runs
        if self._running >= limit:
            raise RunLimitError(f"cannot start a run: max_runs={limit} runs are running")
        # A transcript is retained per session: the previous run's goes now (readers
        # resuming inside it are told of a gap), and past max_runs transcripts the
        # oldest ended one goes before its run_ttl.
        if current is not None:
            self._drop(session_id, now)
        while self._running + len(self._ended) >= limit:
            self._drop(next(iter(self._ended)), now)
        replay_from = self._backend.pin(session_id, reset=current is not None)
        info = RunInfo(
            session_id=session_id,
            run_id=run_id,
            state=RunState.RUNNING,
            started_at=now,
            replay_from=replay_from,
        )
        self._runs[session_id] = info
        self._swept.pop(session_id, None)
        self._running += 1
        return info

    def _drop(self, session_id: str, now: float) -> None:
        """Unpin an ended run's transcript and remember the run as swept."""
        info = self._runs.pop(session_id)
        self._ended.pop(session_id, None)
        self._by_state[info.state] -= 1
        self._backend.unpin(session_id)
        swept = self._swept
        swept[session_id] = (replace(info, retained=False), now)
        limit = self._config.max_sessions or 10_000
        while len(swept) > limit:
            swept.popitem(last=False)

    async def ended(self, info: RunInfo) -> None:
        current = self._runs.get(info.session_id)
        if current is None or current.run_id != info.run_id or current.ended:
            return
        self._runs[info.session_id] = info
        self._running -= 1
        self._by_state[info.state] += 1
        self._ended[info.session_id] = info.ended_at or self._clock()

    async def get(self, session_id: str) -> RunInfo | None:
        info = self._runs.get(session_id)
        if info is not None:
            return info
        swept = self._swept.get(session_id)
        return None if swept is None else swept[0]

    async def cancel(self, session_id: str) -> RunInfo | None:
        info = self._runs.get(session_id)
        if info is None or info.ended:
            return None
        if self._on_cancel is not None:
            self._on_cancel(session_id, info.run_id)
        return info

    async def heartbeat(self, info: RunInfo) -> None:
        return None

    async def forget(self, session_id: str) -> None:
        info = self._runs.get(session_id)
        if info is not None and info.ended:
            self._drop(session_id, self._clock())
        self._swept.pop(session_id, None)

    async def sweep(self) -> RunSweep:
        now = self._clock()
        cutoff = now - self._config.run_ttl
        expired = 0
        ended = self._ended
        while ended and next(iter(ended.values())) <= cutoff:
            self._drop(next(iter(ended)), now)
            expired += 1
        idle_before = now - self._config.session_ttl
        swept = self._swept
        while swept and next(iter(swept.values()))[1] <= idle_before:
            swept.popitem(last=False)
        return RunSweep(expired, ())

    def counts(self) -> RunCounts:
        by_state = self._by_state
        return RunCounts(
            self._running,
            by_state[RunState.FINISHED],
            by_state[RunState.FAILED],
            by_state[RunState.CANCELLED],
            self._backend.pinned_bytes(),
        )


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
                    # Publishing never yields with the memory backend: let readers drain
                    # (and a cancel land) between items, as a paced producer would.
                    await anyio.lowlevel.checkpoint()
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

    async def receive_batch(self, max_events: int | None = None) -> list[Event]:
        self._check_done()
        return await super().receive_batch(max_events)  # it drains through drain_nowait

    def drain_nowait(self, max_events: int | None = None) -> list[Event]:
        return self._cut(super().drain_nowait(max_events))

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
