"""The demo app on a real uvicorn server, for tests/test_demo.py and tests/test_browser.py."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from httpx_sse import EventSource, ServerSentEvent

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.demo import create_app

from .servers import run_uvicorn


@asynccontextmanager
async def serve_demo(config: BroadcasterConfig, **app_kwargs: Any) -> AsyncIterator[str]:
    """Serve ``create_app(EventBroadcaster(config), **app_kwargs)`` in this event loop.

    Yields the base URL. A backstop graceful-shutdown timeout keeps a stream
    left open by a failing test from hanging the teardown.
    """
    app = create_app(EventBroadcaster(config), **app_kwargs)
    async with run_uvicorn(app, timeout_graceful_shutdown=5) as server:
        yield str(server.base_url)


@asynccontextmanager
async def sse_events(source: EventSource) -> AsyncIterator[AsyncGenerator[ServerSentEvent, None]]:
    """The stream's events, without the retry-only message httpx-sse yields for ``retry:``.

    Both generators are closed on exit, so a test may stop reading early without
    leaving an unfinished async generator to the garbage collector.
    """
    async with aclosing(source.aiter_sse()) as raw:

        async def events() -> AsyncGenerator[ServerSentEvent, None]:
            async for sse in raw:
                if sse.data or sse.id or sse.event != "message":
                    yield sse

        async with aclosing(events()) as filtered:
            yield filtered
