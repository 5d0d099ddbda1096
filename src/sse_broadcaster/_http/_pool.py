"""The per-origin pool transport: httpx requests onto pooled httpcore connections.

`OriginPoolsTransport` converts between httpx and httpcore the way
`httpx.AsyncHTTPTransport` does (which has no parameter for a network
backend), keeping a small pool of connections per origin whose every step is
O(1). Only public httpx and httpcore API is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio
import httpcore
import httpx

from ._limits import ConnectionCap, ReleasableStream

__all__ = ["HTTPCORE_TO_HTTPX", "OriginPoolsTransport", "httpx_error"]

# The schemes httpcore connects to.
_SCHEMES = frozenset({b"http", b"https", b"ws", b"wss"})

# httpcore's exceptions and the httpx ones they surface as; the same table as
# httpx's own transport (tests/test_http.py fails if the two drift apart).
HTTPCORE_TO_HTTPX: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}


def httpx_error(exc: Exception) -> Exception:
    """The httpx exception that httpcore's ``exc`` surfaces as (``exc`` if none)."""
    target: type[httpx.TransportError] | None = None
    for source, candidate in HTTPCORE_TO_HTTPX.items():
        if isinstance(exc, source) and (target is None or issubclass(candidate, target)):
            target = candidate
    if target is None:
        return exc
    mapped = target(str(exc))
    mapped.__cause__ = exc
    return mapped


class _Origin:
    """The connections to one origin (scheme, host, port)."""

    __slots__ = ("connections", "idle", "in_flight")

    def __init__(self) -> None:
        self.connections: dict[httpcore.AsyncConnectionInterface, None] = {}
        """Every connection open or opening, idle or not."""
        self.idle: dict[httpcore.AsyncConnectionInterface, None] = {}
        """Idle connections, least recently used first (taken from the end: LIFO)."""
        self.in_flight = 0
        """Requests sent and not yet closed."""

    def drop(self, connection: httpcore.AsyncConnectionInterface) -> None:
        self.connections.pop(connection, None)
        self.idle.pop(connection, None)


_OriginKey = tuple[bytes, bytes, "int | None"]


class OriginPoolsTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncHTTPTransport` without proxies, pooling connections per origin.

    The pool of each origin is a LIFO stack of idle connections
    (`HTTP11Connection`, or `httpcore.AsyncHTTPConnection` with HTTP/2): a
    request takes the most recently used idle connection (checking only that
    one for a server-side close), or opens a new one; its response, once
    closed, puts the connection back. Expired connections are closed from
    the other end of the stack. Each step is O(1) in the number of connections.

    httpcore's own `AsyncConnectionPool` rescans every connection and queued
    request whenever a request starts or a response closes (O(N^2 + N*M),
    encode/httpcore#1035), polling each idle socket: with 20 connections per
    host that was 40 % of the client's CPU time in a warm 100-call benchmark.

    The total is capped by `ConnectionCap`, which all connections share and
    which calls `make_room` here; at most ``max_connections`` requests are in
    flight, so that a busy connection always frees one. The per-origin limit is
    `HostLimitTransport`'s, above this transport: with HTTP/1.1 an origin has at
    most as many connections as requests in flight, plus idle ones (at most
    ``max_idle_per_origin``).
    """

    def __init__(
        self,
        make_connection: Callable[[httpcore.Origin], httpcore.AsyncConnectionInterface],
        cap: ConnectionCap,
        *,
        max_idle_per_origin: int,
        multiplexing: bool = False,
    ) -> None:
        self._make_connection = make_connection
        self.cap = cap
        cap.make_room = self.make_room
        self.max_connections = cap.max_connections
        self.max_idle_per_origin = max_idle_per_origin
        self.multiplexing = multiplexing  # HTTP/2: a busy connection may take more
        self.origins: dict[_OriginKey, _Origin] = {}  # least recently used first
        self._slots: anyio.Semaphore | None = None

    def connection_count(self) -> int:
        """Connections open now, idle or not, across all origins."""
        return self.cap.open_connections

    async def make_room(self) -> bool:
        """Close idle connections: all of the least recently used idle origin's,
        else the least recently used idle connection of a busy origin."""
        closing: list[httpcore.AsyncConnectionInterface] = []
        unused = next((key for key, o in self.origins.items() if not o.in_flight), None)
        if unused is not None:
            origin = self.origins.pop(unused)
            closing = list(origin.connections)
        else:
            for origin in self.origins.values():
                if origin.idle:
                    oldest = next(iter(origin.idle))
                    origin.drop(oldest)
                    closing = [oldest]
                    break
        await _close(closing)
        return unused is not None or bool(closing)

    def _checkout(
        self, origin: _Origin, url: httpcore.URL, closing: list[httpcore.AsyncConnectionInterface]
    ) -> httpcore.AsyncConnectionInterface:
        idle = origin.idle
        # Expired connections sit at the least recently used end.
        fresh = None
        while idle:
            oldest = next(iter(idle))
            if not oldest.has_expired():
                fresh = oldest  # checked just now
                break
            origin.drop(oldest)
            closing.append(oldest)
        while idle:
            connection, _ = idle.popitem()  # the most recently used
            if connection.is_closed():
                origin.drop(connection)
            elif connection is not fresh and connection.has_expired():  # the server closed it
                origin.drop(connection)
                closing.append(connection)
            elif connection.is_available():
                return connection
        if self.multiplexing:
            for connection in origin.connections:
                if connection.is_available():
                    return connection
        connection = self._make_connection(url.origin)
        origin.connections[connection] = None
        return connection

    def _checkin(
        self, origin: _Origin, connection: httpcore.AsyncConnectionInterface
    ) -> httpcore.AsyncConnectionInterface | None:
        """Keep ``connection`` for reuse if it is idle; the one to close, if any."""
        if connection.is_closed():
            origin.drop(connection)
        elif connection.is_idle():
            if len(origin.idle) < self.max_idle_per_origin:
                origin.idle[connection] = None
            else:
                origin.drop(connection)
                return connection
        elif not self.multiplexing:
            # HTTP/1.1 and not idle once its response is closed: the close was
            # interrupted (cancelled) midway, so the connection's state is unknown.
            origin.drop(connection)
            return connection
        return None  # busy (HTTP/2, other streams): its last response puts it back

    def finish(
        self,
        key: _OriginKey,
        origin: _Origin,
        connection: httpcore.AsyncConnectionInterface | None,
    ) -> httpcore.AsyncConnectionInterface | None:
        """The request on ``connection`` is over: give back its connection and
        slot; the connection to close, if any."""
        surplus = None if connection is None else self._checkin(origin, connection)
        origin.in_flight -= 1
        if not origin.in_flight and not origin.connections and self.origins.get(key) is origin:
            del self.origins[key]
        assert self._slots is not None
        self._slots.release()
        return surplus

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.raw_scheme not in _SCHEMES:
            # What httpx's own transport raises (httpcore would fail on a missing
            # default port with a bare KeyError).
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{request.url.scheme}://'.",
                request=request,
            )
        if self._slots is None:  # created on first use: it needs a running loop
            self._slots = anyio.Semaphore(self.max_connections)
        slots = self._slots
        if slots.value:
            slots.acquire_nowait()
        else:
            try:
                with anyio.fail_after(request.extensions.get("timeout", {}).get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"timed out waiting for one of {self.max_connections} connections",
                    request=request,
                ) from None
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        origin = self.origins.pop(key, None) or _Origin()
        self.origins[key] = origin  # now the most recently used
        origin.in_flight += 1

        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        connection: httpcore.AsyncConnectionInterface | None = None
        try:
            while True:
                closing: list[httpcore.AsyncConnectionInterface] = []
                connection = self._checkout(origin, core_request.url, closing)
                if closing:
                    await _close(closing)
                try:
                    response = await connection.handle_async_request(core_request)
                    break
                except httpcore.ConnectionNotAvailable:
                    # Taken meanwhile (HTTP/2 streams) or closed: try another.
                    origin.idle.pop(connection, None)
                    if connection.is_closed():
                        origin.drop(connection)
                    connection = None
        except BaseException as exc:
            surplus = self.finish(key, origin, connection)
            if surplus is not None:
                await _close([surplus])
            if isinstance(exc, Exception):
                raise httpx_error(exc)  # noqa: B904 (its cause is set: exc)
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_PooledStream(self, response.stream, key, origin, connection),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        origins, self.origins = list(self.origins.values()), {}
        await _close([c for origin in origins for c in origin.connections])


async def _close(connections: Iterable[httpcore.AsyncConnectionInterface]) -> None:
    """Close connections taken out of a pool, even under cancellation.

    An error closing one (a socket the peer already reset) is no concern of the
    request that found it stale: it is closed as far as the pool is concerned.
    """
    with anyio.CancelScope(shield=True):
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.aclose()


class _PooledStream(ReleasableStream):
    """A response body from the pool: httpx errors; gives the connection back once closed."""

    def __init__(
        self,
        pool: OriginPoolsTransport,
        stream: Any,
        key: _OriginKey,
        origin: _Origin,
        connection: httpcore.AsyncConnectionInterface,
    ) -> None:
        super().__init__()
        self._pool: OriginPoolsTransport | None = pool
        self._stream = stream
        self._key = key
        self._origin = origin
        self._connection = connection

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            await self.aclose()
            raise httpx_error(exc)  # noqa: B904 (its cause is set: exc)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            if pool.multiplexing:
                with anyio.CancelScope(shield=True):
                    await self._stream.aclose()
            else:
                # No shield (a cancel scope per response is a tenth of this
                # module's time): an HTTP/1.1 connection whose close is
                # interrupted is left busy, and _checkin closes it.
                await self._stream.aclose()
        except Exception as exc:
            raise httpx_error(exc)  # noqa: B904 (its cause is set: exc)
        finally:
            self._pool = None
            self._release()
            surplus = pool.finish(self._key, self._origin, self._connection)
            if surplus is not None:
                await _close([surplus])
