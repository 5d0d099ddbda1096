"""A request's own async iterable as a stream source, pulled a bounded way ahead.

`IterableSource.feed` runs in a task of the stream's task group and queues
the items it pulls for the pump. It runs ahead of the pump by at most
`_AHEAD_ITEMS` items or `_AHEAD_BYTES` bytes (an item larger than that is one
item ahead), so a slow client holds the generator back: the generator runs no
further than that beyond the write in progress and the socket's buffers.
While the pump writes, the items the generator makes meanwhile queue up and
go out in the next write, so a fast generator's items are written in few,
large writes. Both sides park on their event loop's own primitive (`_lowlevel`),
not on a fresh `anyio.Event` per item. The pump waits on the queue, not on the
generator, so the watchdog's keep-alive comments go out while the generator
is slow. An item the generator had to wait for (a paced source: a timer, a
queue, the network) while the pump sits idle is written by `feed` itself,
at once: one task switch per item less, as when the response's own task
iterates the generator. Nothing here imports a web framework.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import anyio

from ._event import (
    Event,
    _set_data,
    _set_event,
    _set_id,
    _set_retry,
    _set_session_id,
    _set_timestamp,
    _set_wire,
    encode_comment,
)
from ._event import _new as _new_event
from ._lowlevel import Parker, make_parker
from ._multi import _POSITION, CURSOR_VERSION, MultiSubscription


class Writer(Protocol):
    """What `IterableSource.write_through` needs of a stream's writer
    (`_streams.StreamWriter`; a Protocol so that this module does not import that one)."""

    @property
    def busy(self) -> bool:
        """True while a write is in flight."""
        ...

    async def write(self, data: bytes) -> None:
        """Write `data` to the client."""
        ...


__all__ = ["EventItem", "IterableSource", "MultiSource", "Writer", "multi_frame_data", "to_event"]

logger = logging.getLogger("sse_broadcaster")

#: What an event stream's async iterable may yield.
EventItem = Event | Mapping[str, Any] | str

_KEYS = frozenset({"comment", "data", "event", "id", "retry"})
# How long the generator's own cleanup (its finally blocks) may take once the stream ended.
_CLOSE_TIMEOUT = 5.0
# How far the generator may run ahead of the pump: items, and encoded bytes (one write's worth).
_AHEAD_ITEMS = 64
_AHEAD_BYTES = 65_536
# An item the generator took at least this long to make was waited for (a
# timer, a queue, the network), not part of a burst: written through at once.
_WAITED = 0.0001


def _wire_only(wire: bytes) -> Event:
    """An `Event` that writes `wire` as is (a comment, or a comment and an event)."""
    event = Event(id="", session_id="", data="")
    object.__setattr__(event, "_wire", wire)
    return event


def to_event(item: object) -> Event:
    """The `Event` an item of a user's iterable stands for.

    A str is the data of an unnamed event; a dict takes the keys ``data``,
    ``event``, ``id``, ``retry`` and ``comment``.

    Raises:
        TypeError: the item is of another type, or a field is.
        ValueError: a field cannot be written (CR, LF or NUL in ``id``,
            ``event`` or ``comment``; a negative ``retry``), or a dict has an
            unknown key or no key at all.
    """
    if isinstance(item, Event):
        return item
    if isinstance(item, str):
        return Event(id="", session_id="", data=item)
    if not isinstance(item, Mapping):
        raise TypeError(
            f"an event stream takes Event, dict or str items, got {type(item).__name__}: "
            f"{item!r:.80}"
        )
    unknown = set(item) - _KEYS
    if unknown:
        raise ValueError(
            f"an event dict takes the keys comment, data, event, id and retry, got "
            f"{', '.join(sorted(map(repr, unknown)))}"
        )
    comment = item.get("comment")
    fields = {key: item[key] for key in ("data", "event", "id", "retry") if key in item}
    fields = {key: value for key, value in fields.items() if value is not None}
    if comment is None and not fields:
        raise ValueError(f"an event dict needs data, event, id, retry or comment, got {item!r:.80}")
    for key in ("data", "id", "comment"):
        value = comment if key == "comment" else fields.get(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"an event's {key} must be a str, got {type(value).__name__}")
    wire = encode_comment(comment) if comment is not None else b""
    if fields:
        event = Event(
            id=fields.get("id", ""),
            session_id="",
            data=fields.get("data", ""),
            event=fields.get("event"),
            retry=fields.get("retry"),
        )
        if "data" not in fields and "event" not in fields:
            # Only id / retry: no data line, so that clients dispatch no empty message.
            head = f"id: {event.id}\n" if event.id else ""
            if event.retry is not None:
                head += f"retry: {event.retry}\n"
            return _wire_only(wire + head.encode() + b"\n")
        if comment is None:
            return event
        wire += event.encode()
    return _wire_only(wire)


class IterableSource:
    """A stream source fed by a user's async iterable (see the module docstring)."""

    __slots__ = (
        "_bytes",
        "_closed",
        "_consumer",
        "_done",
        "_error",
        "_idle",
        "_interrupted",
        "_items",
        "_iterator",
        "_producer",
        "_writer",
    )

    #: No session: the flush window's gate is not used (the response passes 0).
    session_id = ""

    def __init__(self, iterable: AsyncIterable[EventItem]) -> None:
        if not isinstance(iterable, AsyncIterable):
            raise TypeError(
                "an event stream takes a Subscription or an async iterable of events, got "
                f"{type(iterable).__name__}"
            )
        self._iterator: AsyncIterator[EventItem] = aiter(iterable)
        self._items: list[Event] = []
        self._bytes = 0
        self._done = False
        self._closed = False
        self._interrupted = False
        self._consumer: Parker | None = None  # the pump, waiting for items
        self._producer: Parker | None = None  # `feed`, waiting for room
        self._idle = False  # the pump is parked in receive_batch, not writing
        self._writer: Writer | None = None  # see `write_through`
        self._error: Exception | None = None  # a write of `feed` failed: the pump raises it

    def write_through(self, writer: Writer) -> None:
        """Let `feed` write an item it waited for while the pump is idle.

        `run_stream` calls this with the stream's writer. Both tasks write
        through it, never at once: `feed` writes only while the pump is parked
        (it has written everything before), and the pump writes a keep-alive
        only while no write is in flight (``writer.busy``).
        """
        self._writer = writer

    async def feed(self) -> None:
        """Pull the items until the iterable ends or fails; run it in a task.

        It waits whenever `_AHEAD_ITEMS` items or `_AHEAD_BYTES` bytes are
        queued and not yet taken by the pump. An exception is logged (with its
        traceback, once) and ends the stream after the last complete event:
        nothing half-written.
        """
        producer = self._producer = make_parker()
        iterator = self._iterator
        clock = time.perf_counter
        try:
            while True:
                started = clock()
                try:
                    item = await anext(iterator)
                except StopAsyncIteration:
                    break
                event = to_event(item)
                writer = self._writer
                if (
                    self._idle
                    and not self._items  # woken for them, not run yet: they go first
                    and writer is not None
                    and not writer.busy
                    and clock() - started >= _WAITED
                ):
                    # Waited for, the pump parked with nothing queued: write it now
                    # from this task, not one task switch later from the pump.
                    try:
                        await writer.write(event.encode())
                    except Exception as exc:  # the peer reset (aiohttp raises on write)...
                        # ...: the pump raises it, as if its own write had failed.
                        self._error = exc
                        return
                    continue
                self._items.append(event)
                self._bytes += len(event.encode())
                self._wake()
                # No await between the check and the park: the pump's unpark is not lost.
                while len(self._items) >= _AHEAD_ITEMS or self._bytes >= _AHEAD_BYTES:
                    await producer.park()
        except Exception:
            logger.exception("event stream source failed; the stream ends here")
        finally:
            self._done = True
            self._wake()

    @property
    def queued(self) -> int:
        return len(self._items)

    async def receive_batch(self, *, max_bytes: int | None = None) -> list[Event]:
        # What is queued is bounded by the run-ahead: it is the bound, whatever max_bytes.
        while True:
            if self._items:
                return self.drain_nowait()
            if self._error is not None:
                raise self._error
            if self._done:
                raise anyio.EndOfStream
            if self._interrupted:
                self._interrupted = False
                return []
            consumer = self._consumer
            if consumer is None:
                consumer = self._consumer = make_parker()
            self._idle = True
            try:
                await consumer.park()
            finally:
                self._idle = False

    def drain_nowait(self, *, max_bytes: int | None = None) -> list[Event]:
        batch = self._items
        if not batch:
            return batch
        self._items = []
        self._bytes = 0
        if self._producer is not None:
            self._producer.unpark()
        return batch

    def _interrupt(self) -> None:
        self._interrupted = True
        self._wake()

    def _wake(self) -> None:
        if self._consumer is not None:
            self._consumer.unpark()

    async def aclose(self) -> None:
        """Close the iterable (an async generator's ``finally`` runs). Idempotent.

        Call it once `feed` has returned: a generator cannot be closed while
        another task runs it.
        """
        if self._closed:
            return
        self._closed = True
        self._done = True
        close = getattr(self._iterator, "aclose", None)
        if close is None:
            return
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            try:
                await close()
            except Exception:
                logger.exception("event stream source failed while closing")


