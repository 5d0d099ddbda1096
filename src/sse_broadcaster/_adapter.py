"""What the Starlette and aiohttp adapters share: headers, ids, the stream pump, metrics.

Nothing here imports a web framework. An adapter turns its request into a
session id, a Last-Event-ID and an ``authorize`` answer, enters a
`Subscription`, then hands `run_stream` a coroutine that writes bytes to the
client. `run_stream` owns the timing: keep-alive comments, the send timeout,
batching, and ending on the server's shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ._errors import (
    BackendUnavailableError,
    BroadcasterClosedError,
    BroadcasterError,
    SessionLimitError,
    SlowSubscriberError,
    SubscriberLimitError,
)
from ._event import Event, encode_comment
from ._lowlevel import current_loop_token, start_ticker

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster
    from ._config import BroadcasterConfig
    from ._subscription import Subscription

__all__ = [
    "COME_BACK_LATER",
    "LastEventId",
    "MAX_LAST_EVENT_ID",
    "METRICS_CONTENT_TYPE",
    "SSE_HEADERS",
    "Authorize",
    "Outcome",
    "StreamRegistry",
    "StreamWriter",
    "come_back_later",
    "gap_event",
    "install_shutdown_hook",
    "is_authorized",
    "missing_extra",
    "parse_last_event_id",
    "prelude",
    "registry_for",
    "run_stream",
]

logger = logging.getLogger("sse_broadcaster")

#: Response headers of every stream. ``X-Accel-Buffering: no`` tells nginx not
#: to buffer the response (its proxy_buffering would hold events back).
SSE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
)

#: Longest Last-Event-ID taken as is; a longer one is answered as a gap. Ids the
#: broadcaster issues are far shorter; the cap keeps a hostile header from being
#: parsed, logged or echoed back at full length.
MAX_LAST_EVENT_ID = 256

#: The Prometheus text exposition format, version 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Errors on entering a subscription that mean "not now, come back later".
COME_BACK_LATER: tuple[type[BroadcasterError], ...] = (
    SessionLimitError,
    SubscriberLimitError,
    BroadcasterClosedError,
    # A shared backend (Redis) that cannot be reached: hold off the client with
    # retry: rather than an error status, which a browser would never retry.
    BackendUnavailableError,
)

_PING = encode_comment("ping")
# Writes closer together than this many flush windows count as a burst.
_BURST_WINDOWS = 5

#: ``authorize(request, session_id)``: True lets the stream open; may be async.
Authorize = Callable[[Any, str], "bool | Awaitable[bool]"]

#: How a stream ended, as `run_stream` reports it.
Outcome = Literal["ended", "disconnected", "timeout", "shutdown"]


def missing_extra(extra: str, exc: ImportError) -> ImportError:
    """The ImportError raised when an adapter's framework is not installed."""
    return ImportError(
        f"sse_broadcaster.{extra} needs {extra} ({exc}): pip install 'sse-broadcaster[{extra}]'"
    )


# -- request parsing -------------------------------------------------------------------


# Passed to subscribe() in place of an id that cannot be one: no backend issues
# it (ids carry an epoch and a sequence), so the subscription reports a gap and
# replays everything retained, as for any unknown id.
_REJECTED_ID = "invalid"


@dataclass(frozen=True, slots=True)
class LastEventId:
    """A client's resume position, as the adapters understood it."""

    value: str | None
    """The id to pass to `EventBroadcaster.subscribe` (None: live events only)."""
    requested: str | None
    """What the client sent (capped at `MAX_LAST_EVENT_ID` characters), for the gap event."""
    rejected: bool
    """True when what it sent cannot be an id (too long, control characters): a gap."""


def parse_last_event_id(header: str | None, query: str | None) -> LastEventId:
    """The resume position from the ``Last-Event-ID`` header, else the ``lastEventId`` query.

    The query parameter is for EventSource polyfills that cannot set headers.
    An empty value means none. A value that is too long or holds control
    characters is never passed on: the stream replays what is retained after
    a ``gap`` event, as for any unknown id.
    """
    raw = header if header else query
    if not raw:
        return LastEventId(None, None, False)
    if len(raw) > MAX_LAST_EVENT_ID or any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw):
        return LastEventId(_REJECTED_ID, raw[:MAX_LAST_EVENT_ID], True)
    return LastEventId(raw, raw, False)


async def is_authorized(authorize: Authorize | None, request: object, session_id: str) -> bool:
    """Call the ``authorize(request, session_id)`` hook, sync or async; no hook allows all."""
    if authorize is None:
        return True
    result = authorize(request, session_id)
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


# -- wire pieces -------------------------------------------------------------------------


