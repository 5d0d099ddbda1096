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

Under them, a small pool per origin of httpcore connections (idle ones reused
most recent first, in O(1): httpcore's own pool rescans all its connections at
every request; for HTTP/1.1, `httpcore.AsyncHTTP11Connection`s connected here,
without `httpcore.AsyncHTTPConnection`'s per-request lock), all sharing one
network backend that caps the connections open in total and closes idle ones
of other hosts to make room.
On asyncio that backend reads and writes through asyncio transports directly
(httpcore's AnyIO backend, used on trio, enters a cancel scope per read and
write). A small transport converts between httpx and httpcore the way
`httpx.AsyncHTTPTransport` does (which has no parameter for a network
backend). Only public httpx and httpcore API is used.

This module is the public face; the pieces live in the private package
``sse_broadcaster._http``, one concern per module.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from ._http._connection import HTTP11Connection
from ._http._dns import DNSCacheBackend, Resolver
from ._http._limits import ConnectionCap, HostLimitTransport
from ._http._loops import aclose_shared_clients, get_shared_client
from ._http._pool import OriginPoolsTransport
from ._validation import check_int, check_seconds

__all__ = [
    "DNSCacheBackend",
    "HTTPClientConfig",
    "HostLimitTransport",
    "Resolver",
    "aclose_http_clients",
    "create_http_client",
    "get_http_client",
]

# Defined in sse_broadcaster._http; public here, and named so in reprs and docs.
DNSCacheBackend.__module__ = __name__
HostLimitTransport.__module__ = __name__

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
        check_int("max_connections", self.max_connections, 1)
        check_int("max_connections_per_host", self.max_connections_per_host, 1)
        if self.max_connections_per_host > self.max_connections:
            raise ValueError(
                f"max_connections_per_host must be <= max_connections "
                f"({self.max_connections}), got {self.max_connections_per_host!r}"
            )
        if self.max_keepalive_connections is not None:
            check_int("max_keepalive_connections", self.max_keepalive_connections, 0)
        check_seconds("keepalive_expiry", self.keepalive_expiry, optional=True)
        check_seconds("dns_cache_ttl", self.dns_cache_ttl)
        for name in ("connect_timeout", "read_timeout", "write_timeout", "pool_timeout"):
            check_seconds(name, getattr(self, name), optional=True, positive=True)

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
    per_host = config.max_connections_per_host
    keepalive = config.max_keepalive_connections
    # None keeps up to the per-host limit idle per origin; more could never be
    # idle at once, since an origin has no more requests in flight.
    max_idle = per_host if keepalive is None else min(per_host, keepalive)
    ssl_context = httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)
    backend = DNSCacheBackend(config.dns_cache_ttl, resolver=resolver, clock=clock)

    cap = ConnectionCap(backend, config.max_connections)

    def make_connection(origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        if not http2:
            return HTTP11Connection(
                origin,
                network_backend=cap,
                ssl_context=ssl_context,
                keepalive_expiry=config.keepalive_expiry,
                retries=retries,
                local_address=local_address,
                socket_options=socket_options,
            )
        return httpcore.AsyncHTTPConnection(
            origin=origin,
            ssl_context=ssl_context,
            keepalive_expiry=config.keepalive_expiry,
            http1=http1,
            http2=http2,
            retries=retries,
            local_address=local_address,
            network_backend=cap,
            socket_options=socket_options,
        )

    pools = OriginPoolsTransport(
        make_connection, cap, max_idle_per_origin=max_idle, multiplexing=http2
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


def get_http_client() -> httpx.AsyncClient:
    """The shared client of the running event loop, created on first use.

    Every call on the same loop returns the same client until it is closed
    (by `aclose_http_clients`, or directly); another loop (another thread, or
    a later ``anyio.run``) gets its own. Safe to call from several threads.

    Raises:
        RuntimeError: no event loop (asyncio or trio) is running in this thread.
    """
    return get_shared_client(create_http_client)


async def aclose_http_clients() -> None:
    """Close the shared clients of every event loop; call it at shutdown.

    The running loop's client is closed here. A client of another loop that
    is running (in another thread) is closed on that loop, where its
    connections belong: the call hands it over thread-safely and waits until
    it is closed (cancel the call to stop waiting; the close still happens).
    A client of a loop that has ended (closed, or a finished trio run) is
    forgotten: nothing can run its close any more, so close your client
    before its loop ends. A client of an asyncio loop that exists but is not
    running at the moment is kept; a later call, made while that loop runs,
    closes it. After it, `get_http_client` creates new clients.

    Raises:
        RuntimeError: no event loop (asyncio or trio) is running in this thread.
    """
    await aclose_shared_clients()
