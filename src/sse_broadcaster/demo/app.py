"""The demo application: one page, a room's live stream, a publish route and stats.

`create_app` builds a Starlette app on the public adapter
(`sse_broadcaster.starlette`), so the demo runs exactly the code users run.
Anything a client sends to ``/publish`` is checked here, so a bad body gets a
4xx naming the problem, never a 500; and state-changing requests from another
origin are refused, so a page elsewhere cannot publish or end streams through
a visitor's browser (issue #10).
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import (
    BroadcasterConfig,
    BroadcasterError,
    EventBroadcaster,
    EventTooLargeError,
    SessionLimitError,
    check_session_id,
)
from ..starlette import lifespan, metrics_endpoint, sse_endpoint, stats_endpoint
from .agent import DEFAULT_PACING, DEFAULT_RUN, DEFAULT_RUN_TOKENS, run_routes

__all__ = ["DEFAULT_ROOM", "create_app", "demo_config"]

logger = logging.getLogger("sse_broadcaster.demo")

DEFAULT_ROOM = "lobby"
"""The room the page opens and the ticker publishes into."""

_STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "run.js": "text/javascript; charset=utf-8",
    "run.css": "text/css; charset=utf-8",
}
_FORM = "application/x-www-form-urlencoded"
_PUBLISH_FIELDS = frozenset({"data", "event"})

MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects a ``/publish`` JSON body may have."""
MAX_INT_DIGITS = 4300
"""The longest integer in a ``/publish`` JSON body: Python's default int/str limit."""

# For counting a JSON text's nesting: escapes (an escaped quote must not end a
# string), then everything but brackets, are dropped; both kinds count alike.
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ONE_KIND = str.maketrans("{}", "[]")
_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SAME_ORIGIN_ONLY = (
    "the demo takes state-changing requests only from its own pages, "
    "or from clients that send no Origin (curl)"
)


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
    pages = ("index.html", "run.html", *_STATIC_TYPES)
    return {name: static.joinpath(name).read_bytes() for name in pages}