# -- several sessions on one stream ------------------------------------------------------


def _json(value: str) -> str:
    # A session id may hold a lone surrogate, which UTF-8 cannot carry: escape it then.
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


# A JSON string literal, as json.dumps(text, ensure_ascii=False) writes it, minus the call.
_quote: Callable[[str], str] = json.encoder.encode_basestring


def make_event_with_wire(
    id: str,
    session_id: str,
    data: str,
    event: str | None,
    retry: int | None,
    timestamp: float,
    wire: bytes,
) -> Event:
    """An `Event` of those fields that writes `wire` (nothing checked or encoded)."""
    new: Event = _new_event(Event)
    _set_id(new, id)
    _set_session_id(new, session_id)
    _set_data(new, data)
    _set_event(new, event)
    _set_retry(new, retry)
    _set_timestamp(new, timestamp)
    _set_wire(new, wire)
    return new


def multi_frame_data(session_id: str, data: str) -> str:
    """The ``data:`` of an event of a multi-session stream: ``{"session":...,"data":...}``."""
    return f'{{"session":{_json(session_id)},"data":{_json(data)}}}'


def _framed(event: Event, wire: bytes) -> Event:
    """A copy of `event` that writes `wire` (its fields kept, for logs and the flush gate)."""
    return make_event_with_wire(
        event.id, event.session_id, event.data, event.event, event.retry, event.timestamp, wire
    )


