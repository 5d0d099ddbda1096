"""A bare ASGI stream that ends only on ``http.disconnect``: what uvicorn does on shutdown.

``uvicorn tests.apps.bare_stream:app``. tests/test_adapter_shutdown.py uses it
to check whether the uvicorn in use tells open streaming responses that it is
shutting down (0.54 does not), which is why the Starlette adapter chains the
server's signal handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    await send({"type": "http.response.body", "body": b"retry: 1000\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass
    await send({"type": "http.response.body", "body": b"", "more_body": False})
