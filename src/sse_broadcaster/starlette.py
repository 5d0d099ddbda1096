"""Server-Sent Events endpoints for Starlette and FastAPI.

::

    from starlette.applications import Starlette
    from starlette.routing import Route

    from sse_broadcaster import EventBroadcaster
    from sse_broadcaster.starlette import lifespan, metrics_endpoint, sse_endpoint, stats_endpoint

    broadcaster = EventBroadcaster()
    app = Starlette(
        routes=[
            Route("/events/{session_id}", sse_endpoint(broadcaster)),
            Route("/stats", stats_endpoint(broadcaster)),
            Route("/metrics", metrics_endpoint(broadcaster)),
        ],
        lifespan=lifespan(broadcaster),
    )

Or return an `EventSourceResponse` from any endpoint or FastAPI path
operation (dependencies, typed parameters and the OpenAPI entry included)::

    @app.get("/rooms/{room}/events", response_class=EventSourceResponse)
    async def events(room: str, user: User = Depends(current_user)) -> EventSourceResponse:
        return EventSourceResponse(broadcaster.subscribe(room))

It streams a `Subscription` or a request's own async generator; it wraps
`sse_broadcaster.asgi.EventSourceResponse`, which `sse_endpoint` uses too.
Each drained batch of pre-encoded events goes out with one ASGI ``send``. It
runs on asyncio and on trio.

Needs the ``starlette`` extra: ``pip install 'sse-broadcaster[starlette]'``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ._adapter import (
    METRICS_CONTENT_TYPE,
    Authorize,
    is_authorized,
    missing_extra,
    multi_cursor_cap,
    parse_last_event_id,
)
from ._response import ResponseSource
from ._run_http import answer_run, scope_last_event_id
from ._streams import FLUSH_WINDOW, check_flush_window, registry_for
from .asgi import EventSourceResponse as ASGIEventSourceResponse
from .asgi import Receive, Scope, Send, close_streams, lifespan, open_streams

try:
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
except ImportError as exc:  # pragma: no cover - tested by hiding starlette
    raise missing_extra("starlette", exc) from exc

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster

__all__ = [
    "EventSourceResponse",
    "SSEEndpoint",
    "SSEMultiEndpoint",
    "close_streams",
    "follow_run",
    "lifespan",
    "metrics_endpoint",
    "open_streams",
    "sse_endpoint",
    "sse_multi_endpoint",
    "stats_endpoint",
]


class SSEEndpoint:
    """The ASGI app that streams a session; made by `sse_endpoint`.

    Starlette's `Route` treats an object that is not a function as an ASGI app,
    so the endpoint receives ``scope``, ``receive`` and ``send`` directly, with
    the session id in ``scope["path_params"]``.
    """

    def __init__(
        self,
        broadcaster: EventBroadcaster,
        *,
        authorize: Authorize | None = None,
        path_param: str = "session_id",
        flush_window: float = FLUSH_WINDOW,
    ) -> None:
        self.broadcaster = broadcaster
        self.authorize = authorize
        self.path_param = path_param
        self.flush_window = check_flush_window(flush_window)

    def __repr__(self) -> str:
        return f"<SSEEndpoint path_param={self.path_param!r} authorize={self.authorize!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"SSEEndpoint serves HTTP only, got a {scope['type']!r} scope")
        if scope["method"] != "GET":
            await _plain(send, 405, "only GET opens an event stream", [(b"allow", b"GET")])
            return
        broadcaster = self.broadcaster
        session_id = scope.get("path_params", {}).get(self.path_param, "")
        header: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"last-event-id":
                header = value
                break
        query: str | None = None
        if not header and scope.get("query_string"):
            for key, value in parse_qsl(scope["query_string"].decode("latin-1")):
                if key == "lastEventId":
                    query = value
                    break
        last_event_id = parse_last_event_id(header, query)
        try:
            subscription = broadcaster.subscribe(session_id, last_event_id=last_event_id.value)
        except (TypeError, ValueError) as exc:
            await _plain(send, 400, f"invalid session id: {exc}")
            return
        if self.authorize is not None and not await is_authorized(
            self.authorize, Request(scope, receive), session_id
        ):
            await _plain(send, 403, "forbidden")
            return
        response = ASGIEventSourceResponse(subscription, flush_window=self.flush_window)
        response._core.last_event_id = last_event_id
        await response(scope, receive, send)


def _last_event_id_header(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            return value  # type: ignore[no-any-return]
    return None


class SSEMultiEndpoint:
    """The ASGI app that streams several sessions on one stream; made by `sse_multi_endpoint`."""

    def __init__(
        self,
        broadcaster: EventBroadcaster,
        *,
        authorize: Authorize | None = None,
        query_param: str = "session",
        flush_window: float = FLUSH_WINDOW,
    ) -> None:
        self.broadcaster = broadcaster
        self.authorize = authorize
        self.query_param = query_param
        self.flush_window = check_flush_window(flush_window)

    def __repr__(self) -> str:
        return f"<SSEMultiEndpoint query_param={self.query_param!r} authorize={self.authorize!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"SSEMultiEndpoint serves HTTP only, got a {scope['type']!r} scope")
        if scope["method"] != "GET":
            await _plain(send, 405, "only GET opens an event stream", [(b"allow", b"GET")])
            return
        broadcaster = self.broadcaster
        session_ids: list[str] = []
        query: str | None = None
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == self.query_param:
                session_ids.append(value)
            elif key == "lastEventId" and query is None:
                query = value
        header = _last_event_id_header(scope)
        last_event_id = parse_last_event_id(header, query, multi_cursor_cap(broadcaster.config))
        try:
            multi = broadcaster.subscribe_many(session_ids, cursor=last_event_id.value)
        except (TypeError, ValueError) as exc:
            await _plain(send, 400, f"invalid sessions: {exc}")
            return
        if self.authorize is not None:
            request = Request(scope, receive)
            for session_id in multi.session_ids:
                if not await is_authorized(self.authorize, request, session_id):
                    await _plain(send, 403, "forbidden")
                    return
        response = ASGIEventSourceResponse(multi, flush_window=self.flush_window)
        response._core.last_event_id = last_event_id
        await response(scope, receive, send)


def sse_multi_endpoint(
    broadcaster: EventBroadcaster,
    *,
    authorize: Authorize | None = None,
    query_param: str = "session",
    flush_window: float = FLUSH_WINDOW,
) -> SSEMultiEndpoint:
    """An ASGI endpoint streaming the sessions named in the query on one stream.

    Use it as ``Route("/events", sse_multi_endpoint(broadcaster))`` and open
    ``/events?session=a&session=b``. Each event's ``data`` is
    ``{"session": ..., "data": ...}`` and its ``id`` the cursor that resumes
    every session (see docs/replay.md, "Several sessions on one stream"); the
    cursor comes back as ``Last-Event-ID`` (or the ``lastEventId`` query
    parameter), up to the length of a cursor of
    ``max_sessions_per_subscription`` sessions. A cursor that is too long,
    malformed or of other sessions opens with a ``gap`` event per session.

    Answers: 400 when no session is named, one is named twice or is not a
    valid session id, or more than ``max_sessions_per_subscription`` are
    named; 403 when `authorize` says no for any of them; 200 with a jittered
    ``retry:`` and ``Retry-After`` when a limit is reached.

    Args:
        broadcaster: the broadcaster to subscribe to; run it with `lifespan`.
        authorize: ``authorize(request, session_id)``, sync or async, called
            for each session with a Starlette `Request`; one False answers 403.
        query_param: the query parameter naming the sessions, repeated.
        flush_window: the longest a burst of events is held so that more of
            them join one write (this stream's own flush; held only while
            events keep coming); 0 never holds a write.

    Raises:
        ValueError: `flush_window` is negative, infinite or NaN.
    """
    return SSEMultiEndpoint(
        broadcaster, authorize=authorize, query_param=query_param, flush_window=flush_window
    )


class EventSourceResponse(Response):
    """A Starlette / FastAPI response streaming Server-Sent Events; return it from a handler.

    ::

        @app.get("/events/{room}", response_class=EventSourceResponse)
        async def events(room: str, user: User = Depends(current_user)) -> EventSourceResponse:
            return EventSourceResponse(broadcaster.subscribe(room))

    `source` and the options are those of `sse_broadcaster.asgi.EventSourceResponse`,
    which this wraps: a `Subscription` or an async iterable of `Event`
    objects, dicts or strings; a `MultiSubscription` (several sessions on
    one stream, see docs/replay.md); per-response ping, send timeout, retry,
    headers and status. ``response_class=EventSourceResponse`` documents the
    route as ``text/event-stream`` in FastAPI's OpenAPI schema. `background`
    runs after the stream ends, as for any Starlette response.

    Raises:
        TypeError, ValueError: as `sse_broadcaster.asgi.EventSourceResponse`.
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
        background: BackgroundTask | None = None,
    ) -> None:
        self._stream = ASGIEventSourceResponse(
            source,
            status_code=status_code,
            headers=headers,
            ping=ping,
            ping_comment=ping_comment,
            send_timeout=send_timeout,
            retry=retry,
            flush_window=flush_window,
        )
        self.status_code = status_code
        self.raw_headers = self._stream.raw_headers
        self.background = background
        self.body = b""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # FastAPI and middlewares may have changed the status or the headers since.
        stream = self._stream
        stream.status_code = self.status_code
        stream.raw_headers = self.raw_headers
        await stream(scope, receive, send)
        if self.background is not None:
            await self.background()


