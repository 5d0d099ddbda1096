"""Three sessions on ONE EventSource in a real headless Chromium (Debian's package).

A test-only page follows three sessions on one stream and keeps every
(session, data) it is given, and the last event id, in sessionStorage, so
that they survive a reload. The test publishes to the three sessions while
the server drops the stream (the browser's own EventSource reconnects with
``Last-Event-ID``) and while the page reloads (a new EventSource: browsers
never resend an id across a page load, so the page passes its stored cursor
as the ``lastEventId`` query parameter). Every event of every session must be
on the page exactly once, in publish order per session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.starlette import lifespan, sse_multi_endpoint

from .support.browser import wait_for_js
from .support.servers import run_aiohttp, run_uvicorn

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

SESSIONS = ("alpha", "beta", "gamma")

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>three sessions, one EventSource</title></head>
<body><ul id="feed"></ul>
<script>
const KEY = "multi-test";
const state = JSON.parse(sessionStorage.getItem(KEY) ||
  '{"items": [], "cursor": "", "loads": 0, "gaps": []}');
state.loads += 1;
const save = () => sessionStorage.setItem(KEY, JSON.stringify(state));
save();
const sessions = ["alpha", "beta", "gamma"];
let url = "/events?" + sessions.map(s => "session=" + encodeURIComponent(s)).join("&");
// A new EventSource (this page load) sends no Last-Event-ID: pass the stored cursor.
if (state.cursor) url += "&lastEventId=" + encodeURIComponent(state.cursor);
const source = new EventSource(url);
window.live = {opens: 0, errors: 0, source};
source.addEventListener("open", () => { window.live.opens += 1; });
source.addEventListener("error", () => { window.live.errors += 1; });
source.addEventListener("message", (e) => {
  const {session, data} = JSON.parse(e.data);
  state.items.push([session, data, e.lastEventId]);
  state.cursor = e.lastEventId;
  save();
});
source.addEventListener("gap", (e) => { state.gaps.push(JSON.parse(e.data)); save(); });
window.state = () => state;
</script></body></html>
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Playwright's async API runs on asyncio only


class Recorded:
    """The multi endpoint (ASGI), noting the resume position each stream request carried."""

    def __init__(self, broadcaster: EventBroadcaster) -> None:
        self.endpoint = sse_multi_endpoint(broadcaster)
        self.requests: list[dict[str, str | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        header = dict(scope["headers"]).get(b"last-event-id")
        query = parse_qs(scope["query_string"].decode()).get("lastEventId", [None])[0]
        self.requests.append(
            {"header": header.decode() if header is not None else None, "query": query}
        )
        await self.endpoint(scope, receive, send)


@asynccontextmanager
async def serve(
    adapter: str, broadcaster: EventBroadcaster
) -> AsyncIterator[tuple[str, list[dict[str, str | None]]]]:
    """The page at ``/`` and the multi-session stream at ``/events``."""
    if adapter == "starlette":
        recorded = Recorded(broadcaster)

        async def page(request: Request) -> HTMLResponse:
            return HTMLResponse(PAGE)

        app = Starlette(
            routes=[Route("/", page), Route("/events", recorded)],
            lifespan=lifespan(broadcaster),
        )
        async with run_uvicorn(app) as running:
            yield running.base_url, recorded.requests
        return
    from aiohttp import web

    from sse_broadcaster.aiohttp import setup, sse_multi_handler

    requests: list[dict[str, str | None]] = []
    handler = sse_multi_handler(broadcaster)

    async def events(request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Last-Event-ID")
        requests.append({"header": header, "query": request.query.get("lastEventId")})
        return await handler(request)

    async def html(request: web.Request) -> web.StreamResponse:
        return web.Response(text=PAGE, content_type="text/html")

    aiohttp_app = web.Application()
    aiohttp_app.router.add_get("/", html)
    aiohttp_app.router.add_get("/events", events)
    setup(aiohttp_app, broadcaster)
    async with run_aiohttp(aiohttp_app) as running:
        yield running.base_url, requests


class Publisher:
    """Publishes to the three sessions in turn and remembers what it published."""

    def __init__(self, broadcaster: EventBroadcaster) -> None:
        self.broadcaster = broadcaster
        self.published: list[tuple[str, str]] = []

    async def publish(self, rounds: int, pause: float = 0.0) -> None:
        for _ in range(rounds):
            for session in SESSIONS:
                data = f"{session}#{sum(1 for s, _ in self.published if s == session)}"
                await self.broadcaster.publish(session, data)
                self.published.append((session, data))
                if pause:
                    await anyio.sleep(pause)


def check_exactly_once(received: list[list[str]], published: list[tuple[str, str]]) -> None:
    got = [(session, data) for session, data, _ in received]
    duplicates = len(got) - len(set(got))
    missing = sorted(set(published) - set(got))
    assert duplicates == 0, f"{duplicates} duplicates in {got}"
    assert missing == [], f"holes: {missing}"
    assert len(got) == len(published)
    for session in SESSIONS:
        mine = [data for s, data in got if s == session]
        assert mine == [data for s, data in published if s == session], session


@pytest.mark.parametrize("adapter", ["starlette", "aiohttp"])
async def test_three_sessions_on_one_event_source_resume_exactly(
    browser: Any, adapter: str
) -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig(retry_ms=250, keepalive_interval=5.0))
    publisher = Publisher(broadcaster)
    async with serve(adapter, broadcaster) as (url, requests):
        page = await browser.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        await page.goto(url + "/")
        await wait_for_js(page, "window.live.opens >= 1")

        # 1. Live: five rounds over the three sessions.
        await publisher.publish(5, pause=0.005)
        await wait_for_js(page, f"window.state().items.length >= {len(publisher.published)}")

        # 2. The server ends the stream (one session's subscribers are dropped,
        # which ends the multi-stream); the browser reconnects by itself with
        # Last-Event-ID while more is published.
        assert broadcaster.disconnect_subscribers("beta") == 1
        await wait_for_js(page, "window.live.errors >= 1")  # the stream ended: away
        cursor_before_drop = await page.evaluate("window.state().cursor")
        await publisher.publish(3)  # within retry_ms: replayed on the reconnect
        await wait_for_js(page, "window.live.opens >= 2")
        await wait_for_js(page, f"window.state().items.length >= {len(publisher.published)}")
        reconnect = requests[1]
        assert reconnect["header"] is not None, requests
        assert reconnect["header"].startswith("m1.")
        # The id of the last event the page had dispatched, as it was sent.
        assert reconnect["header"] == cursor_before_drop

        # 3. The page reloads in the middle of a stream of publishes.
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(publisher.publish, 20, 0.01)
            await wait_for_js(
                page, f"window.state().items.length >= {len(publisher.published) + 6}"
            )
            stored_before = await page.evaluate("window.state().items.length")
            await page.reload()
            await wait_for_js(page, "window.state().loads === 2")
        await wait_for_js(page, f"window.state().items.length >= {len(publisher.published)}")
        await anyio.sleep(0.5)  # room for a duplicate to show up, were there one
        state = await page.evaluate("window.state()")
        await page.close()
        stats = broadcaster.stats()

    check_exactly_once(state["items"], publisher.published)
    assert state["gaps"] == []
    assert state["loads"] == 2
    assert stored_before < len(publisher.published), "the reload was not mid-stream"
    # The reloaded page resumed from the cursor it had stored: an id the server sent.
    reloaded = requests[-1]
    assert reloaded["header"] is None  # a new EventSource has no id to send
    sent_ids = {last_event_id for _, _, last_event_id in state["items"]}
    assert reloaded["query"] in sent_ids
    assert len(requests) == 3, requests
    # Both resumes replayed each of the three sessions, with no gap; the three
    # rounds published within retry_ms of the drop came back by replay.
    assert stats["replays"] == 6
    assert stats["gaps"] == 0
    assert stats["replayedEvents"] >= 9
    assert page_errors == []
    print(
        f"\nChromium on {adapter}, one EventSource over {len(SESSIONS)} sessions: "
        f"{len(state['items'])} events, 1 server drop, 1 reload, 0 holes, 0 duplicates"
    )
