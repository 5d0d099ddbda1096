"""httpcore network backends: a wrapping base and the native backend.

On asyncio the native backend reads and writes through asyncio transports
directly (httpcore's AnyIO backend, used on trio, enters a cancel scope per
read and write). The other backends of the package wrap it.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, cast

import anyio
import httpcore

__all__ = ["AsyncioStream", "NativeBackend", "WrappingBackend", "is_readable"]


class WrappingBackend(httpcore.AsyncNetworkBackend):
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


def is_readable(sock: socket.socket | None) -> bool:
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


class AsyncioStream(httpcore.AsyncNetworkStream):
    """An httpcore network stream on an asyncio transport and protocol.

    A read returns what is buffered without suspending; a write hands the bytes
    to the transport and waits only while the transport's buffer is full. A
    timeout is a timer on the one future a waiting call awaits. httpcore's AnyIO
    stream instead enters a cancel scope and checkpoints on every read and write.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _AsyncioProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._on_close: Callable[[], None] | None = None

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the stream is closed or its TLS handshake fails.

        `ConnectionCap` counts open connections so, without wrapping the
        stream in one more layer that every read and write would go through.
        """
        self._on_close = callback

    def _closed(self) -> None:
        if self._on_close is not None:
            callback, self._on_close = self._on_close, None
            callback()

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
        try:
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
        finally:
            self._closed()

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
            self._closed()
            if isinstance(exc, TimeoutError):
                raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
            if isinstance(exc, OSError):  # ssl.SSLError included
                raise httpcore.ConnectError(str(exc)) from exc
            raise
        tls = cast("asyncio.Transport", transport)  # None only for a server-side protocol
        self._protocol.transport = tls
        stream = AsyncioStream(tls, self._protocol)
        stream._on_close, self._on_close = self._on_close, None
        return stream

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            protocol = self._protocol
            return (
                bool(protocol.buffer)
                or protocol.eof
                or self._transport.is_closing()
                or is_readable(self._transport.get_extra_info("socket"))
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


class NativeBackend(WrappingBackend):
    """`AsyncioStream` on asyncio, httpcore's AnyIO backend elsewhere (trio)."""

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
        return AsyncioStream(transport, protocol)
