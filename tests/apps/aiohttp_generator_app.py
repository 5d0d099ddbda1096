"""An aiohttp app streaming a request's own generator, run as ``web.run_app`` does.

``python -m tests.apps.aiohttp_generator_app PORT``: ``/ticks`` streams a tick
every 50 ms forever; its generator writes ``generator closed`` to stderr when
it is closed.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio
from aiohttp import web

from sse_broadcaster.aiohttp import EventSourceResponse


async def ticks() -> AsyncIterator[str]:
    try:
        n = 0
        while True:
            yield f"tick {n}"
            n += 1
            await anyio.sleep(0.05)
    finally:
        print("generator closed", file=sys.stderr, flush=True)


async def stream(request: web.Request) -> web.StreamResponse:
    return EventSourceResponse(ticks())


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/ticks", stream)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
