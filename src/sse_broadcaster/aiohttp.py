"""Server-Sent Events handlers for aiohttp.

::

    from aiohttp import web

    from sse_broadcaster import EventBroadcaster
    from sse_broadcaster.aiohttp import metrics_handler, setup, sse_handler, stats_handler

    broadcaster = EventBroadcaster()
    app = web.Application()
    app.router.add_get("/events/{session_id}", sse_handler(broadcaster))
    app.router.add_get("/stats", stats_handler(broadcaster))
    app.router.add_get("/metrics", metrics_handler(broadcaster))
    setup(app, broadcaster)  # starts and closes it with the app (cleanup_ctx)
    web.run_app(app)

Or return an `EventSourceResponse` from any handler: it streams a
`Subscription` or a request's own async generator.

Needs the ``aiohttp`` extra: ``pip install 'sse-broadcaster[aiohttp]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from ._adapter import (
    METRICS_CONTENT_TYPE,
    Authorize,
    is_authorized,
    missing_extra,
    multi_cursor_cap,
    parse_last_event_id,
)
from ._connection import abort_connection
from ._response import (
    ComeBackLater,
    ResponseSource,
    StreamCore,
    check_status,
    come_back_later_headers,
)
from ._run_http import answer_run
from ._streams import FLUSH_WINDOW, check_flush_window, registry_for

try:
    from aiohttp import web
    from aiohttp.abc import AbstractStreamWriter
except ImportError as exc:  # pragma: no cover - tested by hiding aiohttp
    raise missing_extra("aiohttp", exc) from exc

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster

__all__ = [
    "EventSourceResponse",
    "close_streams",
    "follow_run",
    "metrics_handler",
    "open_streams",
    "setup",
    "sse_handler",
    "sse_multi_handler",
    "stats_handler",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse_handler(
    broadcaster: EventBroadcaster,
    *,
    authorize: Authorize | None = None,
    match_info_key: str = "session_id",
    flush_window: float = FLUSH_WINDOW,
) -> Handler:
    """A handler streaming the session named by the route's ``{session_id}``.

    Use it as ``app.router.add_get("/events/{session_id}", sse_handler(broadcaster))``.
    It behaves as `sse_broadcaster.starlette.sse_endpoint` does: resume from
    ``Last-Event-ID`` (or the ``lastEventId`` query parameter), ``retry:`` and
    a ``gap`` event first, keep-alive comments, the send timeout, batched
    writes; 400 for an invalid session id, 403 when `authorize` says no, and
    200 with a jittered ``retry:`` and ``Retry-After`` when a limit is reached.

    aiohttp does not tell a handler that its client went away, so a
    disconnect is noticed by the registry's watchdog (one timer for all
    streams; it checks every transport four times per keep-alive interval)
    or by the next write.

    Args:
        broadcaster: the broadcaster to subscribe to; run it with `setup`.
        authorize: ``authorize(request, session_id)``, sync or async, gets the
            `aiohttp.web.Request`; False answers 403 before any event is sent.
        match_info_key: the route's variable holding the session id.
        flush_window: the longest a burst of a session's events is held so
            that more of them join one write, held only while events keep
            coming; see `sse_broadcaster._streams.FLUSH_WINDOW` and
            docs/starlette.md. 0 never holds a write.

    Raises:
        ValueError: `flush_window` is negative, infinite or NaN.
    """
    check_flush_window(flush_window)

    async def handler(request: web.Request) -> web.StreamResponse:
        session_id = request.match_info.get(match_info_key, "")
        last_event_id = parse_last_event_id(
            _last_event_id_header(request), request.query.get("lastEventId")
        )
        try:
            subscription = broadcaster.subscribe(session_id, last_event_id=last_event_id.value)
        except (TypeError, ValueError) as exc:
            return web.Response(status=400, text=f"invalid session id: {exc}")
        if not await is_authorized(authorize, request, session_id):
            return web.Response(status=403, text="forbidden")
        response = EventSourceResponse(subscription, flush_window=flush_window)
        response._core.last_event_id = last_event_id
        return response

    return handler


def _last_event_id_header(request: web.Request) -> bytes | None:
    # The raw bytes: aiohttp's str headers keep undecodable bytes as lone
    # surrogates, which could not be encoded into the gap event.
    return next(
        (value for name, value in request.raw_headers if name.lower() == b"last-event-id"),
        None,
    )


def sse_multi_handler(
    broadcaster: EventBroadcaster,
    *,
    authorize: Authorize | None = None,
    query_param: str = "session",
    flush_window: float = FLUSH_WINDOW,
) -> Handler:
    """A handler streaming the sessions named in the query on one stream.

    Use it as ``app.router.add_get("/events", sse_multi_handler(broadcaster))``
    and open ``/events?session=a&session=b``. It behaves as
    `sse_broadcaster.starlette.sse_multi_endpoint` does: each event's
    ``data`` is ``{"session": ..., "data": ...}`` and its ``id`` the cursor
    resuming every session; 400 for no session, a session twice, an invalid
    one or too many; 403 when `authorize` says no for any session.

    Args:
        broadcaster: the broadcaster to subscribe to; run it with `setup`.
        authorize: ``authorize(request, session_id)``, sync or async, called
            for each session; one False answers 403.
        query_param: the query parameter naming the sessions, repeated.
        flush_window: the longest a burst of events is held so that more of
            them join one write (this stream's own flush; held only while
            events keep coming); 0 never holds a write.

    Raises:
        ValueError: `flush_window` is negative, infinite or NaN.
    """
    check_flush_window(flush_window)

    async def handler(request: web.Request) -> web.StreamResponse:
        session_ids = request.query.getall(query_param, [])
        last_event_id = parse_last_event_id(
            _last_event_id_header(request),
            request.query.get("lastEventId"),
            multi_cursor_cap(broadcaster.config),
        )
        try:
            multi = broadcaster.subscribe_many(session_ids, cursor=last_event_id.value)
        except (TypeError, ValueError) as exc:
            return web.Response(status=400, text=f"invalid sessions: {exc}")
        for session_id in multi.session_ids:
            if not await is_authorized(authorize, request, session_id):
                return web.Response(status=403, text="forbidden")
        response = EventSourceResponse(multi, flush_window=flush_window)
        response._core.last_event_id = last_event_id
        return response

    return handler


class EventSourceResponse(web.StreamResponse):
    """An aiohttp response streaming Server-Sent Events; return it from a handler.

    ::

        async def events(request: web.Request) -> web.StreamResponse:
            return EventSourceResponse(broadcaster.subscribe(request.match_info["room"]))

    aiohttp prepares a returned response and then ends it: the stream runs in
    `prepare`, until the source ends, the client leaves, its socket stops
    taking writes for `send_timeout`, or the app shuts down. `source` and the
    options are those of `sse_broadcaster.asgi.EventSourceResponse`: a
    `Subscription`, a `MultiSubscription` (several sessions on one stream,
    see docs/replay.md) or an async iterable of `Event` objects, dicts or
    strings; per-response ping, send timeout, retry, headers and `status`.

    aiohttp does not tell a handler that its client went away, so a
    disconnect is noticed by the watchdog (it checks the transport four times
    per ping interval) or by the next write.

    Raises:
        TypeError, ValueError: as `sse_broadcaster.asgi.EventSourceResponse`.
    """

    def __init__(
        self,
        source: ResponseSource,
        *,
        status: int = 200,
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
        ping: float | None = None,
        ping_comment: str = "ping",
        send_timeout: float | None = None,
        retry: int | None = None,
        flush_window: float = FLUSH_WINDOW,
    ) -> None:
        check_status(status)
        self._core = StreamCore(
            source,
            headers=headers,
            ping=ping,
            ping_comment=ping_comment,
            send_timeout=send_timeout,
            retry=retry,
            flush_window=flush_window,
        )
        super().__init__(status=status, reason=reason, headers=dict(self._core.headers))
        self._streamed = False
        self._dropped = False

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        """Send the head, then the whole stream; aiohttp calls it for a returned response."""
        if self._streamed:
            return await super().prepare(request)
        self._streamed = True
        core = self._core
        if request.method == "HEAD":  # the head only: no stream to follow it
            await core.close()
            return await super().prepare(request)
        try:
            first = await core.open()
        except ComeBackLater as later:
            self.set_status(200)
            self.headers.clear()
            self.headers.update(come_back_later_headers(later.retry_after, len(later.body)))
            writer = await super().prepare(request)
            await self.write(later.body)
            return writer

        def disconnected() -> bool:
            transport = request.transport
            return transport is None or transport.is_closing()

        try:
            writer = await super().prepare(request)
        except BaseException:
            await core.close()
            raise
        outcome = await core.run(self.write, first=first, disconnected=disconnected)
        if outcome == "timeout" or outcome == "disconnected":
            # The socket is full or gone: drop the connection rather than wait on it.
            abort_connection(request.transport)
            self.force_close()
            self._dropped = True
            return writer
        with anyio.move_on_after(core.send_timeout, shield=True):
            with contextlib.suppress(OSError):
                await self.write_eof()
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._dropped:  # the connection was aborted: nothing can be written
            return
        await super().write_eof(data)


def stats_handler(broadcaster: EventBroadcaster) -> Handler:
    """A handler answering `EventBroadcaster.stats` as JSON."""

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(broadcaster.stats())

    return stats


def metrics_handler(broadcaster: EventBroadcaster) -> Handler:
    """A handler answering the broadcaster's figures in Prometheus text format."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        streams = len(registry_for(broadcaster))
        text = broadcaster._prometheus_text(
            [("sse_broadcaster_open_streams", "gauge", "Open SSE streams.", streams)],
        )
        response = web.Response(text=text)
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    return metrics


