from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import overload

from .._errors import BroadcasterClosedError, EventTooLargeError, GapError, SessionLimitError
from .._event import Event, make_event
from ._base import BackendCounts, BackendHub, Replay, SweepResult

__all__ = ["MemoryBackend"]

# Rough per-object costs for the memory estimate (CPython 3.11, 64-bit).
_EVENT_OVERHEAD = 240  # Event object, its id str and index entries
_SESSION_OVERHEAD = 900  # _Session object, dict entry, empty history deque
# The index is compacted once it holds more stale entries than this and than live ones.
_COMPACT_MIN = 1024


class _Session:
    __slots__ = ("bytes", "epoch", "history", "id", "last_active", "seq")

    def __init__(self, session_id: str, epoch: str, now: float) -> None:
        self.id = session_id
        self.epoch = epoch
        self.seq = 0
        self.history: deque[Event] = deque()
        self.bytes = 0
        self.last_active = now


class _HistoryCursor(Sequence[Event]):
    """A replay as a window of its session's history (``n`` from `start` to `end`).

    Holds the session and two numbers, not the events: a subscriber takes them
    out of history chunk by chunk (`take`) as it sends them, so N replays of
    a large history cost N cursors, not N copies or N lists.
    """

    __slots__ = ("_end", "_history", "_next", "_session")

    def __init__(self, session: _Session, start: int, end: int) -> None:
        self._session = session
        # The deque itself: a closed session's is left to its pending replays.
        self._history = session.history
        self._next = start
        self._end = end

    def __len__(self) -> int:
        return max(0, self._end - self._next + 1)

    @overload
    def __getitem__(self, index: int) -> Event: ...
    @overload
    def __getitem__(self, index: slice) -> list[Event]: ...
    def __getitem__(self, index: int | slice) -> Event | list[Event]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("replay index out of range")
        history = self._history
        position = self._next + index - (self._session.seq - len(history) + 1)
        if position < 0:
            raise IndexError("the event left history")
        return history[position]

    def __iter__(self) -> Iterator[Event]:
        history = self._history
        first = self._session.seq - len(history) + 1
        start = max(self._next - first, 0)
        return islice(history, start, max(self._end - first + 1, start))

    def take(self, max_bytes: int) -> list[Event]:
        """The next events, at most `max_bytes` encoded bytes but at least one; [] at the end.

        Raises:
            GapError: the next event was evicted (by count, bytes) before it was taken.
        """
        if self._next > self._end:
            return []
        session = self._session
        history = self._history
        first = session.seq - len(history) + 1
        if self._next < first:
            missing = self._next
            self._next = self._end + 1
            raise GapError(
                f"replay of session {session.id!r} fell behind its history: event "
                f"{session.epoch}-{missing} was evicted before it was sent"
            )
        taken: list[Event] = []
        size = 0
        for event in islice(history, self._next - first, self._end - first + 1):
            size += len(event._wire)
            if taken and size > max_bytes:
                break
            taken.append(event)
        self._next += len(taken)
        return taken


