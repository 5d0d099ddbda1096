"""The open streams of a broadcaster: the registry, its watchdog and the stream pump.

A response enters a `Subscription` (or wraps a generator, see `_sources`) and
hands `run_stream` that source and a coroutine that writes bytes to its
client. `run_stream` owns the timing: keep-alive comments, the send timeout,
batching (the flush, held only while a burst lasts), and ending on the
server's shutdown. One
`StreamRegistry` per broadcaster (and one for the streams of no broadcaster)
holds its open streams and one watchdog timer for all of them. Nothing here
imports a web framework.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import anyio.lowlevel

from ._errors import BroadcasterError, SlowSubscriberError
from ._event import Event, encode_comment
from ._lowlevel import current_loop_token, start_ticker
from ._sources import IterableSource, MultiSource
from ._subscription import Subscription

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster

__all__ = [
    "FLUSH_WINDOW",
    "PING",
    "Outcome",
    "StreamRegistry",
    "StreamSource",
    "StreamWriter",
    "check_flush_window",
    "default_registry",
    "registry_for",
    "registry_of_owner",
    "run_stream",
]

logger = logging.getLogger("sse_broadcaster")

#: The default ``flush_window`` of `sse_endpoint` and `sse_handler`, in seconds:
#: the longest a burst's write is held back, not a delay every event pays.
#:
#: A stream woken for an event newer than the session's last write, whose
#: publish began less than five windows after it, may be in a burst: the
#: session's flush (one for all the session's streams in this process) holds
#: its write while each loop iteration brings a new event, and sends it after
#: two iterations that brought none, or after this many seconds of a burst
#: that does not stop (or, when the session's previous fan-out took longer
#: than that to write, as long as it took, at most 50 ms: a thousand streams
#: take ~10-30 ms to write one event each, and a hold as long as that lets
#: each write carry many). There is no timer: an event that nothing follows
#: is held for two loop iterations (microseconds), the first event after a
#: quiet spell and the fan-out of one event to a session's streams are written
#: at once. While a write is in flight, what arrives joins the next one.
#: ``flush_window=0`` never holds a write: every wake-up writes what it found.
FLUSH_WINDOW = 0.001

#: How a stream ended, as `run_stream` reports it.
Outcome = Literal["ended", "disconnected", "timeout", "shutdown"]

#: The keep-alive comment sent after ``keepalive_interval`` of silence.
PING = encode_comment("ping")
# One write joins at most this many bytes (or one larger event): a 30 MB replay
# is 64 KiB writes, each waiting for the client, not one 30 MB bytes object
# buffered whole by the server's transport (issue #10).
WRITE_CHUNK = 65_536
# Writes closer together than this many flush windows count as a burst.
_BURST_WINDOWS = 5
# A held flush goes out after this many loop iterations in a row that brought
# its stream no new event. Two, not one: trio may run the publisher and the
# holder in either order within an iteration, so that one iteration can see
# nothing new in the middle of a burst; two in a row cannot.
_QUIET_ITERATIONS = 2
# A hold also ends once this many events are queued: a write of them costs
# little more than a write of one, and the queue stays far from its bound.
_HOLD_EVENTS = 256
# A hold as long as the previous fan-out's write lasts at most this many
# seconds (a stream stuck in a slow write must not stretch every hold).
_MAX_HOLD = 0.05


class StreamSource(Protocol):
    """What `run_stream` reads events from.

    A `Subscription` is one; `_sources.IterableSource` wraps a request's own
    async iterable; a subscription to several sessions fits as well.
    """

    @property
    def session_id(self) -> str:
        """The key of the flush window's per-session gate, and the name in logs."""
        ...

    @property
    def queued(self) -> int:
        """Events ready to be taken now."""
        ...

    async def receive_batch(self, *, max_bytes: int | None = None) -> list[Event]:
        """Every queued event, waiting for one; ``[]`` once after `_interrupt`.

        `max_bytes` bounds what one call returns (one event at least, however
        large) where the source can hold more than that at once.

        Raises anyio.EndOfStream (or a `BroadcasterError`) when no more will come.
        """
        ...

    def drain_nowait(self, *, max_bytes: int | None = None) -> list[Event]:
        """Every queued event (within `max_bytes`), possibly none; never raises."""
        ...

    def _interrupt(self) -> None:
        """Make the waiting `receive_batch` (or the next one) return ``[]`` once."""
        ...

    async def aclose(self) -> None:
        """Stop: no more events; what it holds is released."""
        ...


