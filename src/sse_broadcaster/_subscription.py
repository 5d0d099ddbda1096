from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import anyio
from typing_extensions import Self

from ._errors import GapError, SlowSubscriberError
from ._event import Event
from ._lowlevel import Parker, make_parker
from ._types import OverflowPolicy

if TYPE_CHECKING:
    from ._config import BroadcasterConfig

__all__ = ["Subscription"]

# Life cycle of a subscription.
_NEW, _OPEN, _ENDING, _CLOSED = 0, 1, 2, 3

#: At most this many encoded bytes of a replay are taken out of history at once
#: (or one event, when it is larger): a replay is read as it is sent, never held whole.
REPLAY_CHUNK = 65_536


@runtime_checkable
class ReplayCursor(Protocol):
    """A replay that a backend reads out of its history as the subscriber takes it.

    A backend's `Replay.events` may be one (the in-memory backend's is): the
    subscription then holds a position in history, not the events, and takes
    them chunk by chunk. Any other sequence is held as references and released
    as it is taken.
    """

    def __len__(self) -> int:
        """Events not taken yet."""

    def take(self, max_bytes: int) -> list[Event]:
        """The next events, at most `max_bytes` encoded bytes but at least one; [] at the end.

        Raises:
            GapError: events of the replay left history before they were taken.
        """


class _SequenceCursor:
    """A replay the backend handed over whole: references, dropped as they are taken."""

    __slots__ = ("_events",)

    def __init__(self, events: Sequence[Event]) -> None:
        self._events = deque(events)

    def __len__(self) -> int:
        return len(self._events)

    def take(self, max_bytes: int) -> list[Event]:
        events = self._events
        taken: list[Event] = []
        size = 0
        while events:
            size += len(events[0]._wire)
            if taken and size > max_bytes:
                break
            taken.append(events.popleft())
        return taken


def check_batch_bounds(max_events: int | None, max_bytes: int | None) -> None:
    """The bounds of a `receive_batch` call: None, or >= 1 (else it could never return)."""
    if max_events is not None and max_events < 1:
        raise ValueError(f"max_events must be None or >= 1, got {max_events!r}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be None or >= 1, got {max_bytes!r}")


class _Owner(Protocol):
    """What a subscription needs of the fan-out that feeds it (`_hub.Hub`).

    A Protocol, so that this module does not import the broadcaster's.
    """

    @property
    def config(self) -> BroadcasterConfig: ...

    async def attach(self, subscription: Subscription) -> None:
        """Join the session: replay on `Subscription._start`, then live events."""

    def detach(self, subscription: Subscription) -> None:
        """Leave the session's fan-out. Never awaits."""

    async def release_session(self, session_id: str) -> None:
        """Tell the backend when the session has no subscriber left here."""

    def count_drops(self, n: int) -> None:
        """Count events a drop policy discarded."""

    def slow_subscriber(self, subscription: Subscription) -> None:
        """Count (and log) a subscriber disconnected for falling behind."""


class _Tally:
    """Encoded bytes delivered to one session's subscribers here, ever (`_hub._Fanout`),
    and when the latest delivery began (``time.monotonic()``; the streams' flush
    reads it to tell a burst from paced events)."""

    __slots__ = ("sent", "started")

    def __init__(self) -> None:
        self.sent = 0
        self.started = 0.0


class _SubscriberRef(weakref.ref["Subscription"]):
    """The broadcaster's handle on a subscription: a weak reference to it that also
    carries the producer's side of its queue.

    `Hub.deliver` appends to ``items`` without dereferencing the
    subscription (the hot path of fan-out); the subscription itself is held only
    weakly, so one that is abandoned is collected, queue included.
    """

    __slots__ = ("attached", "items", "mark", "session_id", "tally", "waker")
    session_id: str
    items: deque[Event] | None
    """Live events not yet taken by the consumer (None: not open, or no event yet)."""
    tally: _Tally
    """The session's count of bytes delivered (``tally.sent``)."""
    mark: int
    """``tally.sent`` minus the encoded bytes in ``items``.

    Every delivered event is appended or counted into the mark (dropped), so
    the fan-out loop checks the byte bound with one load and no store per
    subscriber (`Hub.deliver`); taking the queue sets it to ``tally.sent``.
    """
    waker: Parker | None
    """The consumer's parker while it waits for an event."""
    attached: bool

    @property
    def bytes(self) -> int:
        """Encoded bytes in ``items``."""
        return self.tally.sent - self.mark