def gap_event(session_id: str, last_event_id: LastEventId, replayed: int) -> bytes:
    """The ``gap`` event that opens a stream when events may have been lost.

    It carries no ``id:`` field, so the client's last event id is left as it was.
    """
    payload: dict[str, Any] = {"lastEventId": last_event_id.requested, "replayed": replayed}
    if last_event_id.rejected:
        payload["invalid"] = True
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return Event(id="", session_id=session_id, data=data, event="gap").encode()


def prelude(
    config: BroadcasterConfig,
    subscription: Subscription,
    last_event_id: LastEventId,
) -> bytes:
    """What a stream starts with: ``retry:``, the ``gap`` event, then the replay."""
    parts: list[bytes] = []
    if config.retry_ms is not None:
        parts.append(b"retry: %d\n\n" % config.retry_ms)
    if subscription.gap or last_event_id.rejected:
        parts.append(gap_event(subscription.session_id, last_event_id, subscription.replayed))
    parts.extend(event.encode() for event in subscription.drain_nowait())
    return b"".join(parts)


def come_back_later(config: BroadcasterConfig, reason: str) -> tuple[bytes, int]:
    """Body and ``Retry-After`` seconds of the answer to a stream that cannot open now.

    A browser's EventSource gives up for good on any status but 200, so a limit
    is answered with 200, a jittered ``retry:`` so that a crowd of clients does
    not come back at the same instant, and the end of the stream: the browser
    reconnects after that delay. Other clients read ``Retry-After``.
    """
    base = config.retry_ms if config.retry_ms else 3000
    retry_ms = int(base * random.uniform(1.0, 2.0))
    body = b"retry: %d\n\n" % retry_ms + encode_comment(reason.replace("\n", " "))
    return body, max(1, math.ceil(retry_ms / 1000))


# -- open streams: flush windows, the watchdog, shutdown ------------------------------------


class _Gate:
    """The flush window of one session's streams in this process: one timer for all.

    A stream woken for an event that no stream of the session has written yet,
    less than five windows after the session's last write, is in a burst: it
    waits for the session's flush (started by the first such stream, one
    window long) so that more events join its write. Streams writing the same
    event as the one before them (the fan-out of one event) never wait, and the
    first event after a quiet spell goes out at once.
    """

    __slots__ = ("flush", "last_event", "last_write", "streams")

    def __init__(self) -> None:
        self.flush: anyio.Event | None = None
        self.last_event: Event | None = None
        self.last_write = 0.0
        self.streams = 0

    async def wait(self, window: float) -> None:
        flush = self.flush
        if flush is not None:
            await flush.wait()
            return
        flush = self.flush = anyio.Event()
        try:
            await anyio.sleep(window)
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
        subscription: Subscription,
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


_REGISTRIES: weakref.WeakKeyDictionary[EventBroadcaster, StreamRegistry] = (
    weakref.WeakKeyDictionary()
)


def registry_for(broadcaster: EventBroadcaster) -> StreamRegistry:
    """The registry of the broadcaster's open streams (made on first use)."""
    registry = _REGISTRIES.get(broadcaster)
    if registry is None:
        registry = _REGISTRIES[broadcaster] = StreamRegistry()
    return registry


_SignalHandler = Callable[[int, "FrameType | None"], Any]


class _ShutdownHook:
    """A signal handler wrapped around the server's own: it also ends open streams.

    uvicorn (0.54, h11 and httptools) does not tell streaming responses that it
    is shutting down: on SIGTERM it stops accepting, marks connections
    keep-alive=False and then waits for every response to finish, so an open
    SSE stream keeps it waiting ("Waiting for connections to close") forever,
    and the lifespan shutdown that would close the broadcaster only runs after
    that. Chaining the handler uvicorn installed for SIGINT/SIGTERM lets the
    streams end as soon as the signal arrives, with the plain ``uvicorn
    module:app`` command.
    """

    def __init__(
        self, original: _SignalHandler, schedule: Callable[[Callable[[], None]], object]
    ) -> None:
        self.original = original
        self.schedule = schedule
        self.registries: weakref.WeakSet[StreamRegistry] = weakref.WeakSet()

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        # A signal handler runs between two bytecodes of the main thread, maybe
        # inside the event loop itself: only schedule the work on the loop.
        with contextlib.suppress(RuntimeError):  # a closed loop has no stream left
            self.schedule(self._close)
        return self.original(signum, frame)

    def _close(self) -> None:
        for registry in list(self.registries):
            registry.close_all()


