"""The state of resumable runs (#13): `RunState`, `RunInfo`, and the `RunStore` seam.

A `RunStore` keeps the state of runs and carries cancellation to the process
running one; `_run_store.MemoryRunStore` is the in-process one, a shared
backend (Redis) brings its own through ``run_store()``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "RUN_END_EVENT",
    "RunCounts",
    "RunInfo",
    "RunSource",
    "RunState",
    "RunStore",
    "RunSweep",
]

RUN_END_EVENT = "end"
"""The event name of a run's end marker (reserved: a run's items may not use it)."""


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
