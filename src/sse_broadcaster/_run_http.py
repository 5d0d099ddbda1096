"""Following a resumable run over HTTP (#13): what a reconnect is answered.

`answer_run` reads the session's run (`EventBroadcaster.run_info`) and the
client's ``Last-Event-ID`` and decides, framework-neutrally:

- no run on the session: **404** (nothing to follow; an EventSource stops);
- the id is the run's end marker: **204**, so that an EventSource stops
  reconnecting;
- the run expired (``retained`` False): **200** with a ``gap`` event and an
  ``end`` event (``"expired": true``, carrying the end marker's id), then the
  end of the stream: the browser comes back once with that id and gets 204;
- otherwise **200** following the run with ``subscribe(..., until_end=True)``:
  exactly the rest after the id (the whole run without one; after a ``gap``
  event for an id the session no longer holds), live events, the end marker,
  then the end of the stream.

Nothing here starts a run. The adapters (`sse_broadcaster.asgi.follow_run`,
`.starlette.follow_run`, `.aiohttp.follow_run`) turn the answer into their
framework's response. Nothing here imports a web framework.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ._adapter import COME_BACK_LATER, LastEventId, parse_last_event_id
from ._run_state import RUN_END_EVENT, RunInfo
from ._sources import EventItem

if TYPE_CHECKING:
    from ._broadcaster import EventBroadcaster
    from ._response import ResponseSource

__all__ = ["PlainResponse", "RunAnswer", "answer_run", "expired_items", "scope_last_event_id"]

NO_RUN = "no run on this session"
_NO_ID = LastEventId(None, None, False)


@dataclass(frozen=True, slots=True)
class RunAnswer:
    """What `answer_run` decided: a status, and for 200 the source to stream."""

    status: int
    """200 (stream `source`), 204 (the run ended), 400 (bad session id), 404 (no run)."""
    message: str = ""
    """The text of a 400 / 404 answer."""
    source: ResponseSource | None = None
    last_event_id: LastEventId = _NO_ID
    retry: int | None = None
    """The ``retry:`` of an expired run's answer (a subscription takes the broadcaster's)."""


def scope_last_event_id(scope: MutableMapping[str, Any]) -> LastEventId:
    """The client's resume position in an ASGI scope: the header, else ``lastEventId``."""
    header: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name == b"last-event-id":
            header = value
            break
    query: str | None = None
    if not header and scope.get("query_string"):
        for key, value in parse_qsl(scope["query_string"].decode("latin-1")):
            if key == "lastEventId":
                query = value
                break
    return parse_last_event_id(header, query)


async def expired_items(info: RunInfo, last_event_id: LastEventId) -> AsyncIterator[EventItem]:
    """The answer to a reader of a run whose transcript was swept: ``gap``, then ``end``.

    The ``end`` event carries the end marker's id, so that a browser's
    EventSource reconnects once with it and is answered 204.
    """
    gap: dict[str, Any] = {"lastEventId": last_event_id.requested, "replayed": 0, "expired": True}
    if last_event_id.rejected:
        gap["invalid"] = True
    yield {"event": "gap", "data": json.dumps(gap, separators=(",", ":"), ensure_ascii=False)}
    end = {"state": info.state.value, "runId": info.run_id, "events": info.events, "expired": True}
    item: dict[str, str] = {
        "event": RUN_END_EVENT,
        "data": json.dumps(end, separators=(",", ":")),
    }
    if info.end_event_id is not None:
        item["id"] = info.end_event_id
    yield item


async def answer_run(
    broadcaster: EventBroadcaster, session_id: str, last_event_id: LastEventId
) -> RunAnswer:
    """How to answer a ``GET`` following the session's run (see the module docstring).

    Raises:
        BroadcasterError: the broadcaster's backend keeps no runs.
    """
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str, got {session_id!r}")
    try:
        info = await broadcaster.run_info(session_id)
    except ValueError as exc:
        return RunAnswer(400, f"invalid session id: {exc}")
    except COME_BACK_LATER:
        # Closing, or the backend is unreachable: entering the subscription
        # fails the same way, and the response answers "come back later".
        return RunAnswer(
            200,
            source=broadcaster.subscribe(
                session_id, last_event_id=last_event_id.value, until_end=True
            ),
            last_event_id=last_event_id,
        )
    if info is None:
        return RunAnswer(404, f"{NO_RUN}: {session_id!r}")
    if info.is_end(last_event_id.value):
        return RunAnswer(204)
    if not info.retained:
        return RunAnswer(
            200,
            source=expired_items(info, last_event_id),
            last_event_id=last_event_id,
            retry=broadcaster.config.retry_ms,
        )
    subscription = broadcaster.subscribe(
        session_id, last_event_id=last_event_id.value, until_end=True
    )
    return RunAnswer(200, source=subscription, last_event_id=last_event_id)


class PlainResponse:
    """A small ASGI response: `status` with a text body (none for 204)."""

    __slots__ = ("status", "text")

    def __init__(self, status: int, text: str = "") -> None:
        self.status = status
        self.text = text

    def __repr__(self) -> str:
        return f"<PlainResponse status={self.status}>"

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        body = b"" if self.status == 204 else self.text.encode()
        headers = [(b"cache-control", b"no-cache")]
        if self.status != 204:
            headers += [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"%d" % len(body)),
            ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if scope.get("method") == "HEAD":
            body = b""
        await send({"type": "http.response.body", "body": body})
