"""The demo application: one page, a room's live stream, a publish route and stats.

`create_app` builds a Starlette app on the public adapter
(`sse_broadcaster.starlette`), so the demo runs exactly the code users run.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qsl

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import (
    BroadcasterConfig,
    BroadcasterError,
    EventBroadcaster,
    EventTooLargeError,
    SessionLimitError,
    check_session_id,
)
from ..starlette import lifespan, metrics_endpoint, sse_endpoint, stats_endpoint

__all__ = ["DEFAULT_ROOM", "create_app", "demo_config"]

logger = logging.getLogger("sse_broadcaster.demo")

DEFAULT_ROOM = "lobby"
"""The room the page opens and the ticker publishes into."""

_STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_FORM = "application/x-www-form-urlencoded"
_PUBLISH_FIELDS = frozenset({"data", "event"})


def demo_config() -> BroadcasterConfig:
    """The demo's configuration: the production defaults with a quicker reconnect.

    A one-second ``retry:`` makes the page come back promptly after the admin
    routes end its stream; everything else is what users get by default.
    """
    return BroadcasterConfig(retry_ms=1000)


def _load_static() -> dict[str, bytes]:
    # Read once at start-up through importlib.resources, so the page is found
    # wherever the package is installed (a wheel, an editable install, a zip).
    static = files("sse_broadcaster.demo").joinpath("static")
    return {name: static.joinpath(name).read_bytes() for name in ("index.html", *_STATIC_TYPES)}


class _BadRequest(Exception):
    """A publish request the demo refuses: answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _room(request: Request) -> str:
    room: str = request.path_params["room"]
    try:
        check_session_id(room)
    except ValueError as exc:
        raise _BadRequest(400, f"invalid room id: {exc}") from None
    return room


