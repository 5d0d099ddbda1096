"""One HTTP/1.1 connection of the pool: connect, then httpcore's HTTP/1.1 connection.

`httpcore.AsyncHTTPConnection` connects on its first request and then hands
every request to an `httpcore.AsyncHTTP11Connection` (or HTTP/2 one), under a
lock taken per request. The lock guards the connect against concurrent
requests, which the pool never makes: an HTTP/1.1 connection is checked out by
one request at a time. Taking it still costs an event loop iteration per
request (anyio's lock checkpoints), so for HTTP/1.1 only the pool uses
`HTTP11Connection`: the same connect (retries, TLS, SNI, ``trace`` events and
``httpcore.connection`` debug logs), no lock.
"""

from __future__ import annotations

import inspect
import logging
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore

__all__ = ["HTTP11Connection"]

_logger = logging.getLogger("httpcore.connection")  # httpcore's, as AsyncHTTPConnection's
_RETRIES_BACKOFF_FACTOR = 0.5  # httpcore's


def _backoff() -> Iterator[float]:
    """httpcore's delays between connect attempts: 0, 0.5, 1, 2, 4..."""
    yield 0
    delay = _RETRIES_BACKOFF_FACTOR
    while True:
        yield delay
        delay *= 2


class _Trace:
    """httpcore's ``trace`` extension events and debug logs for one connect step."""

    def __init__(self, name: str, request: httpcore.Request, info: dict[str, Any]) -> None:
        self._name = name
        self._extension = request.extensions.get("trace")
        self._debug = _logger.isEnabledFor(logging.DEBUG)
        self._info = info
        self.return_value: Any = None

    async def _emit(self, name: str, info: dict[str, Any]) -> None:
        if self._extension is not None:
            result = self._extension(f"connection.{name}", info)
            if not inspect.iscoroutine(result):
                raise TypeError(
                    "the callback of the `trace` extension must be an async function "
                    "with an async client"
                )
            await result
        if self._debug:
            if not info or ("return_value" in info and info["return_value"] is None):
                _logger.debug(name)
            else:
                _logger.debug(f"{name} " + " ".join(f"{k}={v!r}" for k, v in info.items()))

    async def __aenter__(self) -> _Trace:
        if self._extension is not None or self._debug:
            await self._emit(f"{self._name}.started", self._info)
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._extension is not None or self._debug:
            if exc is None:
                await self._emit(f"{self._name}.complete", {"return_value": self.return_value})
            else:
                await self._emit(f"{self._name}.failed", {"exception": exc})


class HTTP11Connection(httpcore.AsyncConnectionInterface):
    """`httpcore.AsyncHTTPConnection` with ``http1=True, http2=False``, without its
    per-request lock: for a pool that gives a connection to one request at a time."""

    def __init__(
        self,
        origin: httpcore.Origin,
        *,
        network_backend: httpcore.AsyncNetworkBackend,
        ssl_context: ssl.SSLContext,
        keepalive_expiry: float | None,
        retries: int = 0,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> None:
        self._origin = origin
        self._backend = network_backend
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._retries = retries
        self._local_address = local_address
        self._socket_options = socket_options
        self._connection: httpcore.AsyncHTTP11Connection | None = None
        self._connecting = False
        self._connect_failed = False

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        connection = self._connection
        if connection is None:
            if self._connecting or self._connect_failed:
                raise httpcore.ConnectionNotAvailable()
            self._connecting = True
            try:
                stream = await self._connect(request)
            except BaseException:
                self._connect_failed = True
                raise
            finally:
                self._connecting = False
            connection = self._connection = httpcore.AsyncHTTP11Connection(
                origin=self._origin, stream=stream, keepalive_expiry=self._keepalive_expiry
            )
        return await connection.handle_async_request(request)

    async def _connect(self, request: httpcore.Request) -> httpcore.AsyncNetworkStream:
        timeout = request.extensions.get("timeout", {}).get("connect")
        sni_hostname = request.extensions.get("sni_hostname")
        host = self._origin.host.decode("ascii")
        retries_left = self._retries
        delays = _backoff()
        while True:
            info: dict[str, Any] = {
                "host": host,
                "port": self._origin.port,
                "local_address": self._local_address,
                "timeout": timeout,
                "socket_options": self._socket_options,
            }
            try:
                async with _Trace("connect_tcp", request, info) as trace:
                    stream = await self._backend.connect_tcp(**info)
                    trace.return_value = stream
                if self._origin.scheme in (b"https", b"wss"):
                    # Set at each connect, as httpcore does: the context may be
                    # shared with a client that offers h2.
                    self._ssl_context.set_alpn_protocols(["http/1.1"])
                    info = {
                        "ssl_context": self._ssl_context,
                        "server_hostname": sni_hostname or host,
                        "timeout": timeout,
                    }
                    async with _Trace("start_tls", request, info) as trace:
                        stream = await stream.start_tls(**info)
                        trace.return_value = stream
                return stream
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                if retries_left <= 0:
                    raise
                retries_left -= 1
                async with _Trace("retry", request, info):
                    await self._backend.sleep(next(delays))

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return origin == self._origin

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.aclose()

    def is_available(self) -> bool:
        return self._connection is not None and self._connection.is_available()

    def has_expired(self) -> bool:
        if self._connection is None:
            return self._connect_failed
        return self._connection.has_expired()

    def is_idle(self) -> bool:
        if self._connection is None:
            return self._connect_failed
        return self._connection.is_idle()

    def is_closed(self) -> bool:
        if self._connection is None:
            return self._connect_failed
        return self._connection.is_closed()

    def info(self) -> str:
        if self._connection is None:
            return "CONNECTION FAILED" if self._connect_failed else "CONNECTING"
        return self._connection.info()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{self.info()}]>"
