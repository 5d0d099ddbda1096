"""A pooled httpx client for the outbound HTTP that event producers do.

::

    from sse_broadcaster.http import get_http_client

    client = get_http_client()            # one per running event loop
    response = await client.get("https://api.example.com/items")

httpx has a total connection limit but neither a per-host limit nor a DNS
cache. Both are built here on httpx's and httpcore's public extension points:

- `HostLimitTransport`, an `httpx.AsyncBaseTransport` wrapper, caps the
  requests in flight per origin (and so the connections per origin);
- `DNSCacheBackend`, an `httpcore.AsyncNetworkBackend`, resolves host names
  through an injectable resolver and keeps the answers for ``dns_cache_ttl``.

Under them, a small pool per origin of `httpcore.AsyncHTTPConnection`s (idle
ones reused most recent first, in O(1): httpcore's own pool rescans all its
connections at every request), all sharing one network backend that caps the
connections open in total and closes idle ones of other hosts to make room.
On asyncio that backend reads and writes through asyncio transports directly
(httpcore's AnyIO backend, used on trio, enters a cancel scope per read and
write). A small transport converts between httpx and httpcore the way
`httpx.AsyncHTTPTransport` does (which has no parameter for a network
backend). Only public httpx and httpcore API is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import anyio
import anyio.lowlevel
import httpcore
import httpx

__all__ = [
    "DNSCacheBackend",
    "HTTPClientConfig",
    "HostLimitTransport",
    "Resolver",
    "aclose_http_clients",
    "create_http_client",
    "get_http_client",
]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``async resolve(host, port) -> addresses``: IP address strings, best first."""

# Keyword arguments of create_http_client that configure the transport, not the client.
_TRANSPORT_KWARGS = frozenset(
    {"verify", "cert", "trust_env", "http1", "http2", "local_address", "socket_options", "retries"}
)
# Keyword arguments that would bypass or contradict HTTPClientConfig.
_REJECTED_KWARGS = {
    "transport": "the pooled transport is what create_http_client builds",
    "limits": "set max_connections and keepalive_expiry in HTTPClientConfig",
    "timeout": "set the timeouts in HTTPClientConfig",
    "proxy": "a proxy would bypass the pool; mount a proxy transport with `mounts=` instead",
}


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_seconds(name: str, value: Any, *, optional: bool, positive: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds or None" if optional else "a number of seconds"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        hint = " (use None for no limit)" if optional else ""
        raise ValueError(f"{name} must be finite{hint}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class HTTPClientConfig:
    """Pool, keep-alive, DNS cache and timeouts of the shared HTTP client.

    The defaults are the production settings of the reference deployment:
    100 connections in total, 20 per host, keep-alive 30 s, DNS cache 300 s.

    Raises:
        ValueError: a value is out of range (the message names the field and value).
        TypeError: a value has the wrong type.
    """

    max_connections: int = 100
    """Connections open at once, across all hosts."""
    max_connections_per_host: int = 20
    """Requests in flight (so connections) per origin: scheme, host and port."""
    max_keepalive_connections: int | None = None
    """Idle connections kept for reuse per host; None: up to ``max_connections_per_host``."""
    keepalive_expiry: float | None = 30.0
    """Seconds an idle connection is kept; None: no expiry."""
    dns_cache_ttl: float = 300.0
    """Seconds a resolved address is reused; 0 disables the cache."""
    connect_timeout: float | None = 5.0
    """Seconds to resolve and connect (and TLS handshake)."""
    read_timeout: float | None = 30.0
    """Seconds to wait for each chunk of the response; above the 15 s SSE keep-alive."""
    write_timeout: float | None = 30.0
    """Seconds to wait for each chunk of the request body to be sent."""
    pool_timeout: float | None = 10.0
    """Seconds to wait for a free connection (total or per-host limit)."""

    def __post_init__(self) -> None:
        _check_int("max_connections", self.max_connections, 1)
        _check_int("max_connections_per_host", self.max_connections_per_host, 1)
        if self.max_connections_per_host > self.max_connections:
            raise ValueError(
                f"max_connections_per_host must be <= max_connections "
                f"({self.max_connections}), got {self.max_connections_per_host!r}"
            )
        if self.max_keepalive_connections is not None:
            _check_int("max_keepalive_connections", self.max_keepalive_connections, 0)
        _check_seconds("keepalive_expiry", self.keepalive_expiry, optional=True, positive=False)
        _check_seconds("dns_cache_ttl", self.dns_cache_ttl, optional=False, positive=False)
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout"):
            _check_seconds(name, getattr(self, name), optional=True, positive=True)

    @property
    def timeout(self) -> httpx.Timeout:
        """The four timeouts as an `httpx.Timeout`."""
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.pool_timeout,
        )

    @property
    def limits(self) -> httpx.Limits:
        """The pool limits as an `httpx.Limits` (without the per-host one)."""
        keepalive = self.max_keepalive_connections
        return httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections if keepalive is None else keepalive,
            keepalive_expiry=self.keepalive_expiry,
        )


