"""The publishing connection: concurrent calls batched into pipelined writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, RedisError, ResponseError

from .._errors import BroadcasterClosedError
from ._frames import frame_reader, has_data, pack, stream_of

__all__ = ["Pipeline"]


class Pipeline:
    """Runs commands on one connection of its own, batching concurrent calls.

    Calls made while a batch is on the wire queue up and go out together in the
    next write, their replies read back in order: a lone caller pays one round
    trip as before, and many concurrent publishers share round trips instead of
    each taking a pooled connection and a round trip of its own. Nothing is ever
    retried: a broken connection fails every call in flight (whose commands may
    or may not have run) and the next batch opens a new one. A connection idle for
    longer than `idle_check` is pinged before it is used again, so that a
    connection a firewall or NAT dropped silently costs a reconnection, not a
    failed publish.
    """

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        idle_check: float,
        timeout: float,
        max_pending: int,
        max_pending_bytes: int,
    ) -> None:
        self._connect = connect
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._idle_check = idle_check
        self._timeout = timeout
        self._last_used = 0.0
        self._conn: AbstractConnection | None = None
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self.pending = 0  # calls queued or on the wire
        self.pending_bytes = 0  # their `size` arguments

    def refusal(self, size: int) -> str | None:
        """Why a call of `size` bytes would exceed the bounds on pending calls, else None.

        One call is always admitted when none is pending, whatever its size.
        """
        if self.pending and (
            self.pending >= self._max_pending or self.pending_bytes + size > self._max_pending_bytes
        ):
            return (
                f"{self.pending} publishes ({self.pending_bytes} bytes) already wait for Redis "
                f"(max_pending_publishes={self._max_pending}, "
                f"max_pending_publish_bytes={self._max_pending_bytes})"
            )
        return None

    async def call(self, *command: Any, size: int = 0) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        self.pending += 1
        self.pending_bytes += size
        try:
            return await future
        finally:
            self.pending -= 1
            self.pending_bytes -= size

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
                batch = [(c, f) for c, f in self._queue if not f.done()]
                self._queue = []
                if batch:
                    await self._send(batch)
        finally:
            for _, future in self._queue:
                if not future.done():
                    future.set_exception(BroadcasterClosedError("the backend is closed"))
            self._queue = []
            with anyio.CancelScope(shield=True):
                await self._close()

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            conn = self._conn
            if conn is not None:
                # Between batches nothing may be waiting on the connection: data or
                # end-of-file there means Redis closed it (CLIENT KILL, timeout,
                # restart), and a batch sent now would be lost for nothing.
                try:
                    stale = await has_data(conn)
                    if not stale and time.monotonic() - self._last_used > self._idle_check:
                        await conn.send_command("PING", check_health=False)
                        await conn.read_response(disconnect_on_error=False)
                except (RedisError, OSError):
                    stale = True
                if stale:
                    await self._close()
                    conn = None
            if conn is None:
                conn = self._connect()
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]
                except BaseException:
                    await conn.disconnect(nowait=True)
                    raise
                self._conn = conn
            self._last_used = time.monotonic()
            await conn.send_packed_command(
                pack([command for command, _ in batch]), check_health=False
            )
            stream = stream_of(conn)
            if stream is not None:
                # The replies of the batch, parsed from as few reads as they came in.
                frames = frame_reader()
                with anyio.fail_after(self._timeout):
                    for _, future in batch:
                        while (reply := frames.gets()) is False:
                            data = await stream.read(65536)
                            if not data:
                                raise ConnectionError("Connection closed by server.")
                            frames.feed(data)
                        if future.done():
                            continue
                        if isinstance(reply, ResponseError):
                            future.set_exception(reply)
                        else:
                            future.set_result(reply)
                if frames.gets() is not False:
                    raise InvalidResponse("more replies than commands from Redis")
            else:
                for _, future in batch:
                    try:
                        reply = await conn.read_response(disconnect_on_error=False)
                    except ResponseError as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(reply)
        except Exception as exc:  # a Redis or socket error, or a bug: fail the batch, go on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
