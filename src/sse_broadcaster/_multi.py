"""Several sessions on one stream: `MultiSubscription` and its resume cursor (#12 item 2).

Browsers open at most 6 HTTP/1.1 connections per origin, so a page that follows
many sessions needs them on one stream (as Mercure and Centrifugo multiplex
topics). One `Last-Event-ID` then has to resume every session: the cursor.

The cursor is ``m1.`` followed by one entry per session whose position is known,
joined by ``,``. An entry is the session's tag (the first 8 hex digits of the
BLAKE2b hash of its id) followed by its position (an event id, or the backend's
marker for an empty session), e.g. ``m1.3f2a9c01ab12cd1-42,77e0b5d2ab12cd2-0``.
The tag binds a position to its session: a cursor sent for another list of
sessions never resumes a session from another session's position.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections.abc import Iterable, Sequence
from operator import attrgetter
from types import TracebackType

import anyio
from typing_extensions import Self

from ._event import Event
from ._lowlevel import Parker, make_parker
from ._subscription import _ENDING, Subscription, _Owner, check_batch_bounds
from ._types import check_session_id

__all__ = [
    "open_many",
    "CURSOR_VERSION",
    "UNKNOWN_POSITION",
    "MultiSubscription",
    "encode_cursor",
    "max_cursor_length",
    "parse_cursor",
    "session_tag",
]

CURSOR_VERSION = "m1."
"""The prefix of every cursor of this format; another prefix is an unknown version."""
_TAG_CHARS = 8
_MAX_POSITION = 64
# Event ids of both backends ("<epoch>-<n>", "<ms>-<seq>") fit; a position with
# other characters, or longer, is left out of the cursor (read back as unknown).
_POSITION = re.compile(rf"[0-9A-Za-z._~-]{{1,{_MAX_POSITION}}}")
_ENTRY = re.compile(rf"([0-9a-f]{{{_TAG_CHARS}}})([0-9A-Za-z._~-]{{1,{_MAX_POSITION}}})")
UNKNOWN_POSITION = "?"
"""The last id given to a session whose position the cursor does not hold: no
backend knows it, so the session resumes with a gap and replays what is retained."""

_NEW, _OPEN, _DONE = 0, 1, 2
_timestamp = attrgetter("timestamp")


def session_tag(session_id: str) -> str:
    """The 8 hex digits that stand for the session in a cursor."""
    # surrogatepass: a session id may hold a lone surrogate (it is no control character).
    data = session_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=_TAG_CHARS // 2).hexdigest()


def max_cursor_length(sessions: int) -> int:
    """The longest cursor of this format for that many sessions (the parser's bound)."""
    return len(CURSOR_VERSION) + sessions * (_TAG_CHARS + _MAX_POSITION + 1) - 1


def encode_cursor(positions: Iterable[tuple[str, str | None]]) -> str:
    """The cursor of ``(session tag, position or None)`` pairs; unknown positions are left out."""
    return CURSOR_VERSION + ",".join(
        tag + position
        for tag, position in positions
        if position is not None and _POSITION.fullmatch(position)
    )


def parse_cursor(
    cursor: str, session_ids: Sequence[str], max_sessions: int
) -> dict[str, str | None]:
    """Each session's position in the cursor, None where it is unknown. Never raises.

    Everything is unknown for a cursor that is longer than `max_cursor_length`
    of `max_sessions`, of another version, or malformed anywhere; a session is
    unknown when the cursor has no entry for it, or more than one, or when
    another session of the list has the same tag. Entries of sessions not in
    the list are ignored.
    """
    resolved: dict[str, str | None] = dict.fromkeys(session_ids)
    if len(cursor) > max_cursor_length(max_sessions) or not cursor.startswith(CURSOR_VERSION):
        return resolved
    body = cursor[len(CURSOR_VERSION) :]
    if not body:
        return resolved
    by_tag: dict[str, str | None] = {}
    for session_id in session_ids:
        tag = session_tag(session_id)
        # None marks a tag two sessions of the list share: neither can be resumed.
        by_tag[tag] = None if tag in by_tag else session_id
    found: dict[str, str] = {}
    ambiguous: set[str] = set()
    for entry in body.split(","):
        match = _ENTRY.fullmatch(entry)
        if match is None:
            return dict.fromkeys(session_ids)
        owner = by_tag.get(match[1])
        if owner is None:
            continue
        if owner in found:
            ambiguous.add(owner)
        found[owner] = match[2]
    for session_id, position in found.items():
        if session_id not in ambiguous:
            resolved[session_id] = position
    return resolved


class MultiSubscription:
    """One consumer of several sessions' events, resumable with one cursor.

    Made by `EventBroadcaster.subscribe_many`; use it as an async context
    manager and iterate it::

        async with broadcaster.subscribe_many(["a", "b"], cursor=last_id) as multi:
            for session_id in multi.gaps:
                ...  # events of that session may have been lost
            async for event in multi:
                send(event, id=multi.cursor)

    Each session has its own `Subscription` inside, with the usual limits and
    overflow policy. Events of one session come in publish order; across
    sessions, queued events are merged by timestamp, which is best effort.
    All sessions wake one parked task: no task per session.

    `cursor` is the position after the last event handed out; given back as
    ``cursor=`` it resumes every session right after it. When one session's
    subscription ends (session closed, subscriber disconnected for falling
    behind, `GapError`), the others end too: what was queued is received, then
    the iteration stops (or raises that session's error), and ``ended_session``
    names it. A client reconnecting with its cursor resumes every session.
    """

    __slots__ = (
        "_cursor",
        "_ended",
        "_interrupted",
        "_parker",
        "_positions",
        "_released",
        "_state",
        "_subs",
        "_tags",
        "_waiting",
        "gaps",
        "session_ids",
    )

    def __init__(self, subscriptions: Sequence[Subscription]) -> None:
        self._subs = tuple(subscriptions)
        self.session_ids: tuple[str, ...] = tuple(sub.session_id for sub in self._subs)
        """The sessions followed, in the order given."""
        self.gaps: frozenset[str] = frozenset()
        """Sessions whose events after the cursor may have been lost (known on entry)."""
        self._tags = tuple(session_tag(session_id) for session_id in self.session_ids)
        self._positions: dict[str, str | None] = {}
        self._cursor: str | None = None
        self._parker: Parker | None = None
        self._waiting = False
        self._interrupted = False
        self._ended: Subscription | None = None
        self._released = False
        self._state = _NEW

    def __repr__(self) -> str:
        state = ("new", "open", "closed")[self._state]
        return (
            f"<MultiSubscription sessions={len(self._subs)} {state} "
            f"queued={self.queued} gaps={sorted(self.gaps)}>"
        )

    @property
    def queued(self) -> int:
        """Events waiting to be received, of every session."""
        return sum(sub.queued for sub in self._subs)

    @property
    def closed(self) -> bool:
        """True once it was closed, or has ended and been drained."""
        return self._state == _DONE

    @property
    def ended_session(self) -> str | None:
        """The session whose subscription ended first and ended the others (None: none did)."""
        return None if self._ended is None else self._ended.session_id

    @property
    def cursor(self) -> str:
        """The position of every session after the last event handed out (an SSE id).

        A session's position is its last event received, or before that its
        position on entry; a session whose position is not known (a backend
        that does not report it, or a replay with a gap not yet received) is
        left out and resumes with a gap and a full replay.
        """
        cursor = self._cursor
        if cursor is None:
            positions = self._positions
            cursor = self._cursor = encode_cursor(
                (tag, positions.get(session_id))
                for tag, session_id in zip(self._tags, self.session_ids, strict=True)
            )
        return cursor

    # -- consumer side -----------------------------------------------------------------

    def _check_ended(self) -> None:
        for sub in self._subs:
            if sub._state >= _ENDING:
                self._ended = sub
                # The others end too: no new event, and their queues are drained first.
                for other in self._subs:
                    if other is not sub:
                        other._end(None)
                return

    def drain_nowait(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        """Every queued event of all sessions (at most `max_events`), maybe none; never raises.

        `max_bytes` bounds what each session gives (its replay is taken out of
        history in chunks, as `Subscription.drain_nowait` does), so one call
        returns at most about ``max_bytes`` times the number of sessions.
        """
        if self._ended is None and self._state == _OPEN:
            self._check_ended()
        if max_events is None:
            parts = [
                taken for sub in self._subs if (taken := sub.drain_nowait(max_bytes=max_bytes))
            ]
            if not parts:
                return []
            # heapq.merge keeps each session's order whatever its timestamps are.
            events = parts[0] if len(parts) == 1 else list(heapq.merge(*parts, key=_timestamp))
        else:
            events = []
            subs = self._subs
            while len(events) < max_events:
                best: Subscription | None = None
                best_time = 0.0
                for sub in subs:
                    head = sub._peek()
                    if head is None:
                        continue
                    if best is None or head.timestamp < best_time:
                        best, best_time = sub, head.timestamp
                if best is None:
                    break
                event = best._pop()
                assert event is not None  # it was just peeked
                events.append(event)
            if not events:
                return events
        positions = self._positions
        for event in events:
            positions[event.session_id] = event.id
        self._cursor = None
        return events

    def _finish(self) -> None:
        """Raise what ends a multi-subscription with nothing queued."""
        if self._state == _DONE:
            raise anyio.ClosedResourceError
        if self._state == _NEW:
            raise RuntimeError("enter the multi-subscription first: 'async with multi:'")
        ended = self._ended
        if ended is not None:
            error = ended._error
            self._state = _DONE
            for sub in self._subs:
                sub.close()
            if error is not None:
                raise error
            raise anyio.EndOfStream

    def receive_nowait(self) -> Event:
        """The next event of any session, without waiting.

        Raises:
            anyio.WouldBlock: no event is queued.
            anyio.EndOfStream: a session's subscription ended normally (session
                closed, subscribers disconnected, broadcaster closed) and every
                queued event was received.
            SlowSubscriberError: a session's subscriber fell behind.
            GapError: the backend lost events of a session while it was live.
            anyio.ClosedResourceError: the multi-subscription was closed.
        """
        events = self.drain_nowait(1)
        if events:
            return events[0]
        self._finish()
        raise anyio.WouldBlock

    async def receive(self) -> Event:
        """The next event, waiting for one. Raises as `receive_nowait` does, bar WouldBlock."""
        while True:
            events = self.drain_nowait(1)
            if events:
                return events[0]
            self._finish()
            await self._wait()

    async def receive_batch(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        """Every queued event of every session (at most `max_events`), waiting for one.

        `max_bytes` bounds each session's share, as in `drain_nowait`.

        Raises:
            ValueError: `max_events` or `max_bytes` is less than 1 (it could never return).
        """
        check_batch_bounds(max_events, max_bytes)
        while True:
            events = self.drain_nowait(max_events, max_bytes)
            if events:
                return events
            self._finish()
            if self._interrupted:
                self._interrupted = False
                return events
            await self._wait()

    def _interrupt(self) -> None:
        """Make the waiting `receive_batch` (or the next one) return ``[]`` once.

        For the adapters' watchdog, as `Subscription._interrupt`.
        """
        self._interrupted = True
        if self._parker is not None:
            self._parker.unpark()

    async def _wait(self) -> None:
        if self._waiting:
            raise anyio.BusyResourceError("receiving from")
        parker = self._parker
        assert parker is not None  # made on entry
        inboxes = [sub._inbox for sub in self._subs if sub._inbox is not None]
        for inbox in inboxes:
            inbox.waker = parker
        self._waiting = True
        try:
            await parker.park()
        finally:
            self._waiting = False
            for inbox in inboxes:
                inbox.waker = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Enter every session's subscription, in order; on a failure, close those entered.

        Raises:
            SessionLimitError: a session is new and ``max_sessions`` is reached.
            SubscriberLimitError: a session has ``max_subscribers_per_session``.
            BroadcasterClosedError: the broadcaster is not running.
            BackendUnavailableError: the backend could not attach a session.
        """
        if self._state != _NEW or self._released:
            raise RuntimeError("a multi-subscription can be entered only once")
        entered: list[Subscription] = []
        try:
            for sub in self._subs:
                await sub.__aenter__()
                entered.append(sub)
        except BaseException:
            self._state = _DONE
            self._released = True
            with anyio.CancelScope(shield=True):
                for sub in entered:
                    await sub.aclose()
            raise
        # One parker for all: each session's producer (and _end, close) wakes it.
        parker = self._parker = make_parker()
        positions = self._positions
        for sub in self._subs:
            sub._parker = parker
            if not sub.replayed:
                positions[sub.session_id] = sub.position
            elif not sub.gap:
                # Replayed events follow the id it resumed from: until one is received,
                # resuming from there again replays them again.
                positions[sub.session_id] = sub.last_event_id
            # else unknown: resuming replays everything retained again, with a gap.
        self.gaps = frozenset(sub.session_id for sub in self._subs if sub.gap)
        self._state = _OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop receiving: leave every session and drop what is queued. Idempotent."""
        self._state = _DONE
        for sub in self._subs:
            sub.close()
        if self._parker is not None:
            self._parker.unpark()

    async def aclose(self) -> None:
        """Close, and tell the backend of each session that this was its last subscriber here."""
        self.close()
        if self._released:
            return
        self._released = True
        with anyio.CancelScope(shield=True):
            for sub in self._subs:
                await sub.aclose()


def open_many(
    hub: _Owner, session_ids: Sequence[str], cursor: str | None, limit: int
) -> MultiSubscription:
    """`EventBroadcaster.subscribe_many`: check the request, then build the subscription.

    The list may come from a client: its length is checked before it is copied.
    """
    if isinstance(session_ids, str):
        raise TypeError(f"session_ids must be a sequence of session ids, got {session_ids!r}")
    # Checked before copying: the list may come from a client.
    if len(session_ids) > limit:
        raise ValueError(
            f"session_ids names {len(session_ids)} sessions: max_sessions_per_subscription={limit}"
        )
    ids = tuple(session_ids)
    if not ids:
        raise ValueError("session_ids must name at least one session, got none")
    seen: set[str] = set()
    for session_id in ids:
        check_session_id(session_id)
        if session_id in seen:
            raise ValueError(f"session_ids names session {session_id!r} more than once")
        seen.add(session_id)
    if cursor == "":
        cursor = None
    elif cursor is not None and not isinstance(cursor, str):
        raise TypeError(f"cursor must be a str or None, got {cursor!r}")
    if cursor is None:
        return MultiSubscription([Subscription(hub, sid, None) for sid in ids])
    positions = parse_cursor(cursor, ids, limit)
    return MultiSubscription(
        [Subscription(hub, sid, positions[sid] or UNKNOWN_POSITION) for sid in ids]
    )