# --------------------------------------------------------------------------- DNS


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _WrappingBackend(httpcore.AsyncNetworkBackend):
    """A network backend that adds to another's TCP connects; the rest it passes on."""

    _backend: httpcore.AsyncNetworkBackend

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._backend.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class DNSCacheBackend(_WrappingBackend):
    """An httpcore network backend that caches name resolution.

    Each new connection to ``host:port`` takes its addresses from the cache
    while they are younger than ``ttl`` seconds, and otherwise calls
    ``resolver`` (at most once at a time per host: concurrent connections wait
    for the same answer). A failed or empty resolution is not cached. The
    addresses are tried in order; TLS still verifies and sends SNI for the host
    name, because httpcore passes the origin's name to ``start_tls``.

    Resolution counts towards the connect timeout.
    """

    _MAX_ENTRIES = 4096

    def __init__(
        self,
        ttl: float = 300.0,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        _check_seconds("ttl", ttl, optional=False, positive=False)
        self._ttl = float(ttl)
        self._resolver: Resolver = resolver or _getaddrinfo
        self._clock = clock
        self._backend = backend or _NativeBackend()
        self._cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}
        self._locks: dict[tuple[str, int], anyio.Lock] = {}

    def clear(self) -> None:
        """Forget every cached address."""
        self._cache.clear()

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        """The addresses of ``host``, from the cache or the resolver.

        Raises:
            httpcore.ConnectError: the resolver failed or found no address.
        """
        if _is_ip_address(host):
            return (host.strip("[]"),)
        key = (host, port)
        cached = self._lookup(key)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                cached = self._lookup(key)
                if cached is not None:
                    return cached
                try:
                    addresses = tuple(await self._resolver(host, port))
                except OSError as exc:
                    raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
                if not addresses:
                    raise httpcore.ConnectError(f"cannot resolve {host!r}: no address")
                if self._ttl > 0:
                    self._store(key, addresses)
                return addresses
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)

    def _known(self, host: str, port: int) -> tuple[str, ...] | None:
        """The addresses of ``host`` if no lookup is needed: an IP literal, or cached."""
        if _is_ip_address(host):
            return (host.strip("[]"),)
        return self._lookup((host, port))

    def _lookup(self, key: tuple[str, int]) -> tuple[str, ...] | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, addresses = entry
        if self._clock() >= expires:
            del self._cache[key]
            return None
        return addresses

    def _store(self, key: tuple[str, int], addresses: tuple[str, ...]) -> None:
        now = self._clock()
        if len(self._cache) >= self._MAX_ENTRIES:
            for old in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[old]
            while len(self._cache) >= self._MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + self._ttl, addresses)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = self._known(host, port)
        if addresses is not None and len(addresses) == 1:
            # Nothing to resolve and one address: its connect applies the timeout.
            return await self._backend.connect_tcp(
                addresses[0],
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        try:
            with anyio.fail_after(timeout):
                addresses = await self.resolve(host, port)
                error: httpcore.ConnectError | None = None
                for address in addresses:
                    try:
                        return await self._backend.connect_tcp(
                            address,
                            port,
                            timeout=timeout,
                            local_address=local_address,
                            socket_options=socket_options,
                        )
                    except httpcore.ConnectError as exc:
                        error = exc
                assert error is not None  # addresses is never empty
                raise error
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None


# --------------------------------------------------------------------------- asyncio streams

_READ_HIGH_WATER = 256 * 1024  # bytes buffered before the socket stops being read


class _AsyncioProtocol(asyncio.Protocol):
    """Buffers what the socket receives; wakes the stream's one reader or writer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.write_paused = False
        self.read_paused = False
        # One reader and one writer at most (HTTP/2 reads and writes concurrently).
        self.reader: asyncio.Future[bool] | None = None
        self.writer: asyncio.Future[bool] | None = None
        self.lost = False

    def _wake(self, waiter: asyncio.Future[bool] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _READ_HIGH_WATER and not self.read_paused:
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake(self.reader)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(self.reader)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        # A TLS peer that closes without close_notify ends the stream like a TCP
        # FIN (httpcore's AnyIO backend is not "standard compatible" either).
        if exc is not None and not isinstance(exc, ssl.SSLEOFError):
            self.error = exc
        self.write_paused = False
        self._wake(self.reader)
        self._wake(self.writer)
        self.lost = True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake(self.writer)


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class _AsyncioStream(httpcore.AsyncNetworkStream):
    """An httpcore network stream on an asyncio transport and protocol.

    A read returns what is buffered without suspending; a write hands the bytes
    to the transport and waits only while the transport's buffer is full. A
    timeout is a timer on the one future a waiting call awaits. httpcore's AnyIO
    stream instead enters a cancel scope and checkpoints on every read and write.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _AsyncioProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def _wait(self, attribute: str, limit: float | None) -> bool:
        """Until the protocol wakes us (True) or ``limit`` seconds pass (False)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        setattr(self._protocol, attribute, waiter)
        timer = None if limit is None else loop.call_later(limit, _time_out, waiter)
        try:
            return await waiter
        finally:
            setattr(self._protocol, attribute, None)
            if timer is not None:
                timer.cancel()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        protocol = self._protocol
        buffer = protocol.buffer
        while not buffer and not protocol.eof:
            if not await self._wait("reader", timeout):
                raise httpcore.ReadTimeout("timed out reading from the connection")
        if not buffer:
            if protocol.error is not None:
                raise httpcore.ReadError(str(protocol.error)) from protocol.error
            return b""
        if len(buffer) <= max_bytes:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:max_bytes])
            del buffer[:max_bytes]
        if protocol.read_paused and len(buffer) <= _READ_HIGH_WATER // 4:
            protocol.read_paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        protocol = self._protocol
        if self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed") from protocol.error
        self._transport.write(buffer)
        while protocol.write_paused:
            if not await self._wait("writer", timeout):
                raise httpcore.WriteTimeout("timed out writing to the connection")
        if protocol.error is not None:
            raise httpcore.WriteError(str(protocol.error)) from protocol.error

    async def aclose(self) -> None:
        transport = self._transport
        if transport.get_write_buffer_size():
            transport.abort()  # do not wait to flush a request that will never complete
        else:
            transport.close()
        # A TCP socket closes on the next loop iteration. As httpcore's AnyIO
        # backend, do not wait longer for a TLS close_notify exchange.
        with anyio.CancelScope(shield=True):
            await asyncio.sleep(0)
        if not self._protocol.lost:
            transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except BaseException as exc:
            self._transport.abort()
            if isinstance(exc, TimeoutError):
                raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
            if isinstance(exc, OSError):  # ssl.SSLError included
                raise httpcore.ConnectError(str(exc)) from exc
            raise
        tls = cast("asyncio.Transport", transport)  # None only for a server-side protocol
        self._protocol.transport = tls
        return _AsyncioStream(tls, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            protocol = self._protocol
            return (
                bool(protocol.buffer)
                or protocol.eof
                or self._transport.is_closing()
                or _is_readable(self._transport.get_extra_info("socket"))
            )
        if info == "ssl_object":
            return self._transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        if info == "socket":
            return self._transport.get_extra_info("socket")
        return None


class _NativeBackend(_WrappingBackend):
    """`_AsyncioStream` on asyncio, httpcore's AnyIO backend elsewhere (trio)."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio: no asyncio loop runs in this thread
            loop = None
        if loop is None:
            return await self._backend.connect_tcp(
                host,
                port,
                timeout=timeout,
                local_address=local_address,
                socket_options=socket_options,
            )
        try:
            with anyio.fail_after(timeout):
                transport, protocol = await loop.create_connection(
                    _AsyncioProtocol,
                    host,
                    port,
                    local_addr=None if local_address is None else (local_address, 0),
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        try:
            # asyncio sets TCP_NODELAY on TCP sockets, as httpcore's backends do.
            sock = transport.get_extra_info("socket")
            for option in socket_options or ():
                sock.setsockopt(*option)
        except BaseException:
            transport.abort()
            raise
        return _AsyncioStream(transport, protocol)


# --------------------------------------------------------------------------- transports

# httpcore's exceptions and the httpx ones they surface as; the same table as
# httpx's own transport (tests/test_http.py fails if the two drift apart).
_HTTPCORE_TO_HTTPX: dict[type[Exception], type[httpx.TransportError]] = {
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


def _httpx_error(exc: Exception) -> Exception:
    """The httpx exception that httpcore's ``exc`` surfaces as (``exc`` if none)."""
    target: type[httpx.TransportError] | None = None
    for source, candidate in _HTTPCORE_TO_HTTPX.items():
        if isinstance(exc, source) and (target is None or issubclass(candidate, target)):
            target = candidate
    if target is None:
        return exc
    mapped = target(str(exc))
    mapped.__cause__ = exc
    return mapped


class _ConnectionCap(_WrappingBackend):
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
        return _CountedStream(stream, self._release)


def _is_readable(sock: socket.socket | None) -> bool:
    # As httpcore's own check: an idle connection whose socket is readable (or
    # closed) was closed by the server.
    if sock is None or sock.fileno() == -1:
        return True
    if not hasattr(select, "poll"):  # Windows
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


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
            if isinstance(self._stream, _AsyncioStream):
                return self._stream.get_extra_info(info)
            if self._socket is None:
                self._socket = self._stream.get_extra_info("socket")
            return _is_readable(self._socket)
        return self._stream.get_extra_info(info)


class _Origin:
    """The connections to one origin (scheme, host, port)."""

    __slots__ = ("connections", "idle", "in_flight")

    def __init__(self) -> None:
        self.connections: dict[httpcore.AsyncHTTPConnection, None] = {}
        """Every connection open or opening, idle or not."""
        self.idle: dict[httpcore.AsyncHTTPConnection, None] = {}
        """Idle connections, least recently used first (taken from the end: LIFO)."""
        self.in_flight = 0
        """Requests sent and not yet closed."""

    def drop(self, connection: httpcore.AsyncHTTPConnection) -> None:
        self.connections.pop(connection, None)
        self.idle.pop(connection, None)


_OriginKey = tuple[bytes, bytes, "int | None"]


class _OriginPoolsTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncHTTPTransport` without proxies, pooling connections per origin.

    The pool of each origin is a LIFO stack of idle `httpcore.AsyncHTTPConnection`
    objects: a request takes the most recently used idle connection (checking
    only that one for a server-side close), or opens a new one; its response,
    once closed, puts the connection back. Expired connections are closed from
    the other end of the stack. Each step is O(1) in the number of connections.

    httpcore's own `AsyncConnectionPool` rescans every connection and queued
    request whenever a request starts or a response closes (O(N^2 + N*M),
    encode/httpcore#1035), polling each idle socket: with 20 connections per
    host that was 40 % of the client's CPU time in a warm 100-call benchmark.

    The total is capped by `_ConnectionCap`, which all connections share and
    which calls `make_room` here; at most ``max_connections`` requests are in
    flight, so that a busy connection always frees one. The per-origin limit is
    `HostLimitTransport`'s, above this transport: with HTTP/1.1 an origin has at
    most as many connections as requests in flight, plus idle ones (at most
    ``max_idle_per_origin``).
    """

    def __init__(
        self,
        make_connection: Callable[[httpcore.Origin], httpcore.AsyncHTTPConnection],
        cap: _ConnectionCap,
        *,
        max_idle_per_origin: int,
        multiplexing: bool = False,
    ) -> None:
        self._make_connection = make_connection
        self.cap = cap
        cap.make_room = self.make_room
        self.max_connections = cap.max_connections
        self.max_idle_per_origin = max_idle_per_origin
        self._multiplexing = multiplexing  # HTTP/2: a busy connection may take more
        self.origins: dict[_OriginKey, _Origin] = {}  # least recently used first
        self._slots: anyio.Semaphore | None = None

    def connection_count(self) -> int:
        """Connections open now, idle or not, across all origins."""
        return self.cap.open_connections

    async def make_room(self) -> bool:
        """Close idle connections: all of the least recently used idle origin's,
        else the least recently used idle connection of a busy origin."""
        closing: list[httpcore.AsyncHTTPConnection] = []
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
        self, origin: _Origin, url: httpcore.URL, closing: list[httpcore.AsyncHTTPConnection]
    ) -> httpcore.AsyncHTTPConnection:
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
        if self._multiplexing:
            for connection in origin.connections:
                if connection.is_available():
                    return connection
        connection = self._make_connection(url.origin)
        origin.connections[connection] = None
        return connection

    def _checkin(
        self, origin: _Origin, connection: httpcore.AsyncHTTPConnection
    ) -> httpcore.AsyncHTTPConnection | None:
        """Keep ``connection`` for reuse if it is idle; the one to close, if any."""
        if connection.is_closed():
            origin.drop(connection)
        elif connection.is_idle():
            if len(origin.idle) < self.max_idle_per_origin:
                origin.idle[connection] = None
            else:
                origin.drop(connection)
                return connection
        return None  # busy (HTTP/2, other streams): its last response puts it back

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
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
        done = False

        async def finish(connection: httpcore.AsyncHTTPConnection | None) -> None:
            nonlocal done
            if done:
                return
            done = True
            surplus = None if connection is None else self._checkin(origin, connection)
            origin.in_flight -= 1
            if not origin.in_flight and not origin.connections and self.origins.get(key) is origin:
                del self.origins[key]
            slots.release()
            if surplus is not None:
                await _close([surplus])

        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        connection: httpcore.AsyncHTTPConnection | None = None
        try:
            while True:
                closing: list[httpcore.AsyncHTTPConnection] = []
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
            with anyio.CancelScope(shield=True):
                await finish(connection)
            if isinstance(exc, Exception):
                raise _httpx_error(exc)  # noqa: B904 (its cause is set: exc)
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_PooledStream(response.stream, connection, finish),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        origins, self.origins = list(self.origins.values()), {}
        await _close([c for origin in origins for c in origin.connections])


async def _close(connections: Iterable[httpcore.AsyncHTTPConnection]) -> None:
    """Close connections taken out of a pool, even under cancellation.

    An error closing one (a socket the peer already reset) is no concern of the
    request that found it stale: it is closed as far as the pool is concerned.
    """
    with anyio.CancelScope(shield=True):
        for connection in connections:
            with contextlib.suppress(Exception):
                await connection.aclose()


class _PooledStream(httpx.AsyncByteStream):
    """A response body from the pool: httpx errors; gives the connection back once closed."""

    def __init__(
        self,
        stream: Any,
        connection: httpcore.AsyncHTTPConnection,
        finish: Callable[[httpcore.AsyncHTTPConnection | None], Awaitable[None]],
    ) -> None:
        self._stream = stream
        self._connection = connection
        self._finish = finish
        self._releases: list[Callable[[], None]] = []

    def release_on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` once the response is closed (saves a stream layer)."""
        self._releases.append(release)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            await self.aclose()
            raise _httpx_error(exc)  # noqa: B904 (its cause is set: exc)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
        except Exception as exc:
            raise _httpx_error(exc)  # noqa: B904 (its cause is set: exc)
        finally:
            releases, self._releases = self._releases, []
            for release in releases:
                release()
            await self._finish(self._connection)


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

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
        _check_int("max_per_host", max_per_host, 1)
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
        assert isinstance(response.stream, httpx.AsyncByteStream)
        if isinstance(response.stream, _PooledStream):
            response.stream.release_on_close(release)
        else:
            response.stream = _ReleasingStream(response.stream, release)
        return response

    def _leave(self, key: tuple[bytes, bytes, int | None], slots: _HostSlots) -> None:
        # Forget hosts nobody uses, so that the table does not grow with every
        # host ever contacted.
        slots.users -= 1
        if slots.users == 0 and self._hosts.get(key) is slots:
            del self._hosts[key]

    async def aclose(self) -> None:
        await self.transport.aclose()


def _build_transport(
    config: HTTPClientConfig,
    *,
    resolver: Resolver | None,
    clock: Callable[[], float],
    verify: ssl.SSLContext | str | bool = True,
    cert: Any = None,
    trust_env: bool = True,
    http1: bool = True,
    http2: bool = False,
    local_address: str | None = None,
    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    retries: int = 0,
) -> HostLimitTransport:
    limits = config.limits
    per_host = config.max_connections_per_host
    keepalive = (
        per_host if limits.max_keepalive_connections is None else limits.max_keepalive_connections
    )
    ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    backend = DNSCacheBackend(config.dns_cache_ttl, resolver=resolver, clock=clock)

    cap = _ConnectionCap(backend, config.max_connections)

    def make_connection(origin: httpcore.Origin) -> httpcore.AsyncHTTPConnection:
        return httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=ssl_context,
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            local_address=local_address,
            network_backend=cap,
            socket_options=socket_options,
        )

    pools = _OriginPoolsTransport(
        make_connection, cap, max_idle_per_origin=min(per_host, keepalive), multiplexing=http2
    )
    return HostLimitTransport(pools, per_host)


def create_http_client(
    config: HTTPClientConfig | None = None,
    *,
    resolver: Resolver | None = None,
    clock: Callable[[], float] = time.monotonic,
    **httpx_kwargs: Any,
) -> httpx.AsyncClient:
    """A new `httpx.AsyncClient` on a pool configured by ``config``.

    ``resolver`` replaces the system resolver (``anyio.getaddrinfo``) and
    ``clock`` the monotonic clock of the DNS cache. Other keyword arguments go
    to `httpx.AsyncClient` (``base_url``, ``headers``, ``follow_redirects``...);
    ``verify``, ``cert``, ``trust_env``, ``http1``, ``http2``, ``local_address``,
    ``socket_options`` and ``retries`` configure the pool. The caller closes
    the client (``await client.aclose()`` or ``async with``).

    Raises:
        TypeError: ``transport``, ``limits``, ``timeout`` or ``proxy`` is given:
            they would bypass or contradict ``config``.
    """
    config = config or HTTPClientConfig()
    for name, reason in _REJECTED_KWARGS.items():
        if name in httpx_kwargs:
            raise TypeError(f"create_http_client() does not accept {name!r}: {reason}")
    transport_kwargs = {
        k: httpx_kwargs.pop(k) for k in list(httpx_kwargs) if k in _TRANSPORT_KWARGS
    }
    if "trust_env" in transport_kwargs:
        httpx_kwargs["trust_env"] = transport_kwargs["trust_env"]
    transport = _build_transport(config, resolver=resolver, clock=clock, **transport_kwargs)
    return httpx.AsyncClient(transport=transport, timeout=config.timeout, **httpx_kwargs)


# --------------------------------------------------------------------------- per-loop client

# A RunVar is scoped to the running event loop (asyncio or trio): each loop
# gets its own client, and a client never leaks into a loop it was not made on.
_shared_client: anyio.lowlevel.RunVar[httpx.AsyncClient | None] = anyio.lowlevel.RunVar(
    "sse_broadcaster.http.shared_client"
)


def get_http_client() -> httpx.AsyncClient:
    """The shared client of the running event loop, created on first use.

    Every call on the same loop returns the same client until
    `aclose_http_clients` closes it; another loop (another thread, or a later
    ``anyio.run``) gets its own. Close it when the application shuts down.

    Raises:
        RuntimeError: no event loop is running in this thread.
    """
    client = _shared_client.get(None)
    if client is None or client.is_closed:
        client = create_http_client()
        _shared_client.set(client)
    return client


async def aclose_http_clients() -> None:
    """Close the shared client of the running event loop, if there is one.

    The next `get_http_client` on this loop creates a new client. Clients of
    other event loops are not touched: each belongs to its own loop.

    Raises:
        RuntimeError: no event loop is running in this thread.
    """
    client = _shared_client.get(None)
    if client is None:
        return
    _shared_client.set(None)
    with anyio.CancelScope(shield=True):
        await client.aclose()