def check_flush_window(flush_window: float) -> float:
    """`flush_window` if it is a usable window; a ValueError naming it otherwise."""
    if not flush_window >= 0 or math.isinf(flush_window):  # also NaN
        raise ValueError(f"flush_window must be a finite number >= 0, got {flush_window!r}")
    return flush_window


class _Gate:
    """The flush of one session's streams in this process: one holder for all.

    The session's streams write in fan-outs: one stream decides, for an event
    that no fan-out has carried yet, whether to write at once or to hold the
    flush, and the session's other streams follow. A stream woken for such an
    event, whose publish began less than five windows after the session's last
    write, may be in a burst: the first such stream holds the flush: it yields
    to the event loop, once per loop iteration, until two iterations in a row
    brought its source no new event, and at most `window` seconds, or as long
    as the session's previous fan-out took to write if that was longer; the
    others wait for it. No timer: an event that nothing follows is held for
    two loop iterations, not a window. Streams whose newest event is the one
    the current fan-out began with never wait, and the first event after a
    quiet spell goes out at once.

    Only the stream that begins a fan-out (the holder, or the first writer of
    an event outside a burst) sets `last_event`: the streams released after a
    hold may carry events published while the others wrote, and a stream woken
    for one of those later must hold, not take it for the fan-out of an event
    already written. Otherwise, with a thousand streams, the publisher's turn
    in the middle of each fan-out would let every event out on its own.
    """

    __slots__ = ("cycle_cost", "cycle_start", "flush", "last_event", "last_write", "streams")

    def __init__(self) -> None:
        self.flush: anyio.Event | None = None
        self.last_event: Event | None = None
        self.last_write = 0.0
        self.cycle_start = 0.0
        self.cycle_cost = 0.0
        self.streams = 0

    def begin(self, event: Event) -> None:
        """A fan-out of the session's streams up to `event` begins now."""
        now = time.monotonic()
        # What the fan-out before this one took to write, from its start to
        # the last write of it seen since: the cap of the next hold.
        self.cycle_cost = min(_MAX_HOLD, max(0.0, self.last_write - self.cycle_start))
        self.cycle_start = now
        self.last_event = event

    async def wait(self, window: float, source: StreamSource, limit: int) -> bool:
        """Hold the flush, or wait for the one who holds it; True for the holder."""
        flush = self.flush
        if flush is not None:
            await flush.wait()
            return False
        flush = self.flush = anyio.Event()
        try:
            queued = source.queued
            quiet = 0
            await anyio.lowlevel.checkpoint()
            # The window starts after the first iteration: with many streams
            # that iteration is the session's own fan-out waking, which would
            # otherwise use up the window before one more event could join.
            # A fan-out that takes longer to write than a window (a thousand
            # streams) gets a hold as long as its write: at most half of a
            # burst's time is spent holding, and each write carries more.
            deadline = time.monotonic() + max(window, self.cycle_cost)
            while True:
                now = source.queued
                quiet = quiet + 1 if now <= queued else 0
                queued = now
                if quiet >= _QUIET_ITERATIONS or queued >= limit or time.monotonic() >= deadline:
                    return True
                await anyio.lowlevel.checkpoint()
        finally:
            # Also when this stream is cancelled: the others must not wait forever.
            self.flush = None
            flush.set()


class _Stream:
    """What the shared watchdog knows of one open stream."""

    __slots__ = ("disconnected", "keepalive", "stalled", "stop", "subscription", "writer")

    def __init__(
        self,
        writer: StreamWriter,
        subscription: StreamSource,
        stop: Callable[[Outcome], None],
        disconnected: Callable[[], bool] | None,
        keepalive: float,
        stalled: float,
    ) -> None:
        self.writer = writer
        self.subscription = subscription
        self.stop = stop
        self.disconnected = disconnected
        self.keepalive = keepalive
        self.stalled = stalled

    def check(self, now: float) -> None:
        writer = self.writer
        if writer.busy:
            if now - writer.started >= self.stalled:
                self.stop("timeout")
        elif self.disconnected is not None and self.disconnected():
            self.stop("disconnected")
        elif now - writer.last_write >= self.keepalive:
            # The stream's own task writes the comment: wake it with nothing.
            self.subscription._interrupt()


