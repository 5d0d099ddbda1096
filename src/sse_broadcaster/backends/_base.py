from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .._config import BroadcasterConfig
    from .._event import Event
    from .._types import Clock

__all__ = ["Backend", "BackendCounts", "BackendHub", "Replay", "SweepResult"]


@dataclass(frozen=True, slots=True)
class Replay:
    """What a backend answers when a subscriber attaches."""

    events: Sequence[Event]
    """Retained events after the subscriber's last id, oldest first."""
    gap: bool
    """True when events after that id may have been lost."""
    position: str | None = None
    """The session's position at attach: live events follow it, replayed events do not.

    The id of its newest event, or a marker for an empty session that, given
    back as a last id, replays every later event with no gap. None when the
    backend cannot tell (`EventBroadcaster.subscribe_many` then treats the
    session's position as unknown until an event of it is received).
    """


class BackendCounts(NamedTuple):
    """What `Backend.counts` answers: O(1) figures for `EventBroadcaster.stats`."""

    sessions: int
    """Sessions holding a ``max_sessions`` slot (a shared backend: those followed here)."""
    events: int
    """Events retained in history (a shared backend: as of its last sweep)."""
    estimate_bytes: int
    """Estimate of the bytes this process holds for the backend."""


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep of a backend removed."""

    expired_events: int = 0
    sessions_expired: int = 0
    expired_session_ids: Sequence[str] = field(default=())


class BackendHub(Protocol):
    """What a backend sees of the broadcaster it serves.

    `Backend.start` receives a private hub object of the broadcaster's, not the
    broadcaster itself: these calls are not part of `EventBroadcaster`.
    """

    @property
    def config(self) -> BroadcasterConfig: ...

    @property
    def clock(self) -> Clock: ...

    def deliver(self, session_id: str, event: Event) -> None:
        """Hand a live event to this process's subscribers of the session. Never awaits."""

    def end_session(self, session_id: str, error: BaseException | None = None) -> None:
        """End this process's subscriptions of the session (after their queued events)."""

    def has_subscribers(self, session_id: str) -> bool:
        """Whether this process has live subscribers of the session."""


@runtime_checkable
class Backend(Protocol):
    """Where history lives and where live events come from.

    The broadcaster keeps the subscribers of its own process; a backend keeps
    session state (ids, history) and hands live events to
    `BackendHub.deliver`. The in-memory backend does it inside `publish`; a
    shared backend (Redis) does it from its own reader for events published
    by any process.
    """

    async def start(self, hub: BackendHub) -> None:
        """Bind to the broadcaster and start any background work."""

    async def aclose(self) -> None:
        """Release every resource. Called once, when the broadcaster closes."""

    async def publish(
        self, session_id: str, data: str, event: str | None, retry: int | None
    ) -> Event:
        """Assign the next id, store the event in history and fan it out.

        Raises:
            SessionLimitError: the session is new and ``max_sessions`` is reached.
            EventTooLargeError: the encoded event exceeds ``max_event_bytes``.
            BackendUnavailableError: the event was not stored.
        """

    async def attach(
        self, session_id: str, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay:
        """Prepare live delivery for a new local subscriber and compute its replay.

        The backend calls `register` at the point from which every later event
        reaches `BackendHub.deliver` and returns the retained events after
        `last_event_id` up to that point: no duplicate, no hole.

        Raises:
            SessionLimitError: the session is new and ``max_sessions`` is reached.
        """

    async def detach(self, session_id: str) -> None:
        """This process may have no subscriber of the session left.

        A session with no subscriber here and no retained event must not keep
        a ``max_sessions`` slot (#10.6): release it here, and where expiry or
        eviction empties it, not at ``session_ttl``.
        """

    async def history(self, session_id: str, after: str | None) -> list[Event]:
        """Retained events of the session after `after` (all when None or unknown)."""

    async def close_session(self, session_id: str) -> bool:
        """Drop the session's history; True when it existed.

        A backend whose live events arrive asynchronously should end this
        process's subscriptions (`BackendHub.end_session`) only after the events
        published before the close were delivered; the broadcaster ends any
        that remain when this returns.
        """

    async def sweep(self) -> SweepResult:
        """Drop expired events and idle sessions; cost grows with what is removed."""

    def counts(self) -> BackendCounts:
        """Sessions, retained events and estimated bytes held, in O(1)."""

    def stats(self) -> dict[str, object]:
        """Backend-specific figures for `EventBroadcaster.stats` (the ``backend`` key)."""
