"""What the Starlette and aiohttp adapters share: request parsing, wire pieces, metrics.

Nothing here imports a web framework. An adapter turns its request into a
session id, a Last-Event-ID and an ``authorize`` answer, makes a
`Subscription`, then hands it to its framework's ``EventSourceResponse``
(`sse_broadcaster.asgi.EventSourceResponse` underneath, for ASGI).
"""

from __future__ import annotations

import inspect
import json
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import (
    BackendUnavailableError,
    BroadcasterClosedError,
    BroadcasterError,
    SessionLimitError,
    SubscriberLimitError,
)
from ._event import Event, encode_comment
from ._multi import UNKNOWN_POSITION, max_cursor_length
from ._streams import WRITE_CHUNK

if TYPE_CHECKING:
    from ._config import BroadcasterConfig
    from ._multi import MultiSubscription
    from ._subscription import Subscription

__all__ = [
    "COME_BACK_LATER",
    "LastEventId",
    "MAX_LAST_EVENT_ID",
    "METRICS_CONTENT_TYPE",
    "SSE_HEADERS",
    "Authorize",
    "come_back_later",
    "gap_event",
    "is_authorized",
    "missing_extra",
    "multi_cursor_cap",
    "multi_gap_event",
    "multi_prelude",
    "parse_last_event_id",
    "prelude",
    "retry_field",
]

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

#: ``authorize(request, session_id)``: True lets the stream open; may be async.
Authorize = Callable[[Any, str], "bool | Awaitable[bool]"]


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
    """True when what it sent cannot be an id (not UTF-8, too long, control characters): a gap."""


# What cannot be in an id: control characters, and the lone surrogates that
# stand for undecodable bytes (they could not even be encoded back to UTF-8).
_NOT_AN_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def parse_last_event_id(
    header: bytes | str | None, query: str | None, max_length: int = MAX_LAST_EVENT_ID
) -> LastEventId:
    """The resume position from the ``Last-Event-ID`` header, else the ``lastEventId`` query.

    Pass the header's raw bytes: they are read as UTF-8 on every server
    (Starlette would decode latin-1, aiohttp keeps undecodable bytes as lone
    surrogates). The query parameter is for EventSource polyfills that cannot
    set headers. An empty value means none. A value that is not UTF-8, is too
    long or holds control characters is never passed on: the stream replays
    what is retained after a ``gap`` event, as for any unknown id.

    `max_length` is `MAX_LAST_EVENT_ID` for a single session's stream; a
    multi-session stream takes a cursor, up to `multi_cursor_cap` characters.
    """
    undecodable = False
    raw: str | None
    if isinstance(header, bytes):
        try:
            raw = header.decode("utf-8")
        except UnicodeDecodeError:
            raw, undecodable = header.decode("utf-8", "replace"), True
    else:
        raw = header
    if not raw:
        raw = query
    if not raw:
        return LastEventId(None, None, False)
    if undecodable or len(raw) > max_length or _NOT_AN_ID.search(raw):
        requested = _SURROGATES.sub("\ufffd", raw[:max_length])
        return LastEventId(_REJECTED_ID, requested, True)
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
    retry_ms: int | None,
    subscription: Subscription,
    last_event_id: LastEventId,
) -> bytes:
    """What a stream starts with: ``retry:``, the ``gap`` event, then the replay's first chunk."""
    parts: list[bytes] = [retry_field(retry_ms)]
    if subscription.gap or last_event_id.rejected:
        parts.append(gap_event(subscription.session_id, last_event_id, subscription.replayed))
    # The replay's first chunk only: the pump writes the rest in bounded writes.
    parts.extend(event.encode() for event in subscription.drain_nowait(max_bytes=WRITE_CHUNK))
    return b"".join(parts)


def multi_cursor_cap(config: BroadcasterConfig) -> int:
    """The longest Last-Event-ID a multi-session stream takes: a cursor of the most sessions."""
    return max(MAX_LAST_EVENT_ID, max_cursor_length(config.max_sessions_per_subscription))


def multi_gap_event(session_id: str, position: str | None, replayed: int, invalid: bool) -> bytes:
    """The ``gap`` event of one session of a multi-session stream.

    Its data names the session, the position the cursor held for it (null:
    none), and how many of its events were replayed. No ``id:``: the client
    keeps its cursor until the first event.
    """
    payload: dict[str, Any] = {
        "session": session_id,
        "lastEventId": position,
        "replayed": replayed,
    }
    if invalid:
        payload["invalid"] = True
    # ensure_ascii: a session id may hold a lone surrogate, which UTF-8 cannot carry.
    data = json.dumps(payload, separators=(",", ":"))
    return Event(id="", session_id=session_id, data=data, event="gap").encode()


def multi_prelude(
    retry_ms: int | None, multi: MultiSubscription, last_event_id: LastEventId | None
) -> list[bytes]:
    """What a multi-session stream starts with, bar the replay: ``retry:``, a ``gap`` per session.

    Every session is a gap when the client's Last-Event-ID could not be a cursor.
    """
    parts: list[bytes] = [retry_field(retry_ms)]
    invalid = last_event_id is not None and last_event_id.rejected
    for sub in multi._subs:
        if sub.gap or invalid:
            position = sub.last_event_id
            if position == UNKNOWN_POSITION or invalid:
                position = None
            parts.append(multi_gap_event(sub.session_id, position, sub.replayed, invalid))
    return parts


def retry_field(retry_ms: int | None) -> bytes:
    """The ``retry:`` line a stream opens with (nothing for None)."""
    return b"" if retry_ms is None else b"retry: %d\n\n" % retry_ms


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