def sse_endpoint(
    broadcaster: EventBroadcaster,
    *,
    authorize: Authorize | None = None,
    path_param: str = "session_id",
    flush_window: float = FLUSH_WINDOW,
) -> SSEEndpoint:
    """An ASGI endpoint streaming the session named by the path parameter.

    Use it as ``Route("/events/{session_id}", sse_endpoint(broadcaster))``. The
    stream resumes from the ``Last-Event-ID`` header (or the ``lastEventId``
    query parameter), opens with ``retry:`` and a ``gap`` event when events may
    have been lost, sends ``: ping`` every ``keepalive_interval`` and drops a
    client whose socket does not take a write within ``send_timeout``. On
    uvicorn (h11 and httptools) such a client's connection is aborted at
    once; a server that does not expose its transport closes it as it does
    for any response left unfinished (see docs/starlette.md).

    Answers: 400 for an invalid session id; 403 when `authorize` says no; 200
    with a jittered ``retry:``, a ``Retry-After`` header and an immediate end
    when a session or subscriber limit is reached or the server is shutting
    down (a browser's EventSource never reconnects after a non-200 answer).

    Args:
        broadcaster: the broadcaster to subscribe to; run it with `lifespan`.
        authorize: ``authorize(request, session_id)``, sync or async, gets a
            Starlette `Request`; False answers 403 before any event is sent.
        path_param: name of the path parameter holding the session id.
        flush_window: the longest a burst of a session's events is held so
            that more of them join one write, held only while events keep
            coming; see `sse_broadcaster._streams.FLUSH_WINDOW` and
            docs/starlette.md. 0 never holds a write.

    Raises:
        ValueError: `flush_window` is negative, infinite or NaN.
    """
    return SSEEndpoint(
        broadcaster, authorize=authorize, path_param=path_param, flush_window=flush_window
    )


