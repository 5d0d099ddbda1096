"""Limits: requests in flight per origin, and TCP connections open in total.

httpx has a total connection limit but no per-host one. `HostLimitTransport`,
an `httpx.AsyncBaseTransport` wrapper, caps the requests in flight per origin
(and so, with HTTP/1.1, the connections per origin). `ConnectionCap`, a
network backend that every connection of a client shares, caps the TCP
connections open at once across all origins.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
import httpcore
import httpx

from .._validation import check_int
from ._backends import AsyncioStream, WrappingBackend, is_readable

__all__ = ["ConnectionCap", "HostLimitTransport", "ReleasableStream"]


class ConnectionCap(WrappingBackend):
    """Caps the TCP connections open at once, across every pool that shares it.

    When all are open and another is needed, ``make_room`` is asked to close an
    idle one (of any host); while none is idle, the connect waits (within its
    connect timeout).
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend, max_connections: int) -> None:
        self._backend = backend
        self.max_connections = max_connections
        self.open_connections = 0
        self.make_room: Callable[[], Awaitable[bool]] | None = None

    def _release(self) -> None:
        self.open_connections -= 1

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            if self.open_connections >= self.max_connections:
                with anyio.fail_after(timeout):
                    while self.open_connections >= self.max_connections:
                        if self.make_room is None or not await self.make_room():
                            await anyio.sleep(0.005)  # every connection is busy
        except TimeoutError:
            raise httpcore.ConnectTimeout(
                f"timed out waiting for one of {self.max_connections} connections to close"
            ) from None
        # No await between the check above and this line: the count is exact.
        self.open_connections += 1
        try:
            stream = await self._backend.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        except BaseException:
            self._release()
            raise
        if isinstance(stream, AsyncioStream):
            stream.call_on_close(self._release)
            return stream
        return _CountedStream(stream, self._release)


class _CountedStream(httpcore.AsyncNetworkStream):
    """A network stream that gives its connection back to the cap once closed."""

    def __init__(self, stream: httpcore.AsyncNetworkStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release
        self._socket: socket.socket | None = None

    def _release_once(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release_once()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        try:
            tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            self._release_once()  # httpcore's backends close the stream on failure
            raise
        release, self._release = self._release, None
        return _CountedStream(tls, release) if release is not None else tls

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks this of every idle connection each time it assigns
            # a request; answer from the cached socket, not anyio's attribute
            # lookup (a third of the time of a warm pool).
            if isinstance(self._stream, AsyncioStream):
                return self._stream.get_extra_info(info)
            if self._socket is None:
                self._socket = self._stream.get_extra_info("socket")
            return is_readable(self._socket)
        return self._stream.get_extra_info(info)


class ReleasableStream(httpx.AsyncByteStream):
    """A response body that calls back once it is closed.

    That is how a slot taken for a request is held until its response is
    closed. The pool's own response bodies are ones, which saves a stream layer.
    """

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []

    def release_on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the response is closed."""
        self._releases.append(release)

    def _release(self) -> None:
        releases, self._releases = self._releases, []
        for release in releases:
            release()


class _ReleasingStream(ReleasableStream):
    """Any other response body, wrapped to call back once closed."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        super().__init__()
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()


class _HostSlots:
    __slots__ = ("semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = anyio.Semaphore(limit)
        self.users = 0


class HostLimitTransport(httpx.AsyncBaseTransport):
    """Caps the requests in flight per origin (scheme, host, port).

    A request holds its slot until its response is closed, so with HTTP/1.1 it
    also caps the connections per host. Waiting for a slot counts towards the
    request's pool timeout and raises `httpx.PoolTimeout` when it runs out.

    Raises:
        ValueError: ``max_per_host`` is below 1.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, max_per_host: int) -> None:
        check_int("max_per_host", max_per_host, 1)
        self.transport = transport
        self.max_per_host = max_per_host
        self._hosts: dict[tuple[bytes, bytes, int | None], _HostSlots] = {}

    def in_flight(self, url: httpx.URL | str) -> int:
        """Requests to the origin of ``url`` that hold a slot now."""
        url = httpx.URL(url)
        slots = self._hosts.get((url.raw_scheme, url.raw_host, url.port))
        if slots is None:
            return 0
        return self.max_per_host - int(slots.semaphore.value)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = (request.url.raw_scheme, request.url.raw_host, request.url.port)
        slots = self._hosts.get(key)
        if slots is None:
            slots = self._hosts[key] = _HostSlots(self.max_per_host)
        slots.users += 1
        if slots.semaphore.value:  # a free slot: no timeout scope, no checkpoint
            slots.semaphore.acquire_nowait()
        else:
            try:
                timeout = request.extensions.get("timeout", {}).get("pool")
                try:
                    with anyio.fail_after(timeout):
                        await slots.semaphore.acquire()
                except TimeoutError:
                    raise httpx.PoolTimeout(
                        f"timed out waiting for one of {self.max_per_host} connections "
                        f"to {request.url.host}:{request.url.port or request.url.scheme}",
                        request=request,
                    ) from None
            except BaseException:
                self._leave(key, slots)
                raise

        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.semaphore.release()
                self._leave(key, slots)

        try:
            response = await self.transport.handle_async_request(request)
        except BaseException:
            release()
            raise
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        if not isinstance(stream, ReleasableStream):
            stream = response.stream = _ReleasingStream(stream)
        stream.release_on_close(release)
        return response

    def _leave(self, key: tuple[bytes, bytes, int | None], slots: _HostSlots) -> None:
        # Forget hosts nobody uses, so that the table does not grow with every
        # host ever contacted.
        slots.users -= 1
        if slots.users == 0 and self._hosts.get(key) is slots:
            del self._hosts[key]

    async def aclose(self) -> None:
        await self.transport.aclose()
