"""`RedisBackend`: validation, life cycle and the `Backend` API.

The moving parts live beside it: `_follower` (the Pub/Sub connection, attach
and recovery) over `_sessions` (the followed sessions they share), `_pipeline`
(the publishing connection), `_scripts` (the Lua scripts and the entry codec),
`_sweeps` (what sweeps do and count) and `_frames` (RESP2 packing and parsing).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from .._errors import BackendUnavailableError, BroadcasterClosedError, EventTooLargeError
from .._event import Event
from ..backends._base import BackendCounts, BackendHub, Replay, SweepResult
from ._follower import Follower
from ._pipeline import Pipeline
from ._run_store import RedisRunStore
from ._scripts import PROBE_ID, Streams, decode_entries, parse_id
from ._sessions import Sessions
from ._sweeps import Sweeps

__all__ = ["RedisBackend"]

logger = logging.getLogger("sse_broadcaster")

# Rough per-session cost of this process's share (the events live in Redis).
_SESSION_OVERHEAD = 700


class RedisBackend:
    """Sessions in Redis, shared by every process that uses the same Redis and prefix.

    Event ids are stream ids (``"<ms>-<seq>"``) and each entry stores its
    predecessor's id, so a gap is detected exactly: a client's id that is not the
    predecessor of the first entry after it (trimmed, expired, or from before Redis
    lost its data) replays what is retained with ``gap`` set.

    The backend owns its connections and their recovery rather than relying on
    redis-py's: its connections never retry a command (a retried publish script
    could store an event twice) and its Pub/Sub connection is a plain connection
    that it resubscribes itself. After a lost connection it reconnects with
    backoff, resubscribes, waits for the confirmations, then reads each followed
    session's stream from the last id it delivered, so no acknowledged event is
    lost while history holds it. If that history is gone, the session's local
    subscriptions end with `GapError`.

    While Redis is unreachable `publish` raises `BackendUnavailableError`, and
    new subscriptions wait up to `attach_timeout` for it before raising the same.

    Args:
        url: a redis-py URL (``redis://``, ``rediss://``, ``unix://``).
        client: a ``redis.asyncio.Redis`` whose connection settings (host, TLS,
            credentials, database) are used instead of `url`. The backend opens
            its own connections with them, without redis-py's retries; the client
            itself is neither used nor closed.
        prefix: the start of every key and channel: ``{prefix}:s:{session}`` (the
            stream) and ``{prefix}:c:{session}`` (the channel).
        connect_timeout: seconds to open a connection; also how long `start` waits
            for the first one (it then keeps trying in the background).
        socket_timeout: seconds a command may take before Redis counts as unreachable.
        attach_timeout: seconds a new subscription waits for an unreachable Redis.
        health_check_interval: seconds of silence on the Pub/Sub connection after
            which it is pinged; three intervals without a byte count as a lost
            connection.
        min_backoff: first delay between reconnection attempts (doubling, jittered).
        max_backoff: longest delay between reconnection attempts.
        max_buffered_messages: Pub/Sub messages buffered per session while its
            stream is read (attach, recovery). Past it the session's buffer is
            dropped and its stream read again from the last delivered id: lossless
            while history holds the events, `GapError` for its subscriptions
            otherwise.
        max_buffered_bytes: the same, in bytes of those messages across all
            sessions (200 bytes counted per message on top of its payload).
        max_pending_publishes: publishes of this process waiting for Redis (queued
            or on the wire); more raise `BackendUnavailableError` at once.
        max_pending_publish_bytes: the data bytes of those publishes; a publish that
            would exceed it while others wait raises the same.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        prefix: str = "sse",
        connect_timeout: float = 5.0,
        socket_timeout: float = 5.0,
        attach_timeout: float = 5.0,
        health_check_interval: float = 15.0,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        max_buffered_messages: int = 1000,
        max_buffered_bytes: int = 64 * 1024 * 1024,
        max_pending_publishes: int = 10_000,
        max_pending_publish_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("pass exactly one of url and client")
        if url is not None and not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"prefix must be a non-empty str without whitespace, got {prefix!r}")
        _check_options(
            {
                "connect_timeout": connect_timeout,
                "socket_timeout": socket_timeout,
                "attach_timeout": attach_timeout,
                "health_check_interval": health_check_interval,
                "min_backoff": min_backoff,
                "max_backoff": max_backoff,
            },
            {
                "max_buffered_messages": max_buffered_messages,
                "max_buffered_bytes": max_buffered_bytes,
                "max_pending_publishes": max_pending_publishes,
                "max_pending_publish_bytes": max_pending_publish_bytes,
            },
        )
        if max_backoff < min_backoff:
            raise ValueError(
                f"max_backoff must be >= min_backoff={min_backoff!r}, got {max_backoff!r}"
            )
        self._url = url
        self._source_client = client
        self._prefix = prefix
        self._stream_prefix = f"{prefix}:s:"
        self._channel_prefix = f"{prefix}:c:"
        self._connect_timeout = float(connect_timeout)
        self._socket_timeout = float(socket_timeout)
        self._attach_timeout = float(attach_timeout)
        self._health_interval = float(health_check_interval)

        self._hub: BackendHub | None = None
        self._pool: ConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._streams: Streams | None = None
        self._pipeline = Pipeline(
            self._connect,
            self._health_interval,
            self._socket_timeout,
            max_pending_publishes,
            max_pending_publish_bytes,
        )
        self._pipeline_task: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._sessions = Sessions(
            stream_prefix=self._stream_prefix,
            channel_prefix=self._channel_prefix,
            max_buffered_messages=max_buffered_messages,
            max_buffered_bytes=max_buffered_bytes,
        )
        self._follower = Follower(
            self._sessions,
            self._read_many,
            health_interval=self._health_interval,
            min_backoff=float(min_backoff),
            max_backoff=float(max_backoff),
        )
        self._sweeps = Sweeps()
        self._run_store: RedisRunStore | None = None

        # figures for stats()
        self._published = 0
        self._publish_failures = 0
        self._publishes_refused = 0

    def __repr__(self) -> str:
        state = "connected" if self._follower.connected else "disconnected"
        sessions = len(self._sessions.sessions)
        return f"<RedisBackend prefix={self._prefix!r} {state} sessions={sessions}>"

    # -- life cycle ----------------------------------------------------------------------

    async def start(self, hub: BackendHub) -> None:
        """Open the connections and start following Redis.

        Waits up to ``connect_timeout`` for the first connection; if Redis is not
        reachable yet it keeps trying in the background (publishes raise
        `BackendUnavailableError` meanwhile).

        Raises:
            RuntimeError: not running on asyncio, or started twice.
        """
        if self._hub is not None or self._closed:
            raise RuntimeError("a RedisBackend serves one EventBroadcaster, once")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "RedisBackend runs on asyncio only (redis-py's client is asyncio-only); "
                "run the broadcaster on asyncio, e.g. anyio.run(main, backend='asyncio')"
            ) from None
        self._hub = hub
        self._pool = _connection_pool(
            self._url, self._source_client, self._connect_timeout, self._socket_timeout
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._streams = Streams(self._client, self._stream_prefix, f"{self._prefix}:r:")
        # The reader lives from start to aclose, which may run in different tasks, so
        # no task group can bracket it; the backend is asyncio-only anyway.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(
            self._follower.run(hub, self._connect), name="sse_broadcaster redis reader"
        )
        self._pipeline_task = loop.create_task(
            self._pipeline.run(), name="sse_broadcaster redis publisher"
        )
        follower = self._follower
        with anyio.move_on_after(self._connect_timeout):
            while not follower.connected:
                await self._sessions.wait_changed()
        if not follower.connected:
            logger.warning(
                "Redis is not reachable yet (%s); retrying in the background", follower.last_error
            )

    async def aclose(self) -> None:
        """Stop following Redis and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._follower.close()
        tasks = [t for t in (self._task, self._pipeline_task) if t is not None]
        self._task = self._pipeline_task = None
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # pragma: no cover - the tasks handle their errors
                    logger.exception("a Redis task failed")
            if self._client is not None:
                await self._client.aclose()
            if self._pool is not None:
                await self._pool.disconnect()
        self._sessions.clear()

    def _connect(self) -> AbstractConnection:
        """A new connection of the pool's class and settings, outside the pool."""
        pool = self._pool
        assert pool is not None
        return pool.connection_class(**pool.connection_kwargs)

    def _require_hub(self) -> BackendHub:
        if self._hub is None or self._closed:
            raise BroadcasterClosedError("the backend is not running")
        return self._hub

    def _running(self) -> tuple[BackendHub, Streams]:
        hub = self._require_hub()
        assert self._streams is not None
        return hub, self._streams

    async def _read_many(self, cursors: Sequence[tuple[str, str]]) -> list[Any]:
        """The recovery's reads (`ReadStreams`)."""
        assert self._streams is not None
        return await self._streams.read_many(cursors)

    def _stream(self, session_id: str) -> str:
        return self._stream_prefix + session_id

    def _ttl_ms(self, hub: BackendHub) -> int:
        ttl = hub.config.event_ttl
        return 0 if ttl is None else max(1, math.ceil(ttl * 1000))

    # -- Backend ------------------------------------------------------------------------

    async def publish(
        self, session_id: str, data: str, event: str | None, retry: int | None
    ) -> Event:
        """Store the event in the session's stream and publish it, in one script.

        Raises:
            EventTooLargeError: the encoded event exceeds ``max_event_bytes`` (the
                id counted as 15 characters).
            BackendUnavailableError: Redis could not be reached or refused the
                script. When the connection broke after the script was sent, the
                event may have been stored all the same (the reply was lost).
        """
        hub, streams = self._running()
        config = hub.config
        timestamp = hub.clock()
        probe = Event(PROBE_ID, session_id, data, event, retry, timestamp)
        if probe.size > config.max_event_bytes:
            raise EventTooLargeError(
                f"event of {probe.size} bytes encoded exceeds "
                f"max_event_bytes={config.max_event_bytes}"
            )
        pipeline = self._pipeline
        size = len(data)
        refusal = pipeline.refusal(size)
        if refusal is not None:
            self._publishes_refused += 1
            raise BackendUnavailableError(f"could not publish to session {session_id!r}: {refusal}")
        stream = self._stream(session_id)
        command = streams.publish_command(
            stream,
            self._channel_prefix + session_id,
            data,
            event,
            retry,
            timestamp,
            max(1, config.max_history_per_session),
            self._ttl_ms(hub),
            max(1, math.ceil(config.session_ttl * 1000)),
            config.max_run_events,
            config.max_run_bytes + 2 * config.max_event_bytes,
        )
        try:
            try:
                event_id = await pipeline.call(*command, size=size)
            except NoScriptError:
                # Redis restarted or its script cache was flushed: the script did not
                # run, so loading it and sending the call again cannot duplicate it.
                await streams.load_publish()
                event_id = await pipeline.call(*command, size=size)
        except (RedisError, OSError) as exc:
            self._publish_failures += 1
            raise BackendUnavailableError(
                f"could not publish to session {session_id!r}: Redis is unavailable "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self._published += 1
        self._sweeps.expiries.renewed(stream, time.monotonic() + config.session_ttl)
        return Event(event_id.decode(), session_id, data, event, retry, timestamp)

    async def attach(
        self, session_id: str, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay:
        """Follow the session's channel and compute the replay up to the cursor.

        Raises:
            SessionLimitError: this process already follows ``max_sessions`` sessions.
            BackendUnavailableError: Redis stayed unreachable for ``attach_timeout``.
        """
        hub, streams = self._running()
        ttl_ms = self._ttl_ms(hub)
        refresh_ms = max(1, math.ceil(hub.config.session_ttl * 1000))
        fetch = last_event_id is not None

        async def read(key: str, after: str, upto: str) -> tuple[str, bool, list[Any]]:
            return await streams.read(key, after, upto, ttl_ms, refresh_ms, fetch)

        try:
            with anyio.fail_after(self._attach_timeout):
                return await self._follower.attach(hub, session_id, last_event_id, register, read)
        except TimeoutError:
            raise BackendUnavailableError(
                f"could not subscribe to session {session_id!r}: Redis was unavailable for "
                f"{self._attach_timeout} s ({self._follower.last_error})"
            ) from None

    async def detach(self, session_id: str) -> None:
        live = self._sessions.sessions.get(session_id)
        hub = self._hub
        if live is None or hub is None or live.attaching or hub.has_subscribers(session_id):
            return
        self._sessions.drop(live)

    async def history(self, session_id: str, after: str | None) -> list[Event]:
        """Retained events of the session after `after` (all when None or unknown).

        Raises:
            BackendUnavailableError: Redis could not be reached.
        """
        hub, streams = self._running()
        if after is not None and parse_id(after) is None:
            after = None
        try:
            _, _, entries = await streams.read(
                self._stream(session_id), after or "", "", self._ttl_ms(hub), 0, True
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not read session {session_id!r}: Redis is unavailable ({exc})"
            ) from exc
        if not hub.config.max_history_per_session:
            return []
        return decode_entries(session_id, entries)

    async def close_session(self, session_id: str) -> bool:
        """Delete the session's stream and end its subscriptions on every process.

        Raises:
            BackendUnavailableError: Redis could not be reached.
        """
        _, streams = self._running()
        try:
            existed = await streams.close(
                self._stream(session_id), self._channel_prefix + session_id
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not close session {session_id!r}: Redis is unavailable ({exc})"
            ) from exc
        self._sweeps.expiries.forget(self._stream(session_id))
        await self._sessions.wait_closed(session_id, self._socket_timeout)
        return existed

    async def sweep(self) -> SweepResult:
        """Keep followed sessions from expiring, count what expired, refresh `counts`.

        Redis trims and expires history itself; a session with a subscriber on this
        process gets its ``session_ttl`` renewed here, as the in-memory backend
        keeps sessions that have subscribers, and the events of its stream that
        aged out are trimmed and counted. Streams this process kept alive that
        are past their expiry are looked up, and counted when gone. Cost: one
        pipelined round trip.
        """
        hub = self._require_hub()
        if self._streams is None:
            return SweepResult()
        table = self._sessions
        # Sessions followed with no local subscriber left (their subscriptions ended
        # without a detach reaching here) stop being followed.
        for live in list(table.sessions.values()):
            if not live.attaching and not hub.has_subscribers(live.session_id):
                table.drop(live)
        keys = [live.key for live in table.sessions.values() if live.cursor is not None]
        return await self._sweeps.run(
            self._streams, keys, hub.config.session_ttl, self._ttl_ms(hub)
        )

    def run_store(self) -> RedisRunStore:
        """The store of resumable runs, shared through Redis (made once it is started)."""
        hub = self._require_hub()
        if self._run_store is None:
            assert self._client is not None
            self._run_store = RedisRunStore(
                self._client, self._prefix, hub.config, self._health_interval
            )
        return self._run_store

    def counts(self) -> BackendCounts:
        """Sessions followed here, their retained events at the last sweep, bytes held here.

        O(1) and local: history lives in Redis, so the event count covers the
        sessions this process follows, as of the last sweep, and the bytes are
        this process's own bookkeeping (Redis memory is ``stats()['usedMemory']``).
        """
        table = self._sessions
        estimate = (
            len(table.sessions) * _SESSION_OVERHEAD + table.pending_bytes + self._sweeps.held_bytes
        )
        return BackendCounts(len(table.sessions), self._sweeps.retained, estimate)

    def stats(self) -> dict[str, object]:
        follower, table = self._follower, self._sessions
        return {
            "type": "redis",
            "connected": follower.connected,
            "reconnects": follower.reconnects,
            "recoveredEvents": follower.recovery.recovered,
            "gapsSignalled": follower.recovery.live_gaps,
            "followedSessions": len(table.sessions),
            "published": self._published,
            "publishFailures": self._publish_failures,
            "messagesReceived": follower.received,
            "duplicatesDropped": table.duplicates,
            "pendingMessages": table.pending_total,
            "pendingBytes": table.pending_bytes,
            "bufferOverflows": table.overflows,
            "pendingPublishes": self._pipeline.pending,
            "publishesRefused": self._publishes_refused,
            "lastRecoverySeconds": follower.recovery.last,
            "usedMemory": self._sweeps.redis_memory,
            "lastError": follower.last_error,
        }


def _check_options(seconds: dict[str, object], sizes: dict[str, object]) -> None:
    """Seconds must be numbers > 0, counts and sizes ints >= 1; the error names the option."""
    for name, value in seconds.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _connection_pool(
    url: str | None, client: aioredis.Redis | None, connect_timeout: float, socket_timeout: float
) -> ConnectionPool:
    """The pool the backend's connections are made from: the URL's or the client's settings."""
    overrides: dict[str, Any] = {
        # Our own loops retry; a retried EVALSHA of the publish script could
        # store an event twice, and a retried read would hide the outage.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_error": [],
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "decode_responses": False,
        "health_check_interval": 0,
        # Pub/Sub messages as plain RESP2 arrays (no RESP3 push handling needed).
        "protocol": 2,
    }
    if url is not None:
        return ConnectionPool.from_url(url, **overrides)
    assert client is not None
    source = client.connection_pool
    kwargs = {
        k: v
        for k, v in source.connection_kwargs.items()
        if not k.startswith(("maint_notifications", "orig_")) and k not in ("himport_registry",)
    }
    kwargs.update(overrides)
    return ConnectionPool(connection_class=source.connection_class, **kwargs)
