"""Reaching and aborting a client's connection, which neither ASGI nor aiohttp's API offers.

A stream dropped for its send timeout must not leave its socket behind: a
server's own ``close()`` waits for the client to read what is buffered, and a
client that never reads keeps the socket and the buffer for as long as it
stays connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any, Protocol, cast

__all__ = ["Transport", "abort_connection", "server_transport"]


class Transport(Protocol):
    """What `abort_connection` needs of a connection: asyncio's transports and uvloop's have it."""

    def abort(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def server_transport(receive: object) -> Transport | None:
    """The connection's transport when the server lets it be found, else None.

    ASGI has no way to abort a connection. uvicorn (h11 and httptools, on
    asyncio or uvloop) hands the app the bound ``receive`` of its request
    cycle, which holds the transport; under a pure ASGI middleware that wraps
    ``receive``, the request's task still runs that cycle's ``run_asgi``. Any
    other server (or a middleware running the app in a task of its own)
    gives None.
    """
    transport = _transport_of(getattr(receive, "__self__", None))
    if transport is None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not on asyncio (trio)
            return None
        frame = getattr(task.get_coro() if task is not None else None, "cr_frame", None)
        transport = _transport_of(frame.f_locals.get("self") if frame is not None else None)
    return transport


def _transport_of(owner: object) -> Transport | None:
    transport = getattr(owner, "transport", None)
    if callable(getattr(transport, "abort", None)) and callable(
        getattr(transport, "get_extra_info", None)
    ):
        return cast("Transport", transport)
    return None


_LINGER_RESET = struct.pack("ii", 1, 0)


def abort_connection(transport: Transport | None) -> bool:
    """Drop a connection now: its write buffer is freed and the client gets a reset.

    Without ``SO_LINGER`` 0 the kernel would keep the closed socket and its
    unsent data, retrying a client that reads nothing for minutes. False when
    there is no transport to abort.
    """
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()
    return True
