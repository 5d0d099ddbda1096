"""`DNSCacheBackend`: name resolution through an injectable resolver, cached for a TTL.

httpx has no DNS cache: each new connection resolves its host again. This
network backend resolves before it connects and keeps the answers.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio
import httpcore

from .._validation import check_seconds
from ._backends import NativeBackend, WrappingBackend

__all__ = ["DNSCacheBackend", "Resolver"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``async resolve(host, port) -> addresses``: IP address strings, best first."""


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class DNSCacheBackend(WrappingBackend):
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
        check_seconds("ttl", ttl)
        self._ttl = float(ttl)
        self._resolver: Resolver = resolver or _getaddrinfo
        self._clock = clock
        self._backend = backend or NativeBackend()
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
