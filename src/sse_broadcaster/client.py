"""A resilient Server-Sent Events client on the pooled HTTP client.

::

    from sse_broadcaster.client import EventSource

    async with EventSource("https://feed.example.com/events/room-1") as source:
        async for event in source:
            print(event.id, event.event, event.data)

It parses the stream as the WHATWG HTML standard says ("Server-sent events",
section 9.2.6), reconnects with capped exponential backoff and jitter after
network errors, a closed stream or a retryable status, honours ``retry:`` and
resends ``Last-Event-ID``, like a browser's ``EventSource``. Unlike a browser,
it stops with an `EventSourceError` on a status it cannot recover from.

A task of its own reads the stream while the ``async with`` block runs, so
that leaving the block (or cancelling the consumer) always closes the
connection, whichever event loop runs it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from types import TracebackType

import anyio
import anyio.abc
import httpx
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import Self

from ._decoding import ACCEPT_ENCODING, DecodeError, Decoder, decode, decoders
from ._sse import (
    EventSourceError,
    InvalidContentTypeError,
    InvalidStatusError,
    OversizedEventError,
    ServerSentEvent,
    SSEParser,
)
from ._validation import check_minimum
from .http import get_http_client

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "ACCEPT_ENCODING",
    "EventSource",
    "EventSourceError",
    "InvalidContentTypeError",
    "InvalidStatusError",
    "OversizedEventError",
    "SSEParser",
    "ServerSentEvent",
]

# Reprs and the docs name the public module, not the private one.
for _cls in (
    EventSourceError,
    InvalidContentTypeError,
    InvalidStatusError,
    OversizedEventError,
    SSEParser,
    ServerSentEvent,
):
    _cls.__module__ = __name__
del _cls

logger = logging.getLogger("sse_broadcaster.client")

# Statuses worth retrying: the server or something in front of it is briefly
# unable to answer. Any other non-2xx answer will not fix itself.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

# Bytes that no HTTP/1.1 field value may hold (h11 refuses them, even as bytes).
_UNSENDABLE = re.compile(rb"[\x00\n\r\x0b\x0c]")


def _last_event_id_header(last_event_id: str, limit: int) -> bytes | None:
    """The ``Last-Event-ID`` header value for ``last_event_id``; None: send none.

    The id goes as its UTF-8 bytes, as the WHATWG standard says ("encoded as
    UTF-8"), without the spaces and tabs at its ends: HTTP removes them from any
    field value (RFC 9110, section 5.5), so the server sees what it would see
    from a browser. An id empty once stripped is not sent, like an empty id.

    Raises:
        ValueError: the id holds a byte no HTTP header can carry (NUL, LF, CR,
            VT or FF), or is longer than ``limit`` bytes; the message says which.
    """
    try:
        value = last_event_id.encode("utf-8").strip(b" \t")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (it holds a lone surrogate)") from None
    if _UNSENDABLE.search(value):
        raise ValueError("holds NUL, LF, CR, VT or FF, which no HTTP header can carry")
    if len(value) > limit:
        raise ValueError(f"is {len(value)} bytes in UTF-8, over max_last_event_id ({limit})")
    return value or None


def _backoff(
    failures: int,
    *,
    base: float,
    cap: float,
    multiplier: float,
    jitter: float,
    random: Callable[[], float],
) -> float:
    """Seconds to wait before reconnection attempt after ``failures`` failures in a row.

    The delay doubles (``multiplier``) from ``base`` up to ``cap`` (never below
    ``base``: a server's ``retry:`` is honoured even above the cap), and up to a
    ``jitter`` fraction of it is taken off at random so that many clients cut off
    at once do not come back at once.
    """
    delay = min(base * multiplier ** max(failures - 1, 0), max(cap, base))
    return delay * (1.0 - jitter * random())


_Item = ServerSentEvent | BaseException


async def _finish(chunks: AsyncIterator[bytes]) -> None:
    """Run a response's chunk iterator to its end, now.

    Left suspended, httpx's and httpcore's chain of async generators would be
    finalised by the garbage collector (trio warns about each one). Resuming
    it inside a cancelled scope makes the cancellation propagate through every
    generator of the chain, which then close their own resources.
    """
    with anyio.CancelScope(shield=True), anyio.CancelScope() as scope:
        scope.cancel()
        with contextlib.suppress(Exception):
            async for _ in chunks:
                pass


def _shorten(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut to about ``limit`` characters for an error message."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


@contextlib.contextmanager
def _unwrap_group() -> Iterator[None]:
    """Raise the one exception of an ExceptionGroup as itself.

    Several exceptions at once (only possible if a BaseException such as
    KeyboardInterrupt hits the reader task as the block fails) stay grouped.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        context = error.__context__  # raising it here would replace it with the group
        try:
            raise error
        finally:
            error.__context__ = context
            del error, context


class EventSource:
    """Follows an SSE stream, reconnecting as a browser's ``EventSource`` does.

    ``async with EventSource(url) as source: async for event in source: ...``
    yields `ServerSentEvent` objects. The stream is read on ``client`` (by
    default the loop's shared pooled client, `sse_broadcaster.http.get_http_client`).

    After a network error, a read timeout, the end of the stream or a retryable
    status (429, 5xx...), it waits and reconnects, sending ``Last-Event-ID``.
    The wait starts at ``reconnect_delay`` (or the server's ``retry:``), grows
    by ``backoff_multiplier`` per failure in a row up to ``max_reconnect_delay``,
    minus up to a ``jitter`` fraction at random. HTTP 204 ends the iteration:
    the server asks not to reconnect. ``max_retries`` failures in a row (None:
    never give up) end it with `EventSourceError`. A ``Retry-After`` header
    (seconds) on a retryable status lengthens the wait, up to
    ``max_reconnect_delay``, as does a server's ``retry:``. An event larger than
    ``max_event_size`` characters ends it with `OversizedEventError` (memory
    stays bounded whatever the server sends, compressed or not).

    ``Last-Event-ID`` is sent as the id's UTF-8 bytes, without spaces or tabs at
    its ends. An id that cannot be sent (longer than ``max_last_event_id`` bytes,
    or holding NUL, LF, CR, VT or FF) ends the iteration with `EventSourceError`
    when a reconnection would need it, rather than resuming from the wrong place.

    Every failure is raised as an `EventSourceError` (the httpx error, if any, as
    its ``__cause__``); an exception leaving the ``async with`` block propagates
    as it is, not wrapped in an ``ExceptionGroup``.

    Raises:
        ValueError: a delay, multiplier, jitter, ``max_retries``,
            ``max_event_size`` or ``max_last_event_id`` is out of range, or
            ``last_event_id`` cannot be sent.
    """

    def __init__(
        self,
        url: str | httpx.URL,
        *,
        client: httpx.AsyncClient | None = None,
        last_event_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
        reconnect_delay: float = 3.0,
        max_reconnect_delay: float = 30.0,
        backoff_multiplier: float = 2.0,
        jitter: float = 0.5,
        max_retries: int | None = None,
        max_last_event_id: int = 4096,
        max_event_size: int | None = 16 * 1024 * 1024,
    ) -> None:
        check_minimum("reconnect_delay", reconnect_delay, 0.0)
        check_minimum("max_reconnect_delay", max_reconnect_delay, 0.0)
        check_minimum("backoff_multiplier", backoff_multiplier, 1.0)
        check_minimum("jitter", jitter, 0.0)
        if jitter > 1:
            raise ValueError(f"jitter must be <= 1, got {jitter!r}")
        if max_retries is not None and (isinstance(max_retries, bool) or max_retries < 0):
            raise ValueError(f"max_retries must be >= 0 or None, got {max_retries!r}")
        if isinstance(max_last_event_id, bool) or max_last_event_id < 1:
            raise ValueError(f"max_last_event_id must be >= 1, got {max_last_event_id!r}")
        if last_event_id:
            try:
                _last_event_id_header(last_event_id, max_last_event_id)
            except ValueError as exc:
                raise ValueError(
                    f"last_event_id cannot be sent: it {exc}, got {_shorten(last_event_id)}"
                ) from None
        self.url = httpx.URL(url)
        self._client = client
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._base_delay = float(reconnect_delay)
        self._max_delay = float(max_reconnect_delay)
        self._multiplier = float(backoff_multiplier)
        self._jitter = float(jitter)
        self._max_retries = max_retries
        self._max_last_event_id = max_last_event_id
        self._random: Callable[[], float] = random.random
        self._parser = SSEParser(last_event_id or "", max_event_size=max_event_size)
        self._retry_after: float | None = None
        self._last_event_id = last_event_id or ""
        self._task_group: anyio.abc.TaskGroup | None = None
        self._reader_scope: anyio.CancelScope | None = None
        self._receive: MemoryObjectReceiveStream[_Item] | None = None
        self._closed = False
        self.connections = 0
        """Connections opened so far (the first one and every reconnection)."""

    def __repr__(self) -> str:
        return f"<EventSource {str(self.url)!r} last_event_id={self._last_event_id!r}>"

    @property
    def last_event_id(self) -> str:
        """The id of the last event yielded: pass it as ``last_event_id`` to resume."""
        return self._last_event_id

    @property
    def reconnect_delay(self) -> float:
        """The current reconnection time in seconds (changed by ``retry:``)."""
        return self._base_delay

    @property
    def closed(self) -> bool:
        """True once the source has ended or was closed."""
        return self._closed

    async def __aenter__(self) -> Self:
        if self._task_group is not None or self._closed:
            raise RuntimeError("an EventSource can be entered only once")
        send, self._receive = anyio.create_memory_object_stream[_Item](0)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._reader_scope = anyio.CancelScope()
        self._task_group.start_soon(self._read, send)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        assert self._task_group is not None
        task_group = self._task_group
        with _unwrap_group():
            if exc_value is None or isinstance(exc_value, anyio.get_cancelled_exc_class()):
                return await task_group.__aexit__(exc_type, exc_value, traceback)
            # The body raised. The reader is cancelled already, so the task group
            # ends at once; the body's exception propagates as it is, not wrapped
            # in an ExceptionGroup, so `except EventSourceError` outside matches.
            await task_group.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Stop reading and close the connection; iteration then ends."""
        self._closed = True
        if self._reader_scope is not None:
            self._reader_scope.cancel()
        if self._receive is not None:
            self._receive.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ServerSentEvent:
        """The next event.

        Raises:
            EventSourceError: the server answered with a status, content type or
                encoding that retrying cannot fix, the request cannot be sent
                (a redirect loop, an id that cannot be sent back), or
                ``max_retries`` was reached.
            RuntimeError: the source was not entered with ``async with``.
        """
        if self._receive is None:
            raise RuntimeError("use `async with EventSource(...) as source:` before iterating")
        try:
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._closed = True
            raise StopAsyncIteration from None
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        self._last_event_id = item.id
        return item

    # ----------------------------------------------------------------- reader task

    async def _read(self, send: MemoryObjectSendStream[_Item]) -> None:
        assert self._reader_scope is not None
        with self._reader_scope, send:
            try:
                await self._follow(send)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer has gone
            except Exception as exc:  # hand every failure to the consumer
                error = exc
                if not isinstance(exc, EventSourceError):
                    error = EventSourceError(f"GET {self.url} failed: {type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await send.send(error)

    async def _follow(self, send: MemoryObjectSendStream[_Item]) -> None:
        client = self._client or get_http_client()
        failures = 0
        while True:
            if self.connections:
                delay = _backoff(
                    failures,
                    base=self._base_delay,
                    cap=self._max_delay,
                    multiplier=self._multiplier,
                    jitter=self._jitter,
                    random=self._random,
                )
                if self._retry_after is not None:
                    delay = max(delay, min(self._retry_after, self._max_delay))
                    self._retry_after = None
                await anyio.sleep(delay)
            self.connections += 1
            outcome: bool | str | None
            error: httpx.TransportError | None = None
            try:
                outcome = await self._stream_once(client, send)
            except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
                # The request itself cannot be sent: sending it again would not help.
                raise EventSourceError(
                    f"GET {self.url} cannot be sent: {type(exc).__name__}: {exc}"
                ) from exc
            except httpx.TransportError as exc:
                outcome, error = f"{type(exc).__name__}: {exc}", exc
            if outcome is True:  # events arrived: the next failure starts afresh
                failures = 0
                continue
            if outcome is None:  # HTTP 204: the server asks us to stop
                return
            failures += 1
            if self._max_retries is not None and failures > self._max_retries:
                raise EventSourceError(
                    f"gave up on {self.url} after {failures} failed attempts in a row: {outcome}"
                ) from error
            logger.info("SSE stream %s: %s; reconnecting", self.url, outcome)

    async def _stream_once(
        self, client: httpx.AsyncClient, send: MemoryObjectSendStream[_Item]
    ) -> bool | str | None:
        """One connection: True if it delivered events, None on 204, else why it failed."""
        last_event_id = self._parser.last_event_id
        try:
            value = _last_event_id_header(last_event_id, self._max_last_event_id)
        except ValueError as exc:
            raise EventSourceError(
                f"cannot resume {self.url}: its last event id {_shorten(last_event_id)} {exc}"
            ) from None
        headers = httpx.Headers(
            {
                "Accept": "text/event-stream",
                "Accept-Encoding": ACCEPT_ENCODING,
                "Cache-Control": "no-store",
                **self._headers,
            }
        )
        if value is not None:  # as bytes: httpx would encode a str as ASCII
            raw = [(k, v) for k, v in headers.raw if k.lower() != b"last-event-id"]
            headers = httpx.Headers([*raw, (b"Last-Event-ID", value)])
        request = client.build_request(
            "GET",
            self.url,
            headers=headers,
            timeout=self._timeout if self._timeout is not None else client.timeout,
        )
        response = await client.send(request, stream=True, follow_redirects=True)
        try:
            verdict = self._check_response(response)
            if verdict is not True:
                return verdict
            decoders = self._decoders(response)
            delivered = False
            self._parser.reset()
            # Raw bytes, decoded here: httpx's decoders would inflate a whole
            # read at once, however large that makes it.
            chunks = response.aiter_raw()
            try:
                async for chunk in chunks:
                    for piece in decode(decoders, chunk):
                        for event in self._parser.feed(piece):
                            await send.send(event)
                            delivered = True
                    self._apply_retry()
            except httpx.TransportError as exc:
                return delivered or f"{type(exc).__name__}: {exc}"
            except DecodeError as exc:
                encoding = ", ".join(d.encoding for d in decoders)
                raise EventSourceError(
                    f"GET {response.url} answered a body that is not valid {encoding}: {exc}"
                ) from exc
            finally:
                await _finish(chunks)
            for event in self._parser.feed(b"", final=True):
                await send.send(event)
                delivered = True
            return delivered or "the server closed the stream"
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    def _apply_retry(self) -> None:
        if self._parser.retry is not None:
            # A server's retry: is honoured up to max_reconnect_delay, like Retry-After.
            self._base_delay = min(self._parser.retry / 1000, self._max_delay)

    def _decoders(self, response: httpx.Response) -> list[Decoder]:
        encodings = response.headers.get_list("content-encoding", split_commas=True)
        try:
            return decoders(encodings)
        except ValueError as exc:
            raise EventSourceError(
                f"GET {response.url} answered Content-Encoding {exc.args[0]!r}, which the client "
                f"cannot decode (it accepts {ACCEPT_ENCODING})"
            ) from None

    def _check_response(self, response: httpx.Response) -> bool | str | None:
        status = response.status_code
        if status == 204:
            return None
        if status in RETRYABLE_STATUSES:
            retry_after = response.headers.get("retry-after", "").strip()
            if retry_after.isascii() and retry_after.isdigit():
                self._retry_after = float(retry_after)
            return f"HTTP {status}"
        if not 200 <= status < 300:
            raise InvalidStatusError(
                f"GET {response.url} answered HTTP {status}, which is not retried",
                status_code=status,
            )
        content_type = response.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "text/event-stream":
            raise InvalidContentTypeError(
                f"GET {response.url} answered Content-Type {content_type!r}, "
                "not 'text/event-stream'",
                content_type=content_type,
            )
        return True
