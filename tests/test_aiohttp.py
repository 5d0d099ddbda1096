"""What only the aiohttp adapter does: `setup` and the app's life cycle.

The behaviour it shares with the Starlette adapter is tested against aiohttp's
own server in tests/test_adapters.py.
"""

from __future__ import annotations

import anyio
import pytest
from aiohttp import web

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster._streams import registry_for
from sse_broadcaster.aiohttp import open_streams, setup, sse_handler

from .support.servers import free_socket, open_raw

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiohttp runs on asyncio only


def running(broadcaster: EventBroadcaster) -> bool:
    return broadcaster.running


def make_app(broadcaster: EventBroadcaster) -> web.Application:
    app = web.Application()
    app.router.add_get("/events/{session_id}", sse_handler(broadcaster))
    setup(app, broadcaster)
    return app


async def test_setup_runs_the_broadcaster_with_the_app_across_tasks() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig())
    runner = web.AppRunner(make_app(broadcaster), handle_signals=False)
    sock = free_socket()
    try:
        await runner.setup()  # startup in this task...
        assert running(broadcaster)
        site = web.SockSite(runner, sock)
        await site.start()
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with open_raw(base_url, "/events/room") as raw:
            assert await raw.read_chunk() == b"retry: 3000\n\n"
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.cleanup)  # ...cleanup in another
                with anyio.fail_after(5):
                    assert await raw.read_body() == b""  # the stream ended cleanly
    finally:
        sock.close()
    assert not running(broadcaster)
    assert registry_for(broadcaster).closing
    assert open_streams(broadcaster) == 0


async def test_setup_fails_when_the_broadcaster_cannot_start() -> None:
    broadcaster = EventBroadcaster(BroadcasterConfig())
    async with broadcaster:
        pass  # entered once already: it cannot be entered again
    runner = web.AppRunner(make_app(broadcaster), handle_signals=False)
    with pytest.raises(RuntimeError, match="entered only once"):
        await runner.setup()
    await runner.cleanup()


def test_handler_arguments() -> None:
    with pytest.raises(ValueError, match=r"flush_window must be a finite number >= 0, got -0\.5"):
        sse_handler(EventBroadcaster(), flush_window=-0.5)
