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

Under them, one `httpcore.AsyncConnectionPool` per origin (httpcore's pool
slows down quadratically with its number of connections), all sharing one
network backend that caps the connections open in total and closes idle ones
of other hosts to make room. A small transport converts between httpx and
httpcore the way `httpx.AsyncHTTPTransport` does (which has no parameter for a
network backend). Only public httpx and httpcore API is used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


class DNSCacheBackend(httpcore.AsyncNetworkBackend):
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
        self._backend = backend or httpcore.AnyIOBackend()
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


@contextlib.contextmanager
def _map_httpcore_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        target: type[httpx.TransportError] | None = None
        for source, candidate in _HTTPCORE_TO_HTTPX.items():
            if isinstance(exc, source) and (target is None or issubclass(candidate, target)):
                target = candidate
        if target is None:
            raise
        raise target(str(exc)) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _map_httpcore_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        with _map_httpcore_errors():
            await self._stream.aclose()


_Origin = tuple[bytes, bytes, "int | None"]


def _origin(url: httpx.URL) -> _Origin:
    return (url.raw_scheme, url.raw_host, url.port)


class _ConnectionCap(httpcore.AsyncNetworkBackend):
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
            if self._socket is None:
                self._socket = self._stream.get_extra_info("socket")
            return _is_readable(self._socket)
        return self._stream.get_extra_info(info)


class _OriginPoolsTransport(httpx.AsyncBaseTransport):
    """`httpx.AsyncHTTPTransport` without proxies, on one httpcore pool per origin.

    httpcore's pool scans all its connections for every idle connection each
    time it assigns a request (quadratic: a warm pool of 100 connections made
    100 parallel calls 5x slower than a cold one). Pools of one origin each
    stay small. The total is capped by `_ConnectionCap`, which all the pools
    share and which calls `make_room` here; at most ``max_connections``
    requests are in flight, so that a busy connection always frees one.
    """

    def __init__(
        self,
        make_pool: Callable[[], httpcore.AsyncConnectionPool],
        cap: _ConnectionCap,
    ) -> None:
        self._make_pool = make_pool
        self.cap = cap
        cap.make_room = self.make_room
        self.max_connections = cap.max_connections
        self.pools: dict[_Origin, httpcore.AsyncConnectionPool] = {}  # least recent first
        self._busy: dict[_Origin, int] = {}
        self._slots: anyio.Semaphore | None = None

    def connection_count(self) -> int:
        """Connections open now, idle or not, across all origins."""
        return self.cap.open_connections

    async def make_room(self) -> bool:
        """Close an idle connection, the least recently used host's first."""
        with anyio.CancelScope(shield=True):
            unused = next((key for key in self.pools if key not in self._busy), None)
            if unused is not None:
                pool = self.pools.pop(unused)
                if pool.connections:
                    await pool.aclose()
                    return True
            for pool in self.pools.values():
                for conn in pool.connections:
                    if conn.is_idle():
                        await conn.aclose()  # its pool drops closed connections itself
                        return True
        return unused is not None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._slots is None:  # created on first use: it needs a running loop
            self._slots = anyio.Semaphore(self.max_connections)
        slots = self._slots
        try:
            with anyio.fail_after(request.extensions.get("timeout", {}).get("pool")):
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(
                f"timed out waiting for one of {self.max_connections} connections",
                request=request,
            ) from None
        key = _origin(request.url)
        self._busy[key] = self._busy.get(key, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slots.release()
                self._busy[key] -= 1
                if not self._busy[key]:
                    del self._busy[key]

        try:
            pool = self.pools.pop(key, None) or self._make_pool()
            self.pools[key] = pool  # now the most recently used
            core_request = httpcore.Request(
                method=request.method,
                url=httpcore.URL(
                    scheme=request.url.raw_scheme,
                    host=request.url.raw_host,
                    port=request.url.port,
                    target=request.url.raw_path,
                ),
                headers=request.headers.raw,
                content=request.stream,
                extensions=request.extensions,
            )
            with _map_httpcore_errors():
                response = await pool.handle_async_request(core_request)
        except BaseException:
            release()
            raise
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ReleasingStream(_ResponseStream(response.stream), release),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        with _map_httpcore_errors():
            for pool in pools:
                await pool.aclose()


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
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, release),
            extensions=response.extensions,
        )

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

    def make_pool() -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=per_host,
            max_keepalive_connections=min(per_host, keepalive),
            keepalive_expiry=limits.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            local_address=local_address,
            network_backend=cap,
            socket_options=socket_options,
        )

    return HostLimitTransport(_OriginPoolsTransport(make_pool, cap), per_host)


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