class StreamRegistry:
    """The open streams of one broadcaster: ends them on shutdown and watches them.

    One watchdog per registry, not one task per stream: a timer that looks at
    every stream four times per ``min(keepalive_interval, send_timeout)``. It
    ends a stream whose write has waited three quarters of ``send_timeout``
    (so a stalled client is gone at most ``send_timeout`` after the write
    began), ends a stream whose client has gone (when the adapter can tell),
    and wakes a stream that has been silent for ``keepalive_interval`` to send
    ``: ping``.
    """

    __slots__ = (
        "__weakref__",
        "_gates",
        "_generation",
        "_loop",
        "_streams",
        "_tick",
        "closing",
    )

    def __init__(self) -> None:
        self._streams: set[_Stream] = set()
        self._gates: dict[str, _Gate] = {}
        self._loop: object = None
        self._tick = math.inf
        self._generation: object = None
        self.closing = False
        """True once `close_all` ran: new streams are told to come back later."""

    def __len__(self) -> int:
        return len(self._streams)

    def close_all(self) -> None:
        """End every open stream now; call it from the event loop's thread."""
        self.closing = True
        for stream in list(self._streams):
            stream.stop("shutdown")

    def _watch(self, stream: _Stream, tick: float) -> None:
        self._streams.add(stream)
        loop = current_loop_token()
        if self._loop is not loop or tick < self._tick:
            # Not ticking on this loop, or too slowly for this stream: a new
            # timer; the one before stops at its next tick.
            self._loop = loop
            self._tick = tick
            generation = object()
            self._generation = generation
            start_ticker(tick, lambda: self._scan(generation))

    def _scan(self, generation: object) -> bool:
        if generation is not self._generation:
            return False
        if not self._streams:
            self._loop = None
            self._tick = math.inf
            return False
        now = time.monotonic()
        for stream in list(self._streams):
            stream.check(now)
        return True

    def _gate(self, session_id: str) -> _Gate:
        gate = self._gates.get(session_id)
        if gate is None:
            gate = self._gates[session_id] = _Gate()
        gate.streams += 1
        return gate

    def _release_gate(self, session_id: str, gate: _Gate) -> None:
        gate.streams -= 1
        if gate.streams == 0 and self._gates.get(session_id) is gate:
            del self._gates[session_id]


# Keyed by the broadcaster's hub, which is all a `Subscription` knows of it.
_REGISTRIES: weakref.WeakKeyDictionary[object, StreamRegistry] = weakref.WeakKeyDictionary()

_DEFAULT_REGISTRY = StreamRegistry()


def registry_for(broadcaster: EventBroadcaster) -> StreamRegistry:
    """The registry of the broadcaster's open streams (made on first use)."""
    return registry_of_owner(broadcaster._hub)


def registry_of_owner(owner: object) -> StreamRegistry:
    """The registry of the streams of a subscription's owner (its broadcaster's hub)."""
    registry = _REGISTRIES.get(owner)
    if registry is None:
        registry = _REGISTRIES[owner] = StreamRegistry()
    return registry


def default_registry() -> StreamRegistry:
    """The registry of streams that follow no broadcaster (a request's own generator)."""
    return _DEFAULT_REGISTRY


class StreamWriter:
    """Times the writes of one stream for the watchdog.

    Only the stream's own task writes (events and keep-alive comments alike),
    so the hot path takes no lock and enters no cancel scope: a write sets a
    flag and a start time that the watchdog reads.
    """

    __slots__ = ("_send", "busy", "last_write", "started")

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self.busy = False
        self.started = 0.0
        self.last_write = time.monotonic()

    async def write(self, data: bytes) -> None:
        self.busy = True
        self.started = time.monotonic()
        try:
            await self._send(data)
        finally:
            self.busy = False
            self.last_write = time.monotonic()