class Subscription:
    """A subscriber's bounded queue of one session's events.

    Made by `EventBroadcaster.subscribe`; use it as an async context manager
    and iterate it::

        async with broadcaster.subscribe("room-1", last_event_id=last_id) as sub:
            if sub.gap:
                ...  # events after last_id may have been lost
            async for event in sub:
                ...

    The queue holds at most ``max_queue_size`` live events and
    ``max_queue_bytes`` encoded bytes. A replay is not queued: it is taken out
    of history in chunks of at most ``min(REPLAY_CHUNK, max_queue_bytes)``
    bytes (or one event) as the consumer receives it, so a subscriber holds
    at most that much of it; if history evicts events of the replay before
    they are taken, the subscription ends with `GapError` at that point (no
    later event is delivered past the hole). Events the consumer has already
    taken out of the queue to iterate them do not count against the bounds. When the queue
    is full the broadcaster's overflow policy applies. The broadcaster holds the
    subscription only through a weak reference: one that is dropped without
    being closed is collected, and the next sweep counts it.
    """

    __slots__ = (
        "__weakref__",
        "_batch",
        "_chunk",
        "_error",
        "_held",
        "_inbox",
        "_interrupted",
        "_max_bytes",
        "_max_items",
        "_owner",
        "_parker",
        "_policy",
        "_ref",
        "_replay",
        "_state",
        "_waiting",
        "dropped",
        "gap",
        "last_event_id",
        "position",
        "replayed",
        "session_id",
    )

    def __init__(self, owner: _Owner, session_id: str, last_event_id: str | None) -> None:
        config = owner.config
        self._owner = owner
        self.session_id = session_id
        """The session this subscription follows."""
        self.last_event_id = last_event_id
        """The id the subscriber resumed from (None for a new subscriber)."""
        self.gap = False
        """True when events after ``last_event_id`` may have been lost (known on entry)."""
        self.dropped = 0
        """Events discarded by the ``drop_oldest`` / ``drop_newest`` policies."""
        self.replayed = 0
        """Events replayed from history on entry."""
        self.position: str | None = None
        """The session's position on entry, as its backend reports it (`Replay.position`).

        Live events follow it; replayed events come before or at it. Given back
        as a last id, it resumes right after what was retained on entry.
        """
        self._max_items = config.max_queue_size
        self._max_bytes = config.max_queue_bytes
        self._policy = config.overflow_policy
        self._batch: deque[Event] | None = None
        self._replay: ReplayCursor | None = None
        self._chunk = min(REPLAY_CHUNK, self._max_bytes)
        # Live events queued when the subscription ended with its replay unfinished:
        # they come after it.
        self._held: deque[Event] | None = None
        self._parker: Parker | None = None
        self._waiting = False
        self._interrupted = False
        # The producer's side of the queue, from entry on; `_ref` is the same object
        # while the subscription is attached to its session, None after.
        self._inbox: _SubscriberRef | None = None
        self._state = _NEW
        self._error: BaseException | None = None
        self._ref: _SubscriberRef | None = None

    def __repr__(self) -> str:
        state = ("new", "open", "ending", "closed")[self._state]
        return (
            f"<Subscription session_id={self.session_id!r} {state} "
            f"queued={self.queued} dropped={self.dropped} gap={self.gap}>"
        )

    @property
    def queued(self) -> int:
        """Events waiting to be received (replayed and live)."""
        inbox = self._inbox
        live = len(inbox.items) if inbox is not None and inbox.items else 0
        if self._replay is not None:
            live += len(self._replay) + (len(self._held) if self._held else 0)
        return live + (len(self._batch) if self._batch else 0)

    @property
    def closed(self) -> bool:
        """True once the subscription was closed or has ended and been drained."""
        return self._state == _CLOSED

    # -- producer side: called by the broadcaster, never awaits ---------------------
    #
    # Two deques: the broadcaster appends to ``_inbox.items``; the consumer takes
    # the whole of it at once (swapping it with its empty ``_batch``) and then pops
    # from ``_batch`` without touching the producer's accounting. The queue bounds
    # apply to ``_inbox.items``: what the consumer has taken is in its hands, like
    # a read buffer, so a subscriber holds at most two queues' worth.

    def _start(self, replay: Sequence[Event], gap: bool, position: str | None = None) -> None:
        if replay:
            self._replay = replay if isinstance(replay, ReplayCursor) else _SequenceCursor(replay)
            self.replayed = len(replay)
        self.gap = gap
        self.position = position
        if self._state == _NEW:
            self._state = _OPEN

    def _push(self, event: Event, size: int) -> None:
        """Queue a live event; the broadcaster inlines the common case of this."""
        inbox = self._inbox
        if self._state > _OPEN or inbox is None:
            return
        items = inbox.items
        if items is None:
            items = inbox.items = deque()
        # The tally counts this event already: until it is appended, it is in the mark.
        inbox.mark += size
        if len(items) >= self._max_items or inbox.bytes + size > self._max_bytes:
            policy = self._policy
            if policy is OverflowPolicy.DROP_NEWEST:
                self.dropped += 1
                self._owner.count_drops(1)
                return
            if policy is OverflowPolicy.DISCONNECT:
                self._owner.slow_subscriber(self)
                self._end(
                    SlowSubscriberError(
                        f"subscriber of session {self.session_id!r} fell behind: its queue "
                        f"reached {len(items)} events / {inbox.bytes} bytes "
                        f"(max_queue_size={self._max_items}, max_queue_bytes={self._max_bytes})"
                    )
                )
                return
            drops = 0
            while items and (len(items) >= self._max_items or inbox.bytes + size > self._max_bytes):
                inbox.mark += len(items.popleft()._wire)
                drops += 1
            self.dropped += drops
            self._owner.count_drops(drops)
        items.append(event)
        inbox.mark -= size
        waker = inbox.waker
        if waker is not None:
            inbox.waker = None
            waker.unpark()

    def _end(self, error: BaseException | None) -> None:
        """No more events will come; the consumer drains the queue, then sees `error`."""
        if self._state in (_NEW, _OPEN):
            self._state = _ENDING
            self._error = error
            inbox = self._inbox
            if inbox is not None and inbox.items:
                # The consumer drains what was queued; the producer's side closes.
                if self._replay is not None:
                    self._held = inbox.items
                elif self._batch:
                    self._batch.extend(inbox.items)
                else:
                    self._batch = inbox.items
            self._owner.detach(self)
            self._wake()

    def _interrupt(self) -> None:
        """Make the waiting `receive_batch` (or the next one) return ``[]`` once.

        For the adapters' shared watchdog: it wakes a stream's task to send a
        keep-alive comment. Not public: every other caller of `receive_batch`
        relies on it returning at least one event.
        """
        self._interrupted = True
        self._wake()

    def _wake(self) -> None:
        if self._inbox is not None:
            self._inbox.waker = None
        if self._parker is not None:
            self._parker.unpark()

    # -- consumer side -----------------------------------------------------------------

    def _refill(self) -> deque[Event] | None:
        """The replay's next chunk as the batch; None once the replay is over."""
        replay = self._replay
        assert replay is not None
        try:
            chunk = replay.take(self._chunk)
        except GapError as exc:
            # Events after the hole would move the client's Last-Event-ID past it:
            # deliver none, end here, and the client's reconnection is told of the gap.
            self._replay = self._held = self._batch = None
            inbox = self._inbox
            if inbox is not None and inbox.items:
                inbox.items.clear()
                inbox.mark = inbox.tally.sent
            if self._state == _ENDING:
                self._error = exc
            self._end(exc)
            return None
        if not chunk:
            self._replay = None
            held, self._held = self._held, None
            if held:
                self._batch = held
            return self._batch
        batch = self._batch
        if batch is None:
            batch = self._batch = deque(chunk)
        else:
            batch.extend(chunk)
        return batch

    def _peek(self) -> Event | None:
        """The event `_pop` would return next, left in place (the replay's next
        chunk is taken out of history for it). `MultiSubscription` merges with it."""
        batch = self._batch
        if not batch and self._replay is not None:
            batch = self._refill()
        if batch:
            return batch[0]
        inbox = self._inbox
        if inbox is not None and inbox.items:
            return inbox.items[0]
        return None

    def _pop(self) -> Event | None:
        batch = self._batch
        if batch:
            return batch.popleft()
        if self._replay is not None:
            batch = self._refill()
            if batch:
                return batch.popleft()
        inbox = self._inbox
        if inbox is not None:
            items = inbox.items
            if items:
                # Take everything queued in O(1): the empty batch becomes the producer's.
                inbox.items = batch if batch is not None else deque()
                inbox.mark = inbox.tally.sent
                self._batch = items
                return items.popleft()
        return None

    def _finish(self) -> None:
        """Raise what ends an empty subscription."""
        if self._state == _CLOSED:
            raise anyio.ClosedResourceError
        if self._state == _NEW:
            raise RuntimeError("enter the subscription first: 'async with subscription:'")
        if self._state == _ENDING:
            error = self._error
            self._state = _CLOSED
            self._release()
            if error is not None:
                raise error
            raise anyio.EndOfStream

    def receive_nowait(self) -> Event:
        """The next event, without waiting.

        Raises:
            anyio.WouldBlock: no event is queued.
            anyio.EndOfStream: the subscription ended normally (session closed,
                broadcaster closed) and every queued event was received.
            SlowSubscriberError: the subscriber was disconnected for falling behind.
            GapError: the backend lost events while the subscription was live.
            anyio.ClosedResourceError: the subscription was closed.
        """
        event = self._pop()
        if event is not None:
            return event
        self._finish()
        raise anyio.WouldBlock

    async def receive(self) -> Event:
        """The next event, waiting for one. Raises as `receive_nowait` does, bar WouldBlock.

        Queued events are returned without yielding to the event loop, so a
        subscriber drains a burst in one go.
        """
        while True:
            event = self._pop()
            if event is not None:
                return event
            self._finish()
            await self._wait()

    async def receive_batch(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        """Every queued event (at most `max_events`), waiting until there is one.

        Adapters use this to write what accumulated in one go; `max_bytes`
        bounds the encoded bytes returned (one event is returned even when it
        is larger), so that one write never joins megabytes.

        Raises:
            ValueError: `max_events` or `max_bytes` is less than 1 (it could never return).
        """
        check_batch_bounds(max_events, max_bytes)
        while True:
            batch = self.drain_nowait(max_events, max_bytes)
            if batch:
                return batch
            self._finish()
            if self._interrupted:
                self._interrupted = False
                return batch
            await self._wait()

    def drain_nowait(
        self, max_events: int | None = None, max_bytes: int | None = None
    ) -> list[Event]:
        """Every queued event (at most `max_events`, and `max_bytes` encoded bytes
        but at least one event), possibly none; never raises.
        """
        inbox = self._inbox
        if (
            max_events is None
            and self._replay is None
            and (
                max_bytes is None
                or (not self._batch and (inbox is None or inbox.bytes <= max_bytes))
            )
        ):
            # Live events only, under the byte cap: all of them, in one go.
            taken: list[Event] = []
            if self._batch:
                taken.extend(self._batch)
                self._batch.clear()
            if inbox is not None and inbox.items:
                taken.extend(inbox.items)
                inbox.items.clear()
                inbox.mark = inbox.tally.sent
            return taken
        taken = []
        size = 0
        while max_events is None or len(taken) < max_events:
            batch = self._batch
            if not batch:
                event = self._pop()  # refills the batch from the replay or the inbox
                if event is None:
                    break
                size += len(event._wire)
                if taken and max_bytes is not None and size > max_bytes:
                    # Put it back: it starts the next call.
                    batch = self._batch
                    if batch is None:
                        batch = self._batch = deque()
                    batch.appendleft(event)
                    break
                taken.append(event)
                continue
            size += len(batch[0]._wire)
            if taken and max_bytes is not None and size > max_bytes:
                break
            taken.append(batch.popleft())
        return taken

    async def _wait(self) -> None:
        if self._waiting:
            raise anyio.BusyResourceError("receiving from")
        inbox = self._inbox
        assert inbox is not None  # an open subscription has one
        parker = self._parker
        if parker is None:
            parker = self._parker = make_parker()
        inbox.waker = parker
        self._waiting = True
        try:
            await parker.park()
        finally:
            self._waiting = False
            inbox.waker = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        batch = self._batch
        if batch:  # the hot path: one frame, no await
            return batch.popleft()
        inbox = self._inbox
        # Live and open: `receive` (take the inbox, or park until the producer
        # appends) inlined, so that a wake-up costs no frame of ours but this one.
        while self._state == _OPEN and self._replay is None and inbox is not None:
            items = inbox.items
            if items:
                # Take everything queued in O(1): the empty batch becomes the producer's.
                inbox.items = batch if batch is not None else deque()
                inbox.mark = inbox.tally.sent
                self._batch = items
                return items.popleft()
            if self._waiting:
                raise anyio.BusyResourceError("receiving from")
            parker = self._parker
            if parker is None:
                parker = self._parker = make_parker()
            inbox.waker = parker
            self._waiting = True
            try:
                await parker.park()
            finally:
                self._waiting = False
                inbox.waker = None
            batch = self._batch
            if batch:  # _end moved the inbox here
                return batch.popleft()
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    # -- life cycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != _NEW:
            raise RuntimeError("a subscription can be entered only once")
        await self._owner.attach(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def close(self) -> None:
        """Stop receiving: leave the session and drop what is queued. Idempotent."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._owner.detach(self)
        self._release()
        self._wake()

    async def aclose(self) -> None:
        """Close the subscription and tell the backend when it was the session's last."""
        was_attached = self._state != _NEW
        self.close()
        if was_attached:
            with anyio.CancelScope(shield=True):
                await self._owner.release_session(self.session_id)

    def _release(self) -> None:
        inbox = self._inbox
        if inbox is not None:
            inbox.items = None
            inbox.mark = inbox.tally.sent
        self._batch = self._held = self._replay = None
