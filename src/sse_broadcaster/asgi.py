"""Server-Sent Events for any ASGI framework, with no framework installed.

`EventSourceResponse` is an ASGI app that streams one source to one request:
a `Subscription`, or any async iterable of `Event` objects, dicts or strings.
Return it where a framework takes an ASGI app (Litestar's handlers,
``Mount``), call it from your own ASGI code, or use the Starlette / FastAPI
subclass in `sse_broadcaster.starlette`::

    from sse_broadcaster.asgi import EventSourceResponse

    async def app(scope, receive, send):  # any ASGI app
        async def tokens():
            for word in ("hello", "world"):
                yield {"event": "token", "data": word}

        await EventSourceResponse(tokens(), ping=5)(scope, receive, send)

It notices the client leaving (``http.disconnect``), sends ``: ping`` after
each `ping` seconds of silence, drops a client whose socket does not take a
write within `send_timeout`, ends at once when the server gets SIGINT /
SIGTERM, and writes each drained batch of events with one ASGI ``send``. See
docs/frameworks.md for Litestar, Quart and Django.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._connection import abort_connection, server_transport
from ._response import (
    ComeBackLater,
    ResponseSource,
    StreamCore,
    check_status,
    come_back_later_headers,
)
from ._run_http import PlainResponse, answer_run, scope_last_event_id
from ._shutdown import install_shutdown_hook
from ._streams import FLUSH_WINDOW, registry_for

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster

__all__ = [
    "EventSourceResponse",
    "close_streams",
    "follow_run",
    "lifespan",
    "open_streams",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _raw(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers]


class EventSourceResponse:
    """An ASGI app streaming `source` as ``text/event-stream`` to one request.

    `source` is a `Subscription` (entered here if it was not, closed at the
    end; a gap on entry opens the stream with the ``gap`` event), a
    `MultiSubscription` (the same, several sessions on one stream: each
    event's data is ``{"session": ..., "data": ...}`` and its id the cursor
    after it; a ``gap`` event per session; see docs/replay.md) or an async
    iterable of `Event` objects, dicts (keys ``data``, ``event``, ``id``,
    ``retry``, ``comment``) or strings (the data of an unnamed event). An
    iterable is pulled one item at a time as the client takes them, and is
    closed (``aclose``) when the stream ends for any reason; an exception it
    raises, or an item that cannot be written, is logged and ends the stream
    after the last complete event.

    Args:
        source: what to stream.
        status_code: the response status.
        headers: extra response headers; they replace the SSE defaults of
            the same name.
        ping: seconds of silence before a keep-alive comment; by default the
            broadcaster's ``keepalive_interval`` for a subscription, else 15.
        ping_comment: the keep-alive comment's text.
        send_timeout: seconds a write may wait for the client's socket before
            the client is dropped; by default the broadcaster's
            ``send_timeout`` for a subscription, else 5.
        retry: the ``retry:`` (milliseconds) the stream opens with; by default
            the broadcaster's ``retry_ms`` for a subscription, else none.
        flush_window: the longest a burst of a session's events is held so
            that more join one write, held only while events keep coming
            (subscriptions only; 0: never held).

    Raises:
        TypeError: `source` is neither a subscription nor an async iterable,
            or an option has the wrong type.
        ValueError: an option is out of range, or a header or the ping
            comment holds CR, LF or NUL.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        source: ResponseSource,
        *,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        ping: float | None = None,
        ping_comment: str = "ping",
        send_timeout: float | None = None,
        retry: int | None = None,
        flush_window: float = FLUSH_WINDOW,
    ) -> None:
        check_status(status_code)
        self._core = StreamCore(
            source,
            headers=headers,
            ping=ping,
            ping_comment=ping_comment,
            send_timeout=send_timeout,
            retry=retry,
            flush_window=flush_window,
        )
        self.status_code = status_code
        self.raw_headers = _raw(self._core.headers)
        """The response headers as ASGI sends them (the same list object as Starlette's)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} status_code={self.status_code}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(
                f"{type(self).__name__} serves HTTP only, got a {scope['type']!r} scope"
            )
        core = self._core
        if scope.get("method") == "HEAD":  # the head only: no stream to follow it
            await core.close()
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            first = await core.open()
        except ComeBackLater as later:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": _raw(come_back_later_headers(later.retry_after, len(later.body))),
                }
            )
            await send({"type": "http.response.body", "body": later.body})
            return

        # Taken now: a stream dropped for its send timeout must close its socket.
        transport = server_transport(receive)

        async def write(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            start = {"status": self.status_code, "headers": self.raw_headers}
            await send({"type": "http.response.start", **start})
        except BaseException:
            await core.close()
            raise
        outcome = await core.run(write, first=first, listen=listen)
        if outcome == "timeout":
            # The client's socket is full: an end-of-body could not be written
            # either. A server's own close() would wait for the client to read
            # what is buffered, keeping the socket and its buffer for as long as
            # the client stays: abort the connection.
            if abort_connection(transport):
                # Let the server see the connection lost before this returns,
                # or it reports a response left unfinished.
                await anyio.lowlevel.checkpoint()
            return
        with anyio.move_on_after(core.send_timeout, shield=True) as ending:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if ending.cancelled_caught and abort_connection(transport):
            await anyio.lowlevel.checkpoint()


def open_streams(broadcaster: EventBroadcaster) -> int:
    """How many of the broadcaster's streams are open in this process, on either adapter.

    The ``sse_broadcaster_open_streams`` gauge of the metrics endpoints. Subscribers
    in other processes (a shared backend) are counted by
    `EventBroadcaster.stats` instead.
    """
    return len(registry_for(broadcaster))


def close_streams(broadcaster: EventBroadcaster) -> None:
    """End every open stream of the broadcaster in this process, as a shutdown does.

    Each client is sent the end of its stream; streams that open afterwards
    are answered "come back later" (200, ``retry:``) until the broadcaster is
    run again by `lifespan`. `lifespan` calls it on shutdown; call it yourself
    from the event loop when you stop the server some other way.
    """
    registry_for(broadcaster).close_all()


def lifespan(
    broadcaster: EventBroadcaster,
) -> Callable[[object], AbstractAsyncContextManager[None]]:
    """A ``lifespan`` that runs the broadcaster with the app (Starlette, FastAPI, Litestar).

    On startup it enters the broadcaster and chains the server's SIGINT and
    SIGTERM handlers so that a shutdown ends the open streams at once (uvicorn
    waits for every response to finish before it runs the lifespan shutdown).
    On shutdown it ends the remaining streams and closes the broadcaster.

    Raises:
        RuntimeError: the broadcaster was already entered or closed.
    """

    @asynccontextmanager
    async def _lifespan(app: object) -> AsyncIterator[None]:
        registry = registry_for(broadcaster)
        registry.closing = False
        install_shutdown_hook(registry)
        async with broadcaster:
            try:
                yield
            finally:
                registry.close_all()

    return _lifespan


async def follow_run(
    broadcaster: EventBroadcaster, session_id: str, scope: Scope, **options: Any
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app answering a ``GET`` that follows the session's run (docs/runs.md).

    Reads ``Last-Event-ID`` (or the ``lastEventId`` query) from `scope`:
    exactly the rest of the run, then live events, ending after its end
    marker; the whole run without an id; 204 after the end marker (an
    EventSource stops reconnecting); for an expired run a ``gap`` event and an
    ``end`` event saying ``"expired": true``; 404 when the session has had no
    run; 400 for an invalid session id. It never starts a run. `options` are
    those of `EventSourceResponse`::

        app = await follow_run(broadcaster, run_id, scope)
        await app(scope, receive, send)

    Raises:
        BroadcasterError: the broadcaster's backend keeps no runs.
    """
    answer = await answer_run(broadcaster, session_id, scope_last_event_id(scope))
    if answer.source is None:
        return PlainResponse(answer.status, answer.message)
    if answer.retry is not None:
        options.setdefault("retry", answer.retry)
    response = EventSourceResponse(answer.source, **options)
    response._core.last_event_id = answer.last_event_id
    return response