def stats_endpoint(broadcaster: EventBroadcaster) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint answering `EventBroadcaster.stats` as JSON."""

    async def stats(request: Request) -> Response:
        return JSONResponse(broadcaster.stats())

    return stats


def metrics_endpoint(broadcaster: EventBroadcaster) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint answering the broadcaster's figures in Prometheus text format.

    Sessions, subscribers, retained events, events published and delivered,
    drops, slow-subscriber disconnects, gaps, replays, expired events, memory,
    and the streams open in this process.
    """

    async def metrics(request: Request) -> Response:
        streams = len(registry_for(broadcaster))
        text = broadcaster._prometheus_text(
            [("sse_broadcaster_open_streams", "gauge", "Open SSE streams.", streams)],
        )
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    return metrics


async def _plain(
    send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def follow_run(
    broadcaster: EventBroadcaster, session_id: str, request: Request, **options: Any
) -> Response:
    """The response to a ``GET`` following the session's run (docs/runs.md).

    ::

        @app.get("/runs/{run_id}/events", response_class=EventSourceResponse)
        async def events(run_id: str, request: Request) -> Response:
            return await follow_run(broadcaster, run_id, request)

    From the request's ``Last-Event-ID`` (or ``lastEventId`` query): exactly
    the rest of the run, then live events, ending after its end marker; the
    whole run without an id; 204 after the end marker (an EventSource stops
    reconnecting); for an expired run a ``gap`` event and an ``end`` event
    saying ``"expired": true``; 404 when the session has had no run; 400 for
    an invalid session id. It never starts a run. `options` are those of
    `EventSourceResponse`.

    Raises:
        BroadcasterError: the broadcaster's backend keeps no runs.
    """
    answer = await answer_run(broadcaster, session_id, scope_last_event_id(request.scope))
    if answer.source is None:
        if answer.status == 204:
            return Response(status_code=204, headers={"Cache-Control": "no-cache"})
        return PlainTextResponse(answer.message, status_code=answer.status)
    if answer.retry is not None:
        options.setdefault("retry", answer.retry)
    response = EventSourceResponse(answer.source, **options)
    response._stream._core.last_event_id = answer.last_event_id
    return response
