"""Small HTTP/1.1 servers on 127.0.0.1 for tests/test_http.py and tests/test_client.py.

They run inside the test's own event loop (anyio, so asyncio and trio), count
accepted connections and requests in flight, and let a handler misbehave at
the byte level: cut a response short, send garbage, stall, never read.
"""

from __future__ import annotations

import math
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSListener

__all__ = [
    "Connection",
    "Counters",
    "Request",
    "Server",
    "serve",
    "serve_uvicorn",
]


@dataclass
class Counters:
    """Connections and requests seen by one server (or shared by several)."""

    accepted: int = 0
    open: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    requests: int = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.requests += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    connection_number: int
    """1 for the first connection the server accepted, 2 for the second..."""

    @property
    def wants_close(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Connection:
    """The server side of one TCP connection, as a handler sees it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def hold(self) -> None:
        """Send nothing more; return when the client closes the connection."""
        try:
            while await self.stream.receive():
                pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass

    async def respond(
        self,
        status: int = 200,
        body: bytes = b"ok",
        *,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if close:
            lines.append("Connection: close")
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def start_stream(
        self, status: int = 200, content_type: str = "text/event-stream", **headers: str
    ) -> None:
        """Headers of a response whose body runs until the connection closes."""
        lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", "Connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        await self.send(("\r\n".join(lines) + "\r\n\r\n").encode())


# A handler answers one request. It returns True to keep the connection open for
# the next request, False to close it.
Handler = Callable[[Request, Connection], Awaitable[bool]]


@dataclass
class Server:
    port: int
    host: str = "127.0.0.1"
    counters: Counters = field(default_factory=Counters)
    shared: Counters | None = None
    requests: list[Request] = field(default_factory=list)
    closed: anyio.Event = field(default_factory=anyio.Event)
    """Set whenever a connection closes (replaced after each set)."""

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def _all(self) -> list[Counters]:
        return [self.counters] if self.shared is None else [self.counters, self.shared]

    async def wait_open(self, count: int, seconds: float = 5.0) -> None:
        """Wait until exactly ``count`` connections are open."""
        with anyio.fail_after(seconds):
            while self.counters.open != count:
                await anyio.sleep(0.01)


async def _read_request(reader: BufferedByteReceiveStream, number: int) -> Request | None:
    try:
        head = await reader.receive_until(b"\r\n\r\n", 65536)
    except (anyio.IncompleteRead, anyio.EndOfStream):
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    if 0 < length <= 65536:  # larger bodies are left unread (see test_write_timeout)
        await reader.receive_exactly(length)
    return Request(method, target, headers, number)


@asynccontextmanager
async def serve(
    handler: Handler, *, shared: Counters | None = None, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    """Serve ``handler`` on 127.0.0.1 with a free port until the block exits."""
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener: anyio.abc.Listener[Any] = tcp
    if ssl_context is not None:
        listener = TLSListener(tcp, ssl_context, standard_compatible=False)
    server = Server(port=port, shared=shared)

    async def on_connection(stream: Any) -> None:
        for c in server._all():
            c.accepted += 1
            c.open += 1
        number = server.counters.accepted
        reader = BufferedByteReceiveStream(stream)
        try:
            while True:
                request = await _read_request(reader, number)
                if request is None:
                    break
                server.requests.append(request)
                for c in server._all():
                    c.enter()
                try:
                    keep = await handler(request, Connection(stream))
                finally:
                    for c in server._all():
                        c.in_flight -= 1
                if not keep or request.wants_close:
                    break
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            for c in server._all():
                c.open -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            server.closed.set()
            server.closed = anyio.Event()

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, on_connection)
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()


def delayed(seconds: float, body: bytes = b"ok") -> Handler:
    """A handler that answers after ``seconds``, keeping the connection alive."""

    async def handler(request: Request, conn: Connection) -> bool:
        await anyio.sleep(seconds)
        await conn.respond(200, body)
        return True

    return handler


async def stall(request: Request, conn: Connection) -> bool:
    """A handler that never answers."""
    await anyio.sleep(math.inf)
    return False


@contextmanager
def serve_uvicorn(app: object) -> Iterator[str]:
    """Run an ASGI app on uvicorn in a thread of its own; yields the base URL."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("uvicorn did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