class MemoryBackend:
    """Sessions and history in this process's memory: the default backend.

    Event ids look like ``"<epoch>-<n>"``: ``n`` counts the session's events
    from 1 without holes, and the epoch is new for every session this backend
    creates, so an id from an earlier run (or an earlier incarnation of an
    expired session) is never taken for a position in the current history.

    History is bounded per session by count (``max_history_per_session``) and
    age (``event_ttl``), and across sessions by bytes (``max_history_bytes``).
    A deque of all retained events in publish order makes eviction of the
    globally oldest O(1); entries already evicted by a per-session bound stay
    in it as stale entries, and the deque is compacted when they outnumber the
    live ones, so its length stays within twice the retained count (amortised
    O(1) per event).
    """

    def __init__(self) -> None:
        self._hub: BackendHub | None = None
        self._token = secrets.token_hex(3)
        self._epochs = 0
        self._sessions: dict[str, _Session] = {}
        self._index: deque[Event] = deque()
        self._stale = 0
        self._events = 0
        self._bytes = 0
        self._closed = False

    def _require_hub(self) -> BackendHub:
        if self._hub is None or self._closed:
            raise BroadcasterClosedError("the backend is not running")
        return self._hub

    async def start(self, hub: BackendHub) -> None:
        if self._hub is not None:
            raise RuntimeError("a MemoryBackend serves one EventBroadcaster, once")
        self._hub = hub

    async def aclose(self) -> None:
        self._closed = True
        self._sessions.clear()
        self._index.clear()
        self._stale = self._events = self._bytes = 0

    # -- sessions ----------------------------------------------------------------------

    def _session(self, session_id: str, hub: BackendHub) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            limit = hub.config.max_sessions
            if limit is not None and len(self._sessions) >= limit:
                raise SessionLimitError(
                    f"cannot create session {session_id!r}: max_sessions={limit} reached"
                )
            self._epochs += 1
            session = _Session(session_id, f"{self._token}{self._epochs:x}", hub.clock())
            self._sessions[session_id] = session
        return session

    def _drop_session(self, session: _Session) -> None:
        del self._sessions[session.id]
        self._stale += len(session.history)
        self._events -= len(session.history)
        self._bytes -= session.bytes
        # A new deque, not clear(): replays still pending read the old one (_HistoryCursor).
        session.history = deque()
        session.bytes = 0
        self._maybe_compact()

    # -- history -----------------------------------------------------------------------

    def _evict_oldest(self, session: _Session) -> None:
        event = session.history.popleft()
        size = len(event._wire)
        session.bytes -= size
        self._bytes -= size
        self._events -= 1

    def _maybe_compact(self) -> None:
        if self._stale > _COMPACT_MIN and self._stale * 2 > len(self._index):
            live = [e for e in self._index if self._is_retained(e)]
            self._index = deque(live)
            self._stale = 0

    def _is_retained(self, event: Event) -> bool:
        session = self._sessions.get(event.session_id)
        if session is None or not session.history:
            return False
        epoch, _, n = event.id.rpartition("-")
        if epoch != session.epoch:
            return False
        return int(n) > session.seq - len(session.history)

    def _pop_index(self) -> None:
        """Remove the globally oldest index entry, evicting its event if still retained."""
        event = self._index.popleft()
        session = self._sessions.get(event.session_id)
        if session is not None and session.history and session.history[0] is event:
            self._evict_oldest(session)
        else:
            self._stale -= 1

    def _retained(self, session: _Session, now: float) -> tuple[int, deque[Event] | list[Event]]:
        """(n of the first retained event, events) ignoring those past event_ttl."""
        history = session.history
        first = session.seq - len(history) + 1
        ttl = self._require_hub().config.event_ttl
        if ttl is None or not history or history[0].timestamp > now - ttl:
            return first, history
        cutoff = now - ttl
        skip = 0
        for event in history:
            if event.timestamp > cutoff:
                break
            skip += 1
        return first + skip, list(islice(history, skip, None))

    def _after(self, session: _Session, last_event_id: str | None) -> Replay:
        """The replay after `last_event_id`: a cursor over history, no copy of it."""
        hub = self._require_hub()
        first, _ = self._retained(session, hub.clock())
        if last_event_id is None:
            return Replay((), False)
        epoch, sep, n_text = last_event_id.rpartition("-")
        if (
            sep
            and epoch == session.epoch
            and n_text.isascii()
            and n_text.isdigit()
            and len(n_text) <= 20
        ):
            n = int(n_text)
            if first - 1 <= n <= session.seq:
                return Replay(_HistoryCursor(session, n + 1, session.seq), False)
        # Unknown, malformed, from another epoch, ahead of us, or older than what is
        # retained: events may have been lost. Replay everything still retained.
        return Replay(_HistoryCursor(session, first, session.seq), True)

    # -- Backend -----------------------------------------------------------------------

    async def publish(
        self, session_id: str, data: str, event: str | None, retry: int | None
    ) -> Event:
        hub = self._require_hub()
        config = hub.config
        created = session_id not in self._sessions
        session = self._session(session_id, hub)
        now = hub.clock()
        try:
            new = make_event(
                f"{session.epoch}-{session.seq + 1}", session_id, data, event, retry, now
            )
            size = len(new._wire)
            if size > config.max_event_bytes:
                raise EventTooLargeError(
                    f"event of {size} bytes encoded exceeds "
                    f"max_event_bytes={config.max_event_bytes}"
                )
        except ValueError:
            # A bad event name or retry, data not encodable, or too large: do not
            # leave a session behind for a refused event.
            if created:
                del self._sessions[session_id]
            raise
        session.seq += 1
        session.last_active = now
        if config.max_history_per_session:
            history = session.history
            if len(history) >= config.max_history_per_session:
                oldest = history[0]
                self._evict_oldest(session)
                if self._index[0] is oldest:
                    self._index.popleft()  # the common case: no stale entry left behind
                else:
                    self._stale += 1
            history.append(new)
            session.bytes += size
            self._bytes += size
            self._events += 1
            self._index.append(new)
            limit = config.max_history_bytes
            if limit is not None:
                while self._bytes > limit:
                    self._pop_index()
            if self._stale > _COMPACT_MIN:
                self._maybe_compact()
        hub.deliver(session_id, new)
        return new

    async def attach(
        self, session_id: str, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay:
        hub = self._require_hub()
        exists = session_id in self._sessions
        session = self._session(session_id, hub)
        if not exists and last_event_id is not None:
            replay = Replay((), True)  # the session is gone, and its history with it
        else:
            replay = self._after(session, last_event_id)
        session.last_active = hub.clock()
        register()
        return replay

    async def detach(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None and self._hub is not None:
            session.last_active = self._hub.clock()

    async def history(self, session_id: str, after: str | None) -> list[Event]:
        session = self._sessions.get(session_id)
        if session is None:
            return []
        if after is None:
            return list(self._retained(session, self._require_hub().clock())[1])
        return list(self._after(session, after).events)

    async def close_session(self, session_id: str) -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._drop_session(session)
        return True

    async def sweep(self) -> SweepResult:
        hub = self._require_hub()
        config = hub.config
        now = hub.clock()
        expired = 0
        if config.event_ttl is not None:
            # The index is in publish order, so expired events are at its left end:
            # the cost is what is removed, not what is retained.
            cutoff = now - config.event_ttl
            index = self._index
            while index and index[0].timestamp <= cutoff:
                event = index[0]
                session = self._sessions.get(event.session_id)
                live = bool(session and session.history and session.history[0] is event)
                self._pop_index()
                expired += live
        idle_before = now - config.session_ttl
        gone = [
            s
            for s in self._sessions.values()
            if s.last_active <= idle_before and not hub.has_subscribers(s.id)
        ]
        for session in gone:
            self._drop_session(session)
        return SweepResult(expired, len(gone), tuple(s.id for s in gone))

    def counts(self) -> BackendCounts:
        estimate = (
            2 * self._bytes
            + self._events * _EVENT_OVERHEAD
            + len(self._sessions) * _SESSION_OVERHEAD
            + len(self._index) * 8
        )
        return BackendCounts(len(self._sessions), self._events, estimate)

    def stats(self) -> dict[str, object]:
        return {
            "type": "memory",
            "sessions": len(self._sessions),
            "retainedEvents": self._events,
            "historyBytes": self._bytes,
        }
