"""A Starlette app on the adapter, for ``uvicorn tests.apps.sse_app:app``.

``/tasks`` answers how many asyncio tasks the server process holds, so a test
can count what connections leave behind.
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sse_broadcaster import BroadcasterConfig, EventBroadcaster
from sse_broadcaster.starlette import lifespan, metrics_endpoint, sse_endpoint, stats_endpoint

broadcaster = EventBroadcaster(BroadcasterConfig(max_subscribers_per_session=None))


async def tasks(request: Request) -> JSONResponse:
    return JSONResponse({"tasks": len(asyncio.all_tasks())})


async def publish(request: Request) -> JSONResponse:
    event = await broadcaster.publish(request.path_params["session_id"], await request.body())
    return JSONResponse({"id": event.id})


app = Starlette(
    routes=[
        Route("/events/{session_id}", sse_endpoint(broadcaster)),
        Route("/publish/{session_id}", publish, methods=["POST"]),
        Route("/stats", stats_endpoint(broadcaster)),
        Route("/metrics", metrics_endpoint(broadcaster)),
        Route("/tasks", tasks),
    ],
    lifespan=lifespan(broadcaster),
)
