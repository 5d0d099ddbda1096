"""`MemoryRunStore`: the state of resumable runs in this process, for `MemoryBackend`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from ._errors import RunActiveError, RunLimitError
from ._run_state import RunCounts, RunInfo, RunState, RunSweep

if TYPE_CHECKING:
    from ._config import BroadcasterConfig
    from ._types import Clock

__all__ = ["MemoryRunStore", "PinningBackend"]


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
