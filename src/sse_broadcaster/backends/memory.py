from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, overload

from .._errors import BroadcasterClosedError, EventTooLargeError, GapError, SessionLimitError
from .._event import Event, make_event
from .._run_store import MemoryRunStore
from ._base import BackendCounts, BackendHub, Replay, SweepResult

if TYPE_CHECKING:
    from .._config import BroadcasterConfig

__all__ = ["MemoryBackend"]

# Rough per-object costs for the memory estimate (CPython 3.11, 64-bit).
_EVENT_OVERHEAD = 240  # Event object, its id str and index entries
_SESSION_OVERHEAD = 900  # _Session object, dict entry, empty history deque
_RELEASED_OVERHEAD = 250  # a released session's entry: id, epoch, tuple, dict entry
# The index is compacted once it holds more stale entries than this and than live ones.
_COMPACT_MIN = 1024


class _Session:
    __slots__ = (
        "bytes",
        "empty_position",
        "epoch",
        "history",
        "id",
        "last_active",
        "pinned",
        "run_bytes",
        "seq",
        "unindexed",
    )

    def __init__(self, session_id: str, epoch: str, now: float) -> None:
        self.id = session_id
        self.epoch = epoch
        self.seq = 0
        self.history: deque[Event] = deque()
        self.bytes = 0
        self.last_active = now
        # "<epoch>-0", made on the first attach, shared by every subscription.
        self.empty_position: str | None = None
        # A run retains the session's history in full (#13): events published while it
        # is pinned stay out of the global index (so out of max_history_bytes and
        # event_ttl) and are the rightmost ``unindexed`` of ``history``.
        self.pinned = False
        self.unindexed = 0
        self.run_bytes = 0


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

    A session holds a ``max_sessions`` slot only while it has a subscriber in
    this process or retains an event: it is released at once when the last of
    both goes (#10.6), so sessions that hold nothing cannot lock new ones out
    until ``session_ttl``. A released session that had published events leaves
    its epoch and last number behind (for ``session_ttl``, at most
    ``max_sessions`` of them when it is set, oldest forgotten first, no slot held): if it is
    created again it continues that numbering, so a client holding its latest
    id resumes without a gap and one holding an older id is told ``gap``.
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
        self._run_bytes = 0  # bytes of events of pinned sessions (run transcripts)
        self._closed = False
        # Sessions released for holding nothing (no subscriber, no event), and events
        # expired outside a sweep (to make room under max_sessions), for the next sweep.
        self._released = 0
        self._expired_early = 0
        # session id -> (epoch, last n, when released), in release order.
        self._released_ids: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self._run_store: MemoryRunStore | None = None

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
        self._released_ids.clear()
        self._stale = self._events = self._bytes = self._run_bytes = 0

    # -- sessions ----------------------------------------------------------------------

    def _session(self, session_id: str, hub: BackendHub) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            limit = hub.config.max_sessions
            if limit is not None and len(self._sessions) >= limit:
                # Events past event_ttl no longer hold their sessions: expire them now
                # rather than at the next sweep (the cost is what is removed).
                self._expired_early += self._expire(hub)
            if limit is not None and len(self._sessions) >= limit:
                raise SessionLimitError(
                    f"cannot create session {session_id!r}: max_sessions={limit} reached"
                )
            released = self._released_ids.pop(session_id, None)
            if released is None:
                self._epochs += 1
                session = _Session(session_id, f"{self._token}{self._epochs:x}", hub.clock())
            else:
                # Continue the released session's numbering: its ids stay meaningful.
                epoch, seq, _ = released
                session = _Session(session_id, epoch, hub.clock())
                session.seq = seq
            self._sessions[session_id] = session
        return session

    def _release_if_idle(self, session: _Session) -> None:
        """Release the session's slot when it retains no event and has no subscriber here.

        Its epoch and last number are remembered (`_remember`), so that the ids
        handed out keep their meaning if it comes back.
        """
        if (
            not session.history
            and not session.pinned
            and self._sessions.get(session.id) is session
            and self._hub is not None
            and not self._hub.has_subscribers(session.id)
        ):
            del self._sessions[session.id]
            self._released += 1
            self._remember(session, self._hub)

    def _remember(self, session: _Session, hub: BackendHub) -> None:
        """Keep a released session's epoch and last number, when ids of it exist.

        An empty session whose position ("<epoch>-0") was handed to a subscriber
        counts too: a multi-session cursor carries it, and must resume with no
        gap if the session comes back.
        """
        if session.seq or session.empty_position is not None:
            released = self._released_ids
            released[session.id] = (session.epoch, session.seq, hub.clock())
            limit = hub.config.max_sessions
            if limit is not None and len(released) > limit:
                released.popitem(last=False)

    def _drop_session(self, session: _Session) -> None:
        del self._sessions[session.id]
        self._clear_history(session)

    def _clear_history(self, session: _Session) -> None:
        self._stale += len(session.history) - session.unindexed
        self._events -= len(session.history)
        self._bytes -= session.bytes
        self._run_bytes -= session.run_bytes
        # A new deque, not clear(): replays still pending read the old one (_HistoryCursor).
        session.history = deque()
        session.bytes = session.run_bytes = session.unindexed = 0
        self._maybe_compact()

    # -- history -----------------------------------------------------------------------

    def _evict_oldest(self, session: _Session) -> bool:
        """Drop the session's oldest event; True when it was in the global index."""
        event = session.history.popleft()
        size = len(event._wire)
        self._events -= 1
        if len(session.history) < session.unindexed:
            session.unindexed -= 1
            session.run_bytes -= size
            self._run_bytes -= size
            return False
        session.bytes -= size
        self._bytes -= size
        return True

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

    def _pop_index(self) -> bool:
        """Remove the globally oldest index entry, evicting its event if still retained.

        An emptied session with no subscriber is released. True when an event was evicted.
        """
        event = self._index.popleft()
        session = self._sessions.get(event.session_id)
        if session is not None and session.history and session.history[0] is event:
            self._evict_oldest(session)
            if not session.history:
                self._release_if_idle(session)
            return True
        self._stale -= 1
        return False

    def _expire(self, hub: BackendHub) -> int:
        """Evict the events past event_ttl; how many were retained.

        The index is in publish order, so they are at its left end: the cost is
        what is removed, not what is retained.
        """
        ttl = hub.config.event_ttl
        if ttl is None:
            return 0
        cutoff = hub.clock() - ttl
        index = self._index
        expired = 0
        while index and index[0].timestamp <= cutoff:
            expired += self._pop_index()
        return expired

    def _retained(self, session: _Session, now: float) -> tuple[int, deque[Event] | list[Event]]:
        """(n of the first retained event, events) ignoring those past event_ttl."""
        history = session.history
        first = session.seq - len(history) + 1
        ttl = self._require_hub().config.event_ttl
        if ttl is None or not history or session.pinned or history[0].timestamp > now - ttl:
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
                self._remember(session, hub)  # it may have come back from a release
            raise
        session.seq += 1
        session.last_active = now
        if session.pinned:
            self._append_pinned(session, new, size, config)
        elif config.max_history_per_session:
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
        if not session.history:
            # Nothing retained (max_history_per_session=0): the slot is held only
            # while someone here listens.
            self._release_if_idle(session)
        return new

    def _append_pinned(
        self, session: _Session, new: Event, size: int, config: BroadcasterConfig
    ) -> None:
        """Retain an event of a pinned session, within the run caps only."""
        history = session.history
        # The run fails at its caps before these trim anything; other events published
        # to the session meanwhile count too, and the oldest go past the caps.
        max_bytes = config.max_run_bytes + 2 * config.max_event_bytes
        while history and (
            len(history) >= config.max_run_events or session.run_bytes + size > max_bytes
        ):
            oldest = history[0]
            if self._evict_oldest(session):
                if self._index[0] is oldest:
                    self._index.popleft()
                else:
                    self._stale += 1
        history.append(new)
        session.unindexed += 1
        session.run_bytes += size
        self._run_bytes += size
        self._events += 1

    # -- runs (#13): the hooks of `MemoryRunStore` ------------------------------------------

    def run_store(self) -> MemoryRunStore:
        """The store of resumable runs for this backend (made once it is started)."""
        hub = self._require_hub()
        if self._run_store is None:
            self._run_store = MemoryRunStore(self, hub.config, hub.clock)
        return self._run_store

    def pin(self, session_id: str, *, reset: bool) -> str:
        """Retain the session's history in full from now on; with `reset`, drop it first.

        Returns the id after which the events to come are replayed (the
        session's latest id, or its number 0).

        Raises:
            SessionLimitError: the session is new and ``max_sessions`` is reached.
        """
        hub = self._require_hub()
        session = self._session(session_id, hub)
        if reset:
            self._clear_history(session)
        session.pinned = True
        session.last_active = hub.clock()
        return f"{session.epoch}-{session.seq}"

    def unpin(self, session_id: str) -> None:
        """Drop the session's history (a swept run's transcript) and unpin it."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        self._clear_history(session)
        session.pinned = False
        if self._hub is not None:
            session.last_active = self._hub.clock()
        self._release_if_idle(session)

    def pinned_bytes(self) -> int:
        """Encoded bytes of the events retained for runs."""
        return self._run_bytes

    async def attach(
        self, session_id: str, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay:
        hub = self._require_hub()
        known = session_id in self._sessions or session_id in self._released_ids
        session = self._session(session_id, hub)
        if not known and last_event_id is not None:
            replay = Replay((), True)  # the session is gone, and its history with it
        else:
            replay = self._after(session, last_event_id)
        session.last_active = hub.clock()
        register()
        return Replay(replay.events, replay.gap, self._position(session))

    @staticmethod
    def _position(session: _Session) -> str:
        """The session's newest id, or "<epoch>-0" before its first event.

        Given back as a last id, "<epoch>-0" replays the whole session with no
        gap while nothing was evicted (`_after`). Shared strings: an idle
        subscription holds no string of its own.
        """
        if session.history:
            return session.history[-1].id
        if session.seq:
            return f"{session.epoch}-{session.seq}"
        position = session.empty_position
        if position is None:
            position = session.empty_position = f"{session.epoch}-0"
        return position

    async def detach(self, session_id: str) -> None:
        session = self._sessions.get(session_id)
        if session is not None and self._hub is not None:
            session.last_active = self._hub.clock()
            self._release_if_idle(session)

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
            # Released: forget it too, so that its ids read as a gap from now on.
            return self._released_ids.pop(session_id, None) is not None
        self._drop_session(session)
        return True

    async def sweep(self) -> SweepResult:
        hub = self._require_hub()
        config = hub.config
        now = hub.clock()
        expired = self._expire(hub) + self._expired_early
        self._expired_early = 0
        idle_before = now - config.session_ttl
        gone = [
            s
            for s in self._sessions.values()
            if s.last_active <= idle_before and not s.pinned and not hub.has_subscribers(s.id)
        ]
        for session in gone:
            self._drop_session(session)
        released = self._released_ids
        while released and next(iter(released.values()))[2] <= idle_before:
            released.popitem(last=False)
        return SweepResult(expired, len(gone), tuple(s.id for s in gone))

    def counts(self) -> BackendCounts:
        estimate = (
            2 * (self._bytes + self._run_bytes)
            + self._events * _EVENT_OVERHEAD
            + len(self._sessions) * _SESSION_OVERHEAD
            + len(self._index) * 8
            + len(self._released_ids) * _RELEASED_OVERHEAD
        )
        return BackendCounts(len(self._sessions), self._events, estimate)

    def stats(self) -> dict[str, object]:
        return {
            "type": "memory",
            "sessions": len(self._sessions),
            "retainedEvents": self._events,
            "historyBytes": self._bytes,
            "runBytes": self._run_bytes,
            "sessionsReleased": self._released,
            "releasedSessionsRemembered": len(self._released_ids),
        }