class MultiSource:
    """A `MultiSubscription` as a stream source: each event framed for one EventSource.

    Each event is written as::

        id: <the cursor after this event>
        event: <its name, if it has one>
        data: {"session":"<its session>","data":"<its data>"}

    Every event carries the cursor as of after it, so whatever complete event
    a browser dispatched last before a connection drops, the ``Last-Event-ID``
    it sends back resumes every session right after it.
    """

    __slots__ = ("_entries", "_index", "_prefixes", "multi", "session_id")

    def __init__(self, multi: MultiSubscription) -> None:
        self.multi = multi
        # No session id holds a control character: the flush gate of this stream
        # is its own, shared with no session's streams.
        self.session_id = f"\x00multi-{id(multi):x}"
        self._index = {session_id: i for i, session_id in enumerate(multi.session_ids)}
        self._entries: list[str] = []
        self._prefixes = {
            session_id: f'{{"session":{_json(session_id)},"data":'
            for session_id in multi.session_ids
        }

    def start(self) -> None:
        """Take the positions on entry (call once the multi-subscription is entered)."""
        positions = self.multi._positions
        self._entries = [
            self._entry(tag, positions.get(session_id))
            for tag, session_id in zip(self.multi._tags, self.multi.session_ids, strict=True)
        ]

    @staticmethod
    def _entry(tag: str, position: str | None) -> str:
        # As encode_cursor: a position it cannot carry is left out (unknown).
        return tag + position if position is not None and _POSITION.fullmatch(position) else ""

    def cursor(self) -> str:
        """The cursor after the last event framed (equal to the multi-subscription's)."""
        return CURSOR_VERSION + ",".join([entry for entry in self._entries if entry])

    def frame(self, events: list[Event]) -> list[Event]:
        """`events` framed: each with its session in ``data`` and the cursor after it."""
        framed = []
        entries, index, tags = self._entries, self._index, self.multi._tags
        prefixes = self._prefixes
        for event in events:
            i = index[event.session_id]
            entries[i] = self._entry(tags[i], event.id)
            head = f"id: {CURSOR_VERSION}{','.join([entry for entry in entries if entry])}\n"
            if event.event is not None:
                head += f"event: {event.event}\n"
            if event.retry is not None:
                head += f"retry: {event.retry}\n"
            # An event's data is valid UTF-8 (checked when it was made): no fallback.
            data = f"{prefixes[event.session_id]}{_quote(event.data)}}}"
            framed.append(_framed(event, f"{head}data: {data}\n\n".encode()))
        return framed

    @property
    def queued(self) -> int:
        return self.multi.queued

    async def receive_batch(self, *, max_bytes: int | None = None) -> list[Event]:
        return self.frame(await self.multi.receive_batch(max_bytes=max_bytes))

    def drain_nowait(self, *, max_bytes: int | None = None) -> list[Event]:
        return self.frame(self.multi.drain_nowait(max_bytes=max_bytes))

    def _interrupt(self) -> None:
        self.multi._interrupt()

    async def aclose(self) -> None:
        await self.multi.aclose()