def _scheduler() -> Callable[[Callable[[], None]], object] | None:
    """How to run a callback on the running event loop from a signal handler."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return loop.call_soon_threadsafe
    trio: Any = sys.modules.get("trio")
    if trio is not None:
        try:
            return trio.lowlevel.current_trio_token().run_sync_soon  # type: ignore[no-any-return]
        except RuntimeError:
            pass
    return None  # pragma: no cover - neither asyncio nor trio


def install_shutdown_hook(registry: StreamRegistry) -> bool:
    """Chain the server's SIGINT/SIGTERM handlers so that they end the registry's streams.

    Only handlers a server installed (callables other than Python's default
    SIGINT handler) are wrapped: a process whose SIGTERM kills it is left as
    it is. Signals can be handled only in the main thread; elsewhere (a server
    run in a thread) nothing is done. Idempotent.

    Returns:
        True when at least one handler now ends the streams.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    hooked = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(signum)
        if isinstance(current, _ShutdownHook):
            current.registries.add(registry)
            hooked = True
            continue
        if (
            not callable(current)
            or current is signal.default_int_handler
            # trio's own KeyboardInterrupt handler: trio restores it only if it
            # is still in place when the run ends, so leave it alone.
            or getattr(current, "__module__", "").startswith("trio")
        ):
            continue
        schedule = _scheduler()
        if schedule is None:  # pragma: no cover
            return False
        hook = _ShutdownHook(current, schedule)
        hook.registries.add(registry)
        signal.signal(signum, hook)
        hooked = True
    return hooked


# -- the stream pump ----------------------------------------------------------------------


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
    subscription: Subscription,
    send: Callable[[bytes], Awaitable[None]],
    *,
    config: BroadcasterConfig,
    registry: StreamRegistry,
    first: bytes = b"",
    disconnected: Callable[[], bool] | None = None,
    listen: Callable[[], Awaitable[None]] | None = None,
    flush_window: float = 0.0,
) -> Outcome:
    """Write the subscription's events to a client until one side ends.

    Each wake-up drains everything queued and sends it in one write. The
    registry's watchdog (one timer for all its streams, see `StreamRegistry`)
    has ``: ping`` sent after every ``keepalive_interval`` of silence and ends
    the stream when a write cannot finish within ``send_timeout``. No lock, no
    cancel scope and no task per write: the hot path only stamps two times.

    `disconnected` is polled by the watchdog; `listen` returns when the
    client has gone (an ASGI ``http.disconnect``): it runs in a task of its own.
    `flush_window` (seconds, 0 to disable): during a burst (an event newer
    than the session's last write, less than five windows after it), wait for
    the session's flush, one window long and shared by all its streams in
    this process, so that more events join the write. An event that comes
    after a quiet spell is written at once.

    Returns:
        Why it ended: the subscription "ended" (session or broadcaster closed,
        slow subscriber), the client "disconnected", a write hit the send
        "timeout", or the server began its "shutdown".
    """
    writer = StreamWriter(send)
    outcome: Outcome = "ended"
    keepalive = config.keepalive_interval
    send_timeout = config.send_timeout
    scope = anyio.CancelScope()

    def stop(reason: Outcome) -> None:
        nonlocal outcome
        if outcome == "ended":
            outcome = reason
        scope.cancel()

    async def pump() -> None:
        session_id = subscription.session_id
        # A write less than `burst_gap` after the session's last one, of an
        # event no stream has written yet, means a burst.
        burst_gap = _BURST_WINDOWS * flush_window
        gate = registry._gate(session_id) if flush_window > 0 else None
        try:
            if first:
                await writer.write(first)
                if gate is not None:
                    gate.last_write = writer.last_write
            while True:
                try:
                    batch = await subscription.receive_batch()
                except (anyio.EndOfStream, anyio.ClosedResourceError):
                    return
                except SlowSubscriberError:
                    logger.debug("stream of session %r ended: slow subscriber", session_id)
                    return
                except BroadcasterError as exc:  # GapError and the like end the stream
                    logger.info("stream of session %r ended: %s", session_id, exc)
                    return
                if not batch:  # woken by the watchdog
                    if time.monotonic() - writer.last_write >= keepalive:
                        await writer.write(_PING)
                    continue
                if gate is None:
                    await writer.write(_join(batch))
                    continue
                if (
                    gate.last_event is not batch[-1]
                    and time.monotonic() - gate.last_write < burst_gap
                ):
                    await gate.wait(flush_window)
                    batch += subscription.drain_nowait()
                await writer.write(_join(batch))
                gate.last_write = writer.last_write
                gate.last_event = batch[-1]
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


def _join(batch: list[Event]) -> bytes:
    if len(batch) == 1:
        return batch[0].encode()
    return b"".join([event.encode() for event in batch])
