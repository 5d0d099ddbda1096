"""This process's subscribers of each session: the fan-out behind `EventBroadcaster`.

`Hub` is what a backend sees of the broadcaster (`BackendHub`: config, clock,
deliver, end_session, has_subscribers) and what a `Subscription` sees of it
(`_subscription._Owner`: attach, detach, release_session and two counters).
Keeping it out of `EventBroadcaster` keeps those calls off the public API.
"""

from __future__ import annotations

import logging
import weakref
from time import monotonic

import anyio

from ._config import BroadcasterConfig
from ._errors import BroadcasterClosedError, SubscriberLimitError
from ._event import Event
from ._subscription import Subscription, _SubscriberRef, _Tally
from ._types import Clock
from .backends._base import Backend

__all__ = ["Hub"]

logger = logging.getLogger("sse_broadcaster")

_DETACHED = _Tally()  # never counts: no fan-out delivers through it


class _Fanout(_Tally):
    """This process's subscribers of one session, held weakly, and the bytes sent to them."""

    __slots__ = ("refs", "snapshot")

    def __init__(self) -> None:
        super().__init__()
        self.refs: set[_SubscriberRef] = set()
        self.snapshot: tuple[_SubscriberRef, ...] | None = None


class Hub:
    """Per session, the subscriptions open in this process, and the counters of fan-out.

    Subscriptions are held through `_SubscriberRef` weak references, which also
    carry the producer's side of each queue, so that `deliver` appends without
    dereferencing the subscription.
    """

    __slots__ = (
        "__weakref__",  # keys the registry of its open streams (_streams.registry_of_owner)
        "_abandoned",
        "_backend",
        "_entering",
        "clock",
        "closed",
        "config",
        "dead_queues",
        "delivered",
        "dropped",
        "fanouts",
        "gaps",
        "replayed_events",
        "replays",
        "running",
        "slow_disconnects",
        "subscribers",
    )

    def __init__(self, config: BroadcasterConfig, clock: Clock, backend: Backend) -> None:
        self.config = config
        self.clock = clock
        self._backend = backend
        self.fanouts: dict[str, _Fanout] = {}
        # Subscriptions between the limit check and registration, per session: they
        # hold a slot, so that concurrent entries cannot all pass the check (#10.3).
        self._entering: dict[str, int] = {}
        self._abandoned: list[_SubscriberRef] = []
        self.running = False
        self.closed = False
        self.subscribers = 0
        self.delivered = 0
        self.dropped = 0
        self.slow_disconnects = 0
        self.replays = 0
        self.replayed_events = 0
        self.gaps = 0
        self.dead_queues = 0

    def check_running(self) -> None:
        if not self.running:
            if self.closed:
                raise BroadcasterClosedError("the EventBroadcaster is closed")
            raise BroadcasterClosedError(
                "the EventBroadcaster is not running: enter it first "
                "('async with broadcaster:' or the adapters' lifespan helper)"
            )

    # -- BackendHub ------------------------------------------------------------------------

    def deliver(self, session_id: str, event: Event) -> None:
        """Queue a live event for this process's subscribers of the session."""
        fanout = self.fanouts.get(session_id)
        if fanout is None:
            return
        fanout.started = monotonic()
        snapshot = fanout.snapshot
        if snapshot is None:
            snapshot = fanout.snapshot = tuple(fanout.refs)
        size = len(event._wire)
        max_items = self.config.max_queue_size
        sent = fanout.sent = fanout.sent + size
        # A queue has room for the event when its bytes (sent - ref.mark) stay within
        # the bound: one load per subscriber, no store (see _SubscriberRef.mark).
        floor = sent - self.config.max_queue_bytes
        for ref in snapshot:
            # Subscription._push, inlined for the common case: room in an open queue
            # (``items`` is None unless the subscription is open and has had an
            # event). The subscription itself is only looked up on the slow path.
            items = ref.items
            if items is not None and len(items) < max_items and ref.mark >= floor:
                items.append(event)
                waker = ref.waker
                if waker is not None:
                    ref.waker = None
                    waker.unpark()
            else:
                sub = ref()
                if sub is not None:
                    sub._push(event, size)
        self.delivered += len(snapshot)

    def end_session(self, session_id: str, error: BaseException | None = None) -> None:
        """End this process's subscriptions of the session after their queued events.

        Their iteration stops (or raises `error` when given).
        """
        self.end_subscriptions(session_id, error)

    def has_subscribers(self, session_id: str) -> bool:
        """Whether this process has subscribers of the session."""
        return session_id in self.fanouts

    # -- for the broadcaster -----------------------------------------------------------------

    def end_subscriptions(self, session_id: str, error: BaseException | None = None) -> int:
        """`end_session`, answering how many subscriptions it ended."""
        fanout = self.fanouts.pop(session_id, None)
        if fanout is None:
            return 0
        ended = 0
        for ref in list(fanout.refs):
            subscription = ref()
            if subscription is not None:
                subscription._end(error)
                ended += 1
            else:
                # Collected before a sweep removed it: the sweep will skip it now.
                self.subscribers -= 1
                self.dead_queues += 1
        return ended

    def subscriber_count(self, session_id: str) -> int:
        fanout = self.fanouts.get(session_id)
        return 0 if fanout is None else len(fanout.refs)

    def end_all(self) -> None:
        for session_id in list(self.fanouts):
            self.end_session(session_id)

    # -- the subscriptions' owner ------------------------------------------------------------

    async def attach(self, subscription: Subscription) -> None:
        """Register the subscription with the backend and start it with its replay.

        The subscriber limit is checked and a slot taken before the first await,
        and the slot is given back if entry fails: with a backend whose attach
        awaits (Redis), concurrent entries would otherwise all pass the check.
        """
        self.check_running()
        session_id = subscription.session_id
        entering = self._entering
        limit = self.config.max_subscribers_per_session
        if limit is not None:
            fanout = self.fanouts.get(session_id)
            present = 0 if fanout is None else len(fanout.refs)
            pending = entering.get(session_id, 0)
            if present + pending >= limit:
                more = f" and {pending} entering" if pending else ""
                raise SubscriberLimitError(
                    f"session {session_id!r} has {present} subscribers{more}: "
                    f"max_subscribers_per_session={limit} reached"
                )
        entering[session_id] = entering.get(session_id, 0) + 1
        reserved = True

        def register() -> None:
            nonlocal reserved
            # The reserved slot becomes the subscription's place in the fan-out.
            reserved = False
            self._leave_entering(session_id)
            fanout = self.fanouts.get(session_id)
            if fanout is None:
                fanout = self.fanouts[session_id] = _Fanout()
            ref = _SubscriberRef(subscription, self._on_abandoned)
            ref.session_id = session_id
            ref.items = None
            ref.tally = fanout
            ref.mark = fanout.sent
            ref.waker = None
            ref.attached = True
            subscription._ref = subscription._inbox = ref
            fanout.refs.add(ref)
            fanout.snapshot = None
            self.subscribers += 1

        try:
            replay = await self._backend.attach(session_id, subscription.last_event_id, register)
        except BaseException:
            if reserved:
                self._leave_entering(session_id)
            elif subscription._ref is not None:
                # Registered, then failed or cancelled: the subscription never opens,
                # so nothing else would take it out of the fan-out.
                self.detach(subscription)
                with anyio.CancelScope(shield=True):
                    await self.release_session(session_id)
            raise
        if reserved:  # pragma: no cover - a backend that returns without registering
            self._leave_entering(session_id)
            raise RuntimeError(f"{type(self._backend).__name__}.attach did not call register")
        subscription._start(replay.events, replay.gap, replay.position)
        if subscription.last_event_id is not None:
            self.replays += 1
            self.replayed_events += len(replay.events)
        if replay.gap:
            self.gaps += 1

    def _leave_entering(self, session_id: str) -> None:
        left = self._entering[session_id] - 1
        if left:
            self._entering[session_id] = left
        else:
            del self._entering[session_id]

    def entering(self) -> int:
        """Subscriptions between the limit check and registration (for tests)."""
        return sum(self._entering.values())

    def detach(self, subscription: Subscription) -> None:
        ref, subscription._ref = subscription._ref, None
        if ref is None:
            return
        # The producer's fast path stops here; the consumer has taken what it needs.
        ref.attached = False
        ref.items = None
        # Off the session's tally: the bytes of a detached queue stay 0.
        ref.tally = _DETACHED
        ref.mark = 0
        self.subscribers -= 1
        fanout = self.fanouts.get(ref.session_id)
        if fanout is not None:
            fanout.refs.discard(ref)
            fanout.snapshot = None
            if not fanout.refs:
                del self.fanouts[ref.session_id]

    async def release_session(self, session_id: str) -> None:
        if session_id not in self.fanouts and not self.closed:
            await self._backend.detach(session_id)

    def count_drops(self, n: int) -> None:
        self.dropped += n

    def slow_subscriber(self, subscription: Subscription) -> None:
        self.slow_disconnects += 1
        logger.info(
            "disconnecting a slow subscriber of session %r (queue full)", subscription.session_id
        )

    # -- abandoned subscriptions -------------------------------------------------------------

    def _on_abandoned(self, ref: weakref.ref[Subscription]) -> None:
        # Runs inside the garbage collector, perhaps in the middle of a publish:
        # only note it; the next sweep removes the entry. A subscription that was
        # detached properly still holds its ref, so this also runs when it is freed.
        assert isinstance(ref, _SubscriberRef)
        if ref.attached:
            ref.items = None  # free the abandoned queue now, not at the next sweep
            self._abandoned.append(ref)

    def collect_abandoned(self) -> set[str]:
        """Remove subscriptions collected without being closed; their session ids."""
        abandoned, self._abandoned = self._abandoned, []
        sessions: set[str] = set()
        for ref in abandoned:
            fanout = self.fanouts.get(ref.session_id)
            if fanout is None or ref not in fanout.refs:
                continue
            fanout.refs.discard(ref)
            fanout.snapshot = None
            if not fanout.refs:
                del self.fanouts[ref.session_id]
            self.subscribers -= 1
            self.dead_queues += 1
            sessions.add(ref.session_id)
        return sessions