def open_streams(broadcaster: EventBroadcaster) -> int:
    """How many of the broadcaster's streams are open in this process, on either adapter.

    The ``sse_broadcaster_open_streams`` gauge of `metrics_handler`. Subscribers
    in other processes (a shared backend) are counted by
    `EventBroadcaster.stats` instead.
    """
    return len(registry_for(broadcaster))


def close_streams(broadcaster: EventBroadcaster) -> None:
    """End every open stream of the broadcaster in this process, as a shutdown does.

    Each client is sent the end of its stream; streams that open afterwards
    are answered "come back later" (200, ``retry:``) until `setup`'s cleanup
    context runs the broadcaster again. `setup` calls it on shutdown.
    """
    registry_for(broadcaster).close_all()


def setup(app: web.Application, broadcaster: EventBroadcaster) -> None:
    """Run the broadcaster with the app: started on startup, closed on cleanup.

    Adds an ``on_shutdown`` callback that ends every open stream (aiohttp runs
    it before it waits for handlers to finish, so shutdown does not hang on
    open streams) and a ``cleanup_ctx`` entry that enters and closes the
    broadcaster. The broadcaster lives in a task of its own, so it does not
    matter which tasks run the app's startup and cleanup.
    """

    async def end_streams(app: web.Application) -> None:
        registry_for(broadcaster).close_all()

    async def run_broadcaster(app: web.Application) -> AsyncIterator[None]:
        registry = registry_for(broadcaster)
        registry.closing = False
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        stop = asyncio.Event()

        async def own() -> None:
            try:
                async with broadcaster:
                    started.set_result(None)
                    await stop.wait()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        task = loop.create_task(own(), name="sse_broadcaster lifetime")
        try:
            await started
        except BaseException:
            await asyncio.gather(task, return_exceptions=True)
            raise
        try:
            yield
        finally:
            registry.close_all()
            stop.set()
            await task

    app.on_shutdown.append(end_streams)
    app.cleanup_ctx.append(run_broadcaster)