async def run_stream(
    subscription: StreamSource,
    send: Callable[[bytes], Awaitable[None]],
    *,
    keepalive: float,
    send_timeout: float,
    registry: StreamRegistry,
    ping: bytes = PING,
    first: bytes = b"",
    disconnected: Callable[[], bool] | None = None,
    listen: Callable[[], Awaitable[None]] | None = None,
    flush_window: float = FLUSH_WINDOW,
) -> Outcome:
    """Write the source's events to a client until one side ends.

    Each wake-up drains everything queued and sends it in one write, of at
    most `WRITE_CHUNK` bytes (or one larger event; a replay, or a backlog
    larger than that, is several writes). The
    registry's watchdog (one timer for all its streams, see `StreamRegistry`)
    has `ping` sent after every `keepalive` seconds of silence and ends the
    stream when a write cannot finish within `send_timeout` seconds. No lock, no
    cancel scope and no task per write: the hot path only stamps two times.

    `disconnected` is polled by the watchdog; `listen` returns when the
    client has gone (an ASGI ``http.disconnect``): it runs in a task of its own.
    `flush_window`: see `FLUSH_WINDOW` (0: write every batch at once).

    Returns:
        Why it ended: the subscription "ended" (session or broadcaster closed,
        slow subscriber), the client "disconnected", a write hit the send
        "timeout", or the server began its "shutdown".
    """
    writer = StreamWriter(send)
    if isinstance(subscription, IterableSource):
        subscription.write_through(writer)
    outcome: Outcome = "ended"
    scope = anyio.CancelScope()

    def stop(reason: Outcome) -> None:
        nonlocal outcome
        if outcome == "ended":
            outcome = reason
        scope.cancel()

    async def pump() -> None:
        session_id = subscription.session_id
        # An event no stream has written yet, whose publish began less than
        # `burst_gap` after the session's last write, means a burst. Measured to
        # the publish's start (`tally.started`), not to this stream's wake-up: a
        # publish that itself takes five windows (many subscribers, a slow
        # machine) still follows the last write at once. Other sources: to now.
        burst_gap = _BURST_WINDOWS * flush_window
        gate = registry._gate(session_id) if flush_window > 0 else None
        hold_limit = _hold_limit(subscription)
        inbox = subscription._inbox if isinstance(subscription, Subscription) else None
        tally = inbox.tally if inbox is not None else None
        try:
            if first:
                await writer.write(first)
                if gate is not None:
                    gate.last_write = writer.last_write
            while True:
                try:
                    batch = await subscription.receive_batch(max_bytes=WRITE_CHUNK)
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                except SlowSubscriberError:
                    logger.debug("stream of session %r ended: slow subscriber", session_id)
                    return
                except BroadcasterError as exc:  # GapError and the like end the stream
                    logger.info("stream of session %r ended: %s", session_id, exc)
                    return
                if not batch:  # woken by the watchdog
                    # Not while a write is in flight: a source's own task may be
                    # writing (`IterableSource.write_through`).
                    if not writer.busy and time.monotonic() - writer.last_write >= keepalive:
                        await writer.write(ping)
                    continue
                if gate is None:
                    await writer.write(_join(batch))
                    continue
                if gate.last_event is not batch[-1]:  # not the current fan-out's
                    if (
                        (time.monotonic() if tally is None else tally.started) - gate.last_write
                        < burst_gap
                        and not subscription.queued  # a full chunk waits for nothing
                    ):
                        holder = await gate.wait(flush_window, subscription, hold_limit)
                        room = WRITE_CHUNK - sum([len(event._wire) for event in batch])
                        if room > 0:
                            batch += subscription.drain_nowait(max_bytes=room)
                        if holder:
                            gate.begin(batch[-1])
                    else:
                        gate.begin(batch[-1])
                await writer.write(_join(batch))
                gate.last_write = writer.last_write
        except OSError:  # the peer reset the connection (aiohttp raises on write)
            stop("disconnected")
        finally:
            if gate is not None:
                registry._release_gate(session_id, gate)

    async def listener() -> None:
        assert listen is not None
        await listen()
        stop("disconnected")

    stream = _Stream(
        writer, subscription, stop, disconnected, keepalive, send_timeout - send_timeout / 4
    )
    with scope:
        # A check every `tick` sees a stalled write at most `tick` late.
        registry._watch(stream, min(keepalive, send_timeout) / 4)
        try:
            if registry.closing:
                stop("shutdown")
            if listen is None:
                await pump()
            else:
                async with anyio.create_task_group() as task_group:
                    task_group.start_soon(listener)
                    try:
                        await pump()
                    finally:
                        task_group.cancel_scope.cancel()
        finally:
            registry._streams.discard(stream)
    return outcome


def _hold_limit(source: StreamSource) -> int:
    """Queued events that end a held flush: `_HOLD_EVENTS`, and at most half the
    queue bound of every subscription behind `source`, so that holding a write
    never makes its stream a slow subscriber."""
    if isinstance(source, Subscription):
        bounds = [source._max_items]
    elif isinstance(source, MultiSource):
        bounds = [sub._max_items for sub in source.multi._subs]
    else:
        return _HOLD_EVENTS
    return max(1, min(_HOLD_EVENTS, *[bound // 2 for bound in bounds]))


def _join(batch: list[Event]) -> bytes:
    if len(batch) == 1:
        return batch[0].encode()
    return b"".join([event.encode() for event in batch])
