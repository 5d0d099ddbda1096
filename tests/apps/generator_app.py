"""A FastAPI app streaming a request's own generator, for ``uvicorn tests.apps.generator_app:app``.

``/ticks`` streams a tick every 50 ms forever; its generator writes
``generator closed`` to stderr when it is closed.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI

from sse_broadcaster.starlette import EventSourceResponse

app = FastAPI()


async def ticks() -> AsyncIterator[str]:
    try:
        n = 0
        while True:
            yield f"tick {n}"
            n += 1
            await anyio.sleep(0.05)
    finally:
        print("generator closed", file=sys.stderr, flush=True)


@app.get("/ticks", response_class=EventSourceResponse)
async def stream() -> EventSourceResponse:
    return EventSourceResponse(ticks())