async def follow_run(
    broadcaster: EventBroadcaster, session_id: str, request: web.Request, **options: Any
) -> web.StreamResponse:
    """The response to a ``GET`` following the session's run (docs/runs.md).

    ::

        async def events(request: web.Request) -> web.StreamResponse:
            return await follow_run(broadcaster, request.match_info["run_id"], request)

    Answers as `sse_broadcaster.starlette.follow_run` does: the rest of the
    run after ``Last-Event-ID`` (or the ``lastEventId`` query), then live
    events, ending after its end marker; 204 after the end marker; a ``gap``
    and an expired ``end`` event for an expired run; 404 without a run; 400
    for an invalid session id. `options` are those of `EventSourceResponse`.

    Raises:
        BroadcasterError: the broadcaster's backend keeps no runs.
    """
    header = next(
        (value for name, value in request.raw_headers if name.lower() == b"last-event-id"),
        None,
    )
    last_event_id = parse_last_event_id(header, request.query.get("lastEventId"))
    answer = await answer_run(broadcaster, session_id, last_event_id)
    if answer.source is None:
        if answer.status == 204:
            return web.Response(status=204, headers={"Cache-Control": "no-cache"})
        return web.Response(status=answer.status, text=answer.message)
    if answer.retry is not None:
        options.setdefault("retry", answer.retry)
    response = EventSourceResponse(answer.source, **options)
    response._core.last_event_id = answer.last_event_id
    return response