class _BadRequest(Exception):
    """A publish request the demo refuses: answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _shown(value: Any, limit: int = 80) -> str:
    """`value`'s repr, cut short: error messages echo what a client sent, not all of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


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
        if not (declared.isascii() and declared.isdigit()):
            raise _BadRequest(400, f"invalid Content-Length header: {_shown(declared)}")
        # Checked by length first: int() of thousands of digits is slow, then refused.
        if len(declared) > 18 or int(declared) > limit:
            raise _BadRequest(413, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _BadRequest(413, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_nesting(text: str) -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH` before parsing it.

    ``json.loads`` recurses once per level and raises RecursionError on deep
    input well under the body limit; catching that leaves no room to recover
    reliably, so the depth is counted first. Each pass deletes the innermost
    pairs of brackets, so the passes needed are the depth: at most
    MAX_JSON_DEPTH + 1 string operations, all in C. Malformed text is left to
    the parser to name.
    """
    outside_strings = "".join(_ESCAPE.sub("", text).split('"')[::2])
    brackets = _NOT_BRACKET.sub("", outside_strings).translate(_ONE_KIND)
    for _ in range(MAX_JSON_DEPTH):
        inner_removed = brackets.replace("[]", "")
        if len(inner_removed) == len(brackets):
            return
        brackets = inner_removed
    if "[]" in brackets:
        raise _BadRequest(400, f"JSON body nests deeper than {MAX_JSON_DEPTH} levels")


def _int_digits_limit() -> int:
    # Python refuses longer ones itself (CVE-2020-10735), with advice meant for
    # the server's operator; a lower limit set on the interpreter wins.
    return min(MAX_INT_DIGITS, sys.get_int_max_str_digits() or MAX_INT_DIGITS)


def _has_long_digit_run(text: str, limit: int) -> bool:
    # The lookbehind starts a match only where a run of digits starts, so the
    # search stays linear however many long runs the text has.
    return re.search(f"(?<![0-9])[0-9]{{{limit + 1}}}", text) is not None


def _json_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    limit = _int_digits_limit()
    if digits > limit:
        raise _BadRequest(
            400, f"JSON body has an integer of {digits} digits: at most {limit} are accepted"
        )
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadRequest(400, f"JSON body has a number out of range: {_shown(text)}")
    return value


def _json_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259), and browsers' JSON.parse refuses them.
    raise _BadRequest(400, f"JSON body has {name}, which is not JSON: send a number or a string")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys: the other would be lost silently.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _BadRequest(400, f"JSON body has the key {_shown(key)} twice in one object")
            seen.add(key)
    return obj


def _parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRequest(400, f"JSON body is not valid UTF-8: {exc}") from None
    # RFC 8259 lets a parser ignore a byte order mark; json.loads refuses one.
    text = text.removeprefix("\ufeff")
    _check_nesting(text)
    try:
        parsed = json.loads(
            text,
            # The checking hook is slower than int(), so it runs only when a
            # run of digits (in a string or not) is long enough to matter.
            parse_int=_json_int if _has_long_digit_run(text, _int_digits_limit()) else None,
            parse_float=_json_float,
            parse_constant=_json_constant,
            object_pairs_hook=_json_object,
        )
    except json.JSONDecodeError as exc:
        raise _BadRequest(400, f"malformed JSON body: {exc}") from None
    if not isinstance(parsed, dict):
        raise _BadRequest(
            400,
            'JSON body must be an object like {"data": ...}, '
            f"got {_JSON_TYPES.get(type(parsed), type(parsed).__name__)}",
        )
    return parsed


def _parse_form(body: bytes) -> Mapping[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise _BadRequest(400, "form body is not valid UTF-8") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _BadRequest(400, f"form field {_shown(name)} given more than once")
            seen.add(name)
    return fields


def _parse_publish(content_type: str, body: bytes) -> tuple[Any, str | None]:
    """``(data, event)`` from a JSON object or from form fields."""
    media_type, *params = (part.strip() for part in content_type.split(";"))
    media_type = media_type.lower()
    for param in params:
        name, _, value = param.partition("=")
        charset = value.strip().strip('"')
        if name.strip().lower() == "charset" and charset.lower() not in ("utf-8", "utf8"):
            raise _BadRequest(415, f"charset {_shown(charset)} is not supported: send UTF-8")
    fields: Mapping[str, Any]
    if media_type == "application/json" or media_type.endswith("+json"):
        fields = _parse_json(body)
    elif media_type == _FORM:
        fields = _parse_form(body)
    else:
        shown = media_type or "no Content-Type"
        raise _BadRequest(
            415, f"unsupported content type {_shown(shown)}: send application/json or {_FORM}"
        )
    unknown = sorted(set(fields) - _PUBLISH_FIELDS)
    if unknown:
        names = ", ".join(map(_shown, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise _BadRequest(400, f"unknown field(s) {names}: use data, event")
    if "data" not in fields:
        raise _BadRequest(400, "missing field 'data'")
    event = fields.get("event")
    if event == "":
        event = None
    if event is not None and not isinstance(event, str):
        raise _BadRequest(400, f"field 'event' must be a string or null, got {_shown(event)}")
    if event is not None:
        try:
            event.encode("utf-8")
        except UnicodeEncodeError:
            # A JSON escape such as "\ud800" decodes to half a character.
            raise _BadRequest(
                400, f"field 'event' is not valid Unicode (a lone surrogate): {_shown(event)}"
            ) from None
    return fields["data"], event


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of an http(s) origin or URL; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port out of range, a malformed IPv6 address
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port


def _same_origin(url: str, host_header: str) -> bool:
    """Whether `url` (an Origin or a Referer) names the server the Host header names.

    The scheme is not compared: behind a TLS proxy the app sees http while the
    browser's origin is https. The port is, with the scheme's default when the
    Host header has none.
    """
    origin = _origin(url)
    host = _origin(f"{origin[0]}://{host_header}") if origin is not None else None
    if origin is None or host is None:
        return False
    scheme, hostname, port = origin
    default = _DEFAULT_PORTS[scheme]
    return (hostname, port or default) == (host[1], host[2] or default)


def _cross_origin(method: str, headers: Headers) -> str | None:
    """Why a state-changing request comes from another origin, or None if it does not.

    Browsers send Origin with every cross-origin POST (a form on another site
    included), Referer on most, and Sec-Fetch-Site lately: any of them naming
    another origin refuses the request. A request with none of them is not
    from a page (curl, a script) and is served.
    """
    refused = f"cross-origin {method} refused"
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in ("same-origin", "none"):
        return f"{refused}: Sec-Fetch-Site is {_shown(site)}; {_SAME_ORIGIN_ONLY}"
    host = headers.get("host")
    for name in ("origin", "referer"):
        values = headers.getlist(name)
        if not values:
            continue
        for value in values:
            shown = f"{name.title()} {_shown(value)}"
            if host is None:
                return f"{refused}: {shown} and no Host header to compare it with"
            if not _same_origin(value, host):
                mismatch = f"{shown} is not this server's (Host: {_shown(host)})"
                return f"{refused}: {mismatch}; {_SAME_ORIGIN_ONLY}"
        return None  # Referer is looked at only when Origin is absent
    return None


class _SameOriginOnly:
    """ASGI middleware: 403 for a state-changing request from another origin.

    The demo has no credentials, so without this a page on any site could
    make a visitor's browser publish or end streams with a plain form post,
    which needs no CORS preflight (issue #10).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            refusal = _cross_origin(scope["method"], Headers(scope=scope))
            if refusal is not None:
                await _error(403, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    broadcaster: EventBroadcaster | None = None,
    *,
    ticker_interval: float | None = 1.0,
    room: str = DEFAULT_ROOM,
    admin: bool = True,
    max_body_bytes: int | None = None,
    run_tokens: int = DEFAULT_RUN_TOKENS,
    run_pacing: tuple[float, float] = DEFAULT_PACING,
) -> Starlette:
    """The demo app: pages, stream, publish, stats, metrics, a ticker and agent runs.

    Args:
        broadcaster: the broadcaster to serve; by default a new in-memory one
            with `demo_config`. The app's lifespan enters and closes it, so a
            broadcaster serves one app run.
        ticker_interval: seconds between the ticker's events in `room`
            (None: no ticker).
        room: the room the page opens by default and the ticker publishes into.
        admin: add the ``/admin/...`` routes that end a room's streams (for
            demonstrations and the browser test; keep them off when exposed:
            the command line turns them off off loopback).
        max_body_bytes: the largest ``/publish`` body; twice the broadcaster's
            ``max_event_bytes`` by default.
        run_tokens: tokens of each simulated answer of the ``/run`` page.
        run_pacing: seconds between two of its tokens, drawn in this range.

    Raises:
        ValueError: `room` is not a valid session id, `ticker_interval` is not
            > 0, `max_body_bytes` is not >= 1, `run_tokens` is not in
            1..10000, or `run_pacing` is not ``(low, high)`` with 0 <= low <= high <= 10.
    """
    check_session_id(room)
    if ticker_interval is not None and not ticker_interval > 0:
        raise ValueError(f"ticker_interval must be > 0 or None, got {ticker_interval!r}")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1 or None, got {max_body_bytes!r}")
    if (
        isinstance(run_tokens, bool)
        or not isinstance(run_tokens, int)
        or not 1 <= run_tokens <= 10000
    ):
        raise ValueError(f"run_tokens must be an int in 1..10000, got {run_tokens!r}")
    low, high = run_pacing
    if not 0 <= low <= high <= 10:
        raise ValueError(
            f"run_pacing must be (low, high) with 0 <= low <= high <= 10, got {run_pacing!r}"
        )
    bcast = broadcaster if broadcaster is not None else EventBroadcaster(demo_config())
    body_limit = max_body_bytes or 2 * bcast.config.max_event_bytes
    static = _load_static()
    page = static["index.html"].replace(b"__DEFAULT_ROOM__", html.escape(room).encode())

    async def index(request: Request) -> Response:
        return Response(
            page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
        )

    run_page = static["run.html"].replace(b"__DEFAULT_RUN__", DEFAULT_RUN.encode())

    async def agent_page(request: Request) -> Response:
        return Response(
            run_page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
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
        Route("/run", agent_page, methods=["GET"]),
        *run_routes(bcast, tokens=run_tokens, pacing=(low, high)),
    ]
    if admin:
        routes += [
            Route("/admin/drop-streams/{room}", drop_streams, methods=["POST"]),
            Route("/admin/close/{room}", close_room, methods=["POST"]),
        ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SameOriginOnly)],
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