def _answers_bad_requests(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except _BadRequest as exc:
            return _error(exc.status, exc.message)

    return wrapper


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _BadRequest(400, f"invalid Content-Length header: {declared!r}")
        if int(declared) > limit:
            raise _BadRequest(413, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_publish(content_type: str, body: bytes) -> tuple[Any, str | None]:
    """``(data, event)`` from a JSON object or from form fields."""
    media_type = content_type.partition(";")[0].strip().lower()
    fields: Mapping[str, Any]
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _BadRequest(400, f"malformed JSON body: {exc}") from None
        if not isinstance(parsed, dict):
            raise _BadRequest(
                400,
                f'JSON body must be an object like {{"data": ...}}, got {type(parsed).__name__}',
            )
        fields = parsed
    elif media_type == _FORM:
        try:
            fields = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
        except UnicodeDecodeError:
            raise _BadRequest(400, "form body is not valid UTF-8") from None
    else:
        shown = media_type or "no Content-Type"
        raise _BadRequest(
            415, f"unsupported content type {shown!r}: send application/json or {_FORM}"
        )
    unknown = sorted(set(fields) - _PUBLISH_FIELDS)
    if unknown:
        raise _BadRequest(400, f"unknown field(s) {', '.join(map(repr, unknown))}: use data, event")
    if "data" not in fields:
        raise _BadRequest(400, "missing field 'data'")
    event = fields.get("event")
    if event == "":
        event = None
    if event is not None and not isinstance(event, str):
        raise _BadRequest(400, f"field 'event' must be a string or null, got {event!r}")
    return fields["data"], event


def create_app(
    broadcaster: EventBroadcaster | None = None,
    *,
    ticker_interval: float | None = 1.0,
    room: str = DEFAULT_ROOM,
    admin: bool = True,
    max_body_bytes: int | None = None,
) -> Starlette:
    """The demo app: page, stream, publish, stats, metrics and a ticker.

    Args:
        broadcaster: the broadcaster to serve; by default a new in-memory one
            with `demo_config`. The app's lifespan enters and closes it, so a
            broadcaster serves one app run.
        ticker_interval: seconds between the ticker's events in `room`
            (None: no ticker).
        room: the room the page opens by default and the ticker publishes into.
        admin: add the ``/admin/...`` routes that end a room's streams (for
            demonstrations and the browser test; keep them off when exposed).
        max_body_bytes: the largest ``/publish`` body; twice the broadcaster's
            ``max_event_bytes`` by default.

    Raises:
        ValueError: `room` is not a valid session id, `ticker_interval` is not
            > 0, or `max_body_bytes` is not >= 1.
    """
    check_session_id(room)
    if ticker_interval is not None and not ticker_interval > 0:
        raise ValueError(f"ticker_interval must be > 0 or None, got {ticker_interval!r}")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1 or None, got {max_body_bytes!r}")
    bcast = broadcaster if broadcaster is not None else EventBroadcaster(demo_config())
    body_limit = max_body_bytes or 2 * bcast.config.max_event_bytes
    static = _load_static()
    page = static["index.html"].replace(b"__DEFAULT_ROOM__", html.escape(room).encode())

    async def index(request: Request) -> Response:
        return Response(
            page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        media_type = _STATIC_TYPES.get(name)
        if media_type is None:
            return _error(404, f"no static file {name!r}")
        return Response(static[name], media_type=media_type, headers={"Cache-Control": "no-cache"})

    @_answers_bad_requests
    async def publish(request: Request) -> Response:
        target = _room(request)
        body = await _read_body(request, body_limit)
        data, event = _parse_publish(request.headers.get("content-type", ""), body)
        try:
            published = await bcast.publish(target, data, event=event)
        except EventTooLargeError as exc:
            return _error(413, str(exc))
        except SessionLimitError as exc:
            return _error(429, str(exc))
        except (ValueError, TypeError) as exc:  # an event name with a line break, and the like
            return _error(400, str(exc))
        except BroadcasterError as exc:
            return _error(503, str(exc))
        return JSONResponse({"id": published.id})

    @_answers_bad_requests
    async def drop_streams(request: Request) -> Response:
        # Ends the room's open streams but keeps its history: browsers reconnect
        # with Last-Event-ID and replay what they missed, with no gap.
        target = _room(request)
        had_streams = bcast.disconnect_subscribers(target) > 0
        return JSONResponse({"room": target, "streamsEnded": had_streams})

    @_answers_bad_requests
    async def close_room(request: Request) -> Response:
        # Ends the streams and drops the history: reconnecting browsers get a
        # `gap` event, since the ids they hold no longer exist.
        target = _room(request)
        existed = await bcast.close_session(target)
        return JSONResponse({"room": target, "existed": existed})

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
        Route("/events/{session_id}", sse_endpoint(bcast), methods=["GET"]),
        Route("/publish/{room}", publish, methods=["POST"]),
        Route("/stats", stats_endpoint(bcast), methods=["GET"]),
        Route("/metrics", metrics_endpoint(bcast), methods=["GET"]),
    ]
    if admin:
        routes += [
            Route("/admin/drop-streams/{room}", drop_streams, methods=["POST"]),
            Route("/admin/close/{room}", close_room, methods=["POST"]),
        ]
    return Starlette(
        routes=routes,
        lifespan=_demo_lifespan(bcast, lifespan(bcast), room, ticker_interval),
    )


def _demo_lifespan(
    broadcaster: EventBroadcaster,
    adapter_lifespan: Callable[[Any], AbstractAsyncContextManager[Any]],
    room: str,
    ticker_interval: float | None,
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def demo_lifespan(app: Starlette) -> AsyncIterator[None]:
        async with adapter_lifespan(app), anyio.create_task_group() as task_group:
            if ticker_interval is not None:
                task_group.start_soon(_ticker, broadcaster, room, ticker_interval)
            try:
                yield
            finally:
                task_group.cancel_scope.cancel()

    return demo_lifespan


async def _ticker(broadcaster: EventBroadcaster, room: str, interval: float) -> None:
    """Publish a ``tick`` event into `room` every `interval` seconds."""
    count = 0
    while True:
        await anyio.sleep(interval)
        count += 1
        try:
            await broadcaster.publish(room, {"tick": count, "time": time.time()}, event="tick")
        except BroadcasterError as exc:
            logger.warning("ticker could not publish into %r: %s", room, exc)
