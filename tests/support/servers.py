"""Real servers for the adapter tests: uvicorn and aiohttp on 127.0.0.1, a free port.

Both run inside the test's own event loop, so a test publishes straight into
the broadcaster the server streams from. `RawStream` is a bare HTTP/1.1 client
that sees the chunks the server writes (one chunk per write) and can stop
reading to fill the socket, which no high-level client lets a test do.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from sse_broadcaster import EventBroadcaster

__all__ = [
    "ADAPTERS",
    "RawStream",
    "Running",
    "Served",
    "established",
    "free_socket",
    "open_raw",
    "open_silent",
    "run_aiohttp",
    "run_uvicorn",
    "serve_adapter",
    "wait_for",
]

ADAPTERS = ("starlette", "aiohttp")


def free_socket() -> socket.socket:
    """A listening-ready TCP socket bound to a free port on 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        return int(sock.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], limit: float = 5.0, what: str = "") -> float:
    """Poll until `predicate()` is true; the seconds it took. Fails after `limit` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError(f"timed out after {limit} s waiting for {what or predicate}")
        await anyio.sleep(0.01)
    return time.monotonic() - start


@dataclass
class Running:
    """A server running in this event loop: its base URL and the server object."""

    base_url: str
    server: Any
    """The `uvicorn.Server`, or aiohttp's `AppRunner`."""


@asynccontextmanager
async def run_uvicorn(app: Any, **config: Any) -> AsyncIterator[Running]:
    """Serve an ASGI app with uvicorn in this event loop.

    Leaving stops it the way ``should_exit`` does (as a signal handler would)
    and waits for `serve()` to return: lifespan shutdown included.
    """
    import uvicorn

    sock = free_socket()
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,  # a failing test must not hang the next ones
    }
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve, [sock])
            await wait_for(lambda: server.started, 10, "uvicorn to start")
            try:
                yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", server)
            finally:
                server.should_exit = True
    finally:
        sock.close()


@asynccontextmanager
async def run_aiohttp(app: Any, *, shutdown_timeout: float = 10.0) -> AsyncIterator[Running]:
    """Serve an aiohttp app with `AppRunner` + `SockSite`.

    Leaving runs ``runner.cleanup()`` (shutdown hooks, handlers, cleanup_ctx).
    """
    from aiohttp import web

    sock = free_socket()
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.SockSite(runner, sock)
        await site.start()
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}", runner)
    finally:
        await runner.cleanup()
        sock.close()


@dataclass
class Served:
    """A running server for one adapter, as the shared tests see it."""

    adapter: str
    base_url: str
    broadcaster: EventBroadcaster
    server: Any

    def url(self, path: str) -> str:
        return self.base_url + path


def make_app(adapter: str, broadcaster: EventBroadcaster, **options: Any) -> Any:
    """The same three routes on either framework, with the broadcaster's lifetime helper."""
    if adapter == "starlette":
        from starlette.applications import Starlette
        from starlette.routing import Route

        from sse_broadcaster.starlette import (
            lifespan,
            metrics_endpoint,
            sse_endpoint,
            stats_endpoint,
        )

        return Starlette(
            routes=[
                Route("/events/{session_id}", sse_endpoint(broadcaster, **options)),
                Route("/stats", stats_endpoint(broadcaster)),
                Route("/metrics", metrics_endpoint(broadcaster)),
            ],
            lifespan=lifespan(broadcaster),
        )
    from aiohttp import web

    from sse_broadcaster.aiohttp import metrics_handler, setup, sse_handler, stats_handler

    app = web.Application()
    app.router.add_get("/events/{session_id}", sse_handler(broadcaster, **options))
    app.router.add_get("/stats", stats_handler(broadcaster))
    app.router.add_get("/metrics", metrics_handler(broadcaster))
    setup(app, broadcaster)
    return app


@asynccontextmanager
async def serve_adapter(
    adapter: str, broadcaster: EventBroadcaster, **options: Any
) -> AsyncIterator[Served]:
    """Run `make_app` on uvicorn (starlette) or aiohttp's own server."""
    app = make_app(adapter, broadcaster, **options)
    if adapter == "starlette":
        async with run_uvicorn(app) as running:
            yield Served(adapter, running.base_url, broadcaster, running.server)
    else:
        async with run_aiohttp(app) as running:
            yield Served(adapter, running.base_url, broadcaster, running.server)


@dataclass
class RawStream:
    """One HTTP/1.1 response read off a bare socket, chunk by chunk."""

    stream: anyio.abc.SocketStream
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0
    _buffer: bytearray = field(default_factory=bytearray)

    async def _fill(self) -> bool:
        try:
            with anyio.fail_after(self.timeout):  # a failing test must not hang
                data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return False
        self._buffer += data
        return True

    async def _read_until(self, marker: bytes) -> bytes:
        while (index := self._buffer.find(marker)) < 0:
            if not await self._fill():
                raise anyio.EndOfStream
        line = bytes(self._buffer[:index])
        del self._buffer[: index + len(marker)]
        return line

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if not await self._fill():
                raise anyio.EndOfStream
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_head(self) -> None:
        head = (await self._read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        self.status = int(head[0].split()[1])
        for line in head[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def read_chunk(self) -> bytes:
        """The next chunk of a chunked body (b"" at the end); fails if not chunked."""
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        size = int((await self._read_until(b"\r\n")).split(b";")[0], 16)
        data = await self._read_exactly(size)
        await self._read_until(b"\r\n")
        return data

    async def read_body(self) -> bytes:
        """The rest of the body, whatever its framing, until the server ends it."""
        if self.headers.get("transfer-encoding") == "chunked":
            parts = []
            while chunk := await self.read_chunk():
                parts.append(chunk)
            return b"".join(parts)
        if "content-length" in self.headers:
            return await self._read_exactly(int(self.headers["content-length"]))
        while await self._fill():
            pass
        return bytes(self._buffer)

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def open_raw(
    base_url: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    receive_buffer: int | None = None,
    read_head: bool = True,
) -> AsyncIterator[RawStream]:
    """Send ``GET path`` on a fresh connection; yields the response once its head is read.

    `receive_buffer` shrinks the client's SO_RCVBUF so that a client that stops
    reading fills the connection quickly.
    """
    host, port = base_url.removeprefix("http://").split(":")
    if receive_buffer is None:
        stream = await anyio.connect_tcp(host, int(port))
    else:
        # SO_RCVBUF must be set before connecting to shrink the TCP window.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            try:
                sock.connect((host, int(port)))
            except BlockingIOError:
                await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, "connect failed")
            stream = await anyio.abc.SocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    raw = RawStream(stream)
    try:
        await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if read_head:
            await raw.read_head()
        yield raw
    finally:
        with anyio.CancelScope(shield=True):
            await raw.aclose()


async def open_silent(base_url: str, path: str, *, receive_buffer: int = 4096) -> socket.socket:
    """A connection that sends ``GET path`` and never reads: a hostile slow reader.

    Its tiny SO_RCVBUF makes the server's writes back up after a few kB; the
    caller closes the socket.
    """
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        try:
            sock.connect((host, int(port)))
        except BlockingIOError:
            await anyio.wait_writable(sock)
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        sock.send(request.encode())  # far smaller than any socket buffer
    except BaseException:
        sock.close()
        raise
    return sock


def established(base_url: str) -> int:
    """This process's ESTABLISHED TCP sockets whose local port is the server's.

    Those are the server's side of its connections (a client's local port is
    an ephemeral one), for a server running in this process.
    """
    import psutil

    port = int(base_url.rsplit(":", 1)[1])
    return sum(
        1
        for conn in psutil.Process().net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )
