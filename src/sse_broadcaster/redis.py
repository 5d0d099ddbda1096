"""A Redis backend: several processes or machines serve the same sessions.

::

    from sse_broadcaster import EventBroadcaster
    from sse_broadcaster.redis import RedisBackend

    broadcaster = EventBroadcaster(config, backend=RedisBackend("redis://127.0.0.1:6379/0"))

History lives in one Redis Stream per session, trimmed by count
(``max_history_per_session``) and age (``event_ttl``) and expiring with
``session_ttl``; live events reach every process through Pub/Sub, and a process
subscribes only to the sessions it has local subscribers for. A publish is one
Lua script (XADD, the trims, PEXPIRE, PUBLISH), so the event id is the stream
id and a client may resume on any node.

Needs the ``redis`` extra: ``pip install 'sse-broadcaster[redis]'``. Runs on
asyncio only (redis-py's client is asyncio-only).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio

try:
    import redis.asyncio as aioredis
    from redis._parsers.base import BaseParser
    from redis.asyncio.connection import AbstractConnection, ConnectionPool
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import InvalidResponse, NoScriptError, RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "sse_broadcaster.redis needs redis-py: pip install 'sse-broadcaster[redis]'"
    ) from exc

from ._errors import (
    BackendUnavailableError,
    BroadcasterClosedError,
    EventTooLargeError,
    GapError,
    SessionLimitError,
)
from ._event import Event
from .backends._base import BackendCounts, BackendHub, Replay, SweepResult

__all__ = ["RedisBackend"]

# hiredis (optional) parses the Pub/Sub stream in C; without it, _RESP2Frames does.
_hiredis: Any
try:
    _hiredis = importlib.import_module("hiredis")
except ImportError:
    _hiredis = None

logger = logging.getLogger("sse_broadcaster")

# A stream id is "<ms>-<seq>", two unsigned 64-bit integers.
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64 - 1
# Stands for the unknown id when checking max_event_bytes before the publish: a
# 13-digit millisecond time and a one-digit sequence, what nearly every id looks like.
_PROBE_ID = "0000000000000-0"
_CLOSE = b"!close"
# Rough per-object costs of this process's share (the events live in Redis).
_SESSION_OVERHEAD = 700
_PENDING_OVERHEAD = 200
# Sessions whose streams one pipelined round trip of a recovery reads.
_RECOVERY_BATCH = 200
# Reads in a row of one session whose buffer overflowed meanwhile before giving up.
_MAX_ROUNDS = 8

_Key = tuple[int, int]
_NO_KEY: _Key = (-1, -1)

# Fields of every stream entry, in this order: p (the previous entry's id, "" for
# the first entry of the stream: what makes a gap detectable, since stream ids are
# not contiguous), t (publisher's clock), e (event name, "" for none), r (retry, ""
# for none), d (data). A fixed field list lets Redis store the names once per node.
_PUBLISH = """
local key = KEYS[1]
local prev = ''
local tail = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if tail[1] then prev = tail[1][1] end
local id = redis.call('XADD', key, 'MAXLEN', ARGV[6], '*',
    'p', prev, 't', ARGV[5], 'e', ARGV[3], 'r', ARGV[4], 'd', ARGV[2])
local ttl = tonumber(ARGV[7])
if ttl > 0 then
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl + 1
    if cutoff > 0 then
        redis.call('XTRIM', key, 'MINID', string.format('%d', cutoff))
    end
end
redis.call('PEXPIRE', key, ARGV[8])
redis.call('PUBLISH', ARGV[1],
    id .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[2])
return id
"""

# Returns {last id of the stream or "", gap (0/1), entries}. ARGV: after ("" for
# none), upto ("" for the end), ttl ms (0: no age filter), session ttl ms (0: no
# refresh), fetch (0: only the last id). Entries are those in (after, upto]; all
# retained ones up to upto when there is a gap. Trimming by age happens on
# publish, so the age filter is applied here too.
_READ = """
local key = KEYS[1]
local after, upto = ARGV[1], ARGV[2]
local tail = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if not tail[1] then
    if after ~= '' then return {'', 1, {}} end
    return {'', 0, {}}
end
local last = tail[1][1]
local session_ttl = tonumber(ARGV[4])
if session_ttl > 0 then redis.call('PEXPIRE', key, session_ttl) end
local hi = upto
if hi == '' then hi = last end
local gap = 0
local lo = '-'
if after ~= '' then
    local first = redis.call('XRANGE', key, '(' .. after, hi, 'COUNT', 1)
    if first[1] then
        if first[1][2][2] == after then lo = '(' .. after else gap = 1 end
    elseif after == hi then
        lo = '(' .. after
    else
        gap = 1
    end
end
if ARGV[5] == '0' then return {last, gap, {}} end
local entries = {}
if not (lo == '(' .. hi) then entries = redis.call('XRANGE', key, lo, hi) end
local ttl = tonumber(ARGV[3])
if ttl > 0 and entries[1] then
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl
    local skip = 0
    for i = 1, #entries do
        local ms = tonumber(string.match(entries[i][1], '^(%d+)'))
        if ms > cutoff then break end
        skip = i
    end
    if skip > 0 then
        if after ~= '' then gap = 1 end
        local kept = {}
        for i = skip + 1, #entries do kept[#kept + 1] = entries[i] end
        entries = kept
    end
end
return {last, gap, entries}
"""

_CLOSE_SESSION = """
local existed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], '!close')
return existed
"""


async def _has_data(conn: AbstractConnection) -> bool:
    """Whether data or end-of-file waits on the connection (a dirty or closed one)."""
    check = getattr(conn, "can_read", None)  # redis-py >= 8
    if check is None:
        check = conn.can_read_destructive  # redis-py 5 to 7
    return bool(await check())


class _FrameReader(Protocol):
    def feed(self, data: bytes, /) -> None: ...

    def gets(self) -> Any: ...


class _RESP2Frames:
    """RESP2 replies parsed from fed bytes; `gets` returns False until one is complete.

    What a Pub/Sub connection receives: arrays of bulk strings and integers,
    simple strings, errors (returned as `ResponseError`, as hiredis does).
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        else:
            self._buf += data

    def gets(self) -> Any:
        parsed = self._parse(self._buf, self._pos)
        if parsed is None:
            return False
        value, self._pos = parsed
        return value

    def _parse(self, buf: bytes, pos: int) -> tuple[Any, int] | None:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind = buf[pos]
        if kind == 36:  # $: bulk string
            size = int(buf[pos + 1 : end])
            if size < 0:
                return None, end + 2
            stop = end + 2 + size
            if len(buf) < stop + 2:
                return None
            return buf[end + 2 : stop], stop + 2
        if kind == 42:  # *: array
            count = int(buf[pos + 1 : end])
            pos = end + 2
            items: list[Any] = []
            for _ in range(count):
                parsed = self._parse(buf, pos)
                if parsed is None:
                    return None
                item, pos = parsed
                items.append(item)
            return items, pos
        if kind == 58:  # :
            return int(buf[pos + 1 : end]), end + 2
        if kind == 43:  # +
            return buf[pos + 1 : end], end + 2
        if kind == 45:  # -
            return _reply_error(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
        raise InvalidResponse(f"unexpected reply from Redis: {buf[pos:end][:80]!r}")


def _stream_of(conn: AbstractConnection) -> asyncio.StreamReader | None:
    """The connection's socket stream (redis-py 5 to 8), None for other connection classes."""
    stream = getattr(conn, "_reader", None)
    return stream if isinstance(stream, asyncio.StreamReader) else None


def _reply_error(message: str) -> ResponseError:
    """redis-py's exception for an error reply (NoScriptError for NOSCRIPT, ...)."""
    error: ResponseError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def _frame_reader() -> _FrameReader:
    """hiredis's C reader when installed, else the pure-Python one.

    Error replies come back as redis-py's exception for them (NoScriptError, ...).
    """
    if _hiredis is not None:
        reader: _FrameReader = _hiredis.Reader(
            protocolError=InvalidResponse, replyError=_reply_error
        )
        return reader
    return _RESP2Frames()


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """Commands (str, bytes and int arguments) as one RESP2 byte string."""
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif not isinstance(arg, bytes):
                arg = str(arg).encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)


def _parse_id(event_id: str) -> _Key | None:
    match = _STREAM_ID.fullmatch(event_id)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > _U64 or seq > _U64 or (ms, seq) == (_U64, _U64):
        return None
    return ms, seq


def _key_of(event_id: str) -> _Key:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


class _Live:
    """This process's following of one session: its channel and delivery cursor.

    ``cursor`` is the last id handed to `BackendHub.deliver` (None until the first
    attach has read the stream's last id; "" when the stream did not exist). Live
    messages at or below it are dropped, so attaches and recoveries, which read the
    stream up to it, hand over with no duplicate and no hole. While ``hold`` or
    ``recovering`` is set the reader buffers messages in ``pending`` instead, raw
    (decoded when flushed), bounded by count and bytes. Past a bound the buffer is
    dropped and ``overflowed`` set: incoming messages are dropped too until the
    next read of the stream from the cursor, which covers them (see
    `RedisBackend._buffer`).
    """

    __slots__ = (
        "attaching",
        "channel",
        "close_seen",
        "closed",
        "confirmed",
        "cursor",
        "cursor_key",
        "dead",
        "hold",
        "key",
        "lock",
        "overflowed",
        "pending",
        "pending_bytes",
        "recovering",
        "rounds",
        "session_id",
    )

    def __init__(self, session_id: str, key: str, channel: bytes) -> None:
        self.session_id = session_id
        self.key = key
        self.channel = channel
        self.cursor: str | None = None
        self.cursor_key: _Key = _NO_KEY
        self.confirmed = -1  # connection generation whose SUBSCRIBE was confirmed
        self.recovering = False
        self.hold = 0
        self.attaching = 0
        # (key, payload) per buffered message; payload None stands for a close.
        self.pending: list[tuple[_Key, bytes | None]] = []
        self.pending_bytes = 0
        self.overflowed = False  # the buffer was dropped: a read from the cursor is due
        self.close_seen = False  # a close arrived while overflowed
        # Set when this process stops following the session; close_session waits on it.
        self.closed: anyio.Event | None = None
        self.rounds = 0  # reads in a row that overflowed
        self.lock = anyio.Lock()
        self.dead = False


class _Connection:
    """One Pub/Sub connection's state, alive between connect and loss."""

    __slots__ = ("conn", "expected", "generation", "last_rx", "outbox", "recover", "wakeup")

    def __init__(self, conn: AbstractConnection, generation: int) -> None:
        self.conn = conn
        self.generation = generation
        self.outbox: list[tuple[Any, ...]] = []
        self.wakeup = anyio.Event()
        self.expected: dict[bytes, int] = {}  # channel -> SUBSCRIBE replies still due
        self.recover: list[_Live] = []
        self.last_rx = time.monotonic()

    def send(self, *command: Any) -> None:
        self.outbox.append(command)
        self.wakeup.set()


class _Pipeline:
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
        self, connect: Callable[[], AbstractConnection], idle_check: float, timeout: float
    ) -> None:
        self._connect = connect
        self._idle_check = idle_check
        self._timeout = timeout
        self._last_used = 0.0
        self._conn: AbstractConnection | None = None
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._wakeup: asyncio.Future[None] | None = None
        self.pending = 0  # calls queued or on the wire
        self.pending_bytes = 0  # their `size` arguments

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
                    stale = await _has_data(conn)
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
                _pack([command for command, _ in batch]), check_health=False
            )
            stream = _stream_of(conn)
            if stream is not None:
                # The replies of the batch, parsed from as few reads as they came in.
                frames = _frame_reader()
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
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("socket_timeout", socket_timeout),
            ("attach_timeout", attach_timeout),
            ("health_check_interval", health_check_interval),
            ("min_backoff", min_backoff),
            ("max_backoff", max_backoff),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        for name, value in (
            ("max_buffered_messages", max_buffered_messages),
            ("max_buffered_bytes", max_buffered_bytes),
            ("max_pending_publishes", max_pending_publishes),
            ("max_pending_publish_bytes", max_pending_publish_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
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
        self._min_backoff = float(min_backoff)
        self._max_backoff = float(max_backoff)
        self._max_buffered_messages = max_buffered_messages
        self._max_buffered_bytes = max_buffered_bytes
        self._max_pending_publishes = max_pending_publishes
        self._max_pending_publish_bytes = max_pending_publish_bytes

        self._hub: BackendHub | None = None
        self._pool: ConnectionPool | None = None
        self._client: aioredis.Redis | None = None
        self._publish_script: Any = None
        self._pipeline: _Pipeline | None = None
        self._pipeline_task: asyncio.Task[None] | None = None
        self._read_script: Any = None
        self._close_script: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

        self._sessions: dict[str, _Live] = {}
        self._channels: dict[bytes, _Live] = {}
        self._link: _Connection | None = None
        self._generation = 0
        self._changed: anyio.Event | None = None
        self._pending_total = 0  # messages buffered across sessions
        self._pending_bytes = 0  # their bytes, with _PENDING_OVERHEAD each

        # figures for stats()
        self._connected = False
        self._ever_connected = False
        self._reconnects = 0
        self._recovered = 0
        self._live_gaps = 0
        self._published = 0
        self._publish_failures = 0
        self._received = 0
        self._duplicates = 0
        self._overflows = 0
        self._publishes_refused = 0
        self._recovery_started: float | None = None
        self._last_recovery: float | None = None
        self._last_error: str | None = None
        self._retained_estimate = 0
        self._redis_memory: int | None = None

    def __repr__(self) -> str:
        state = "connected" if self._connected else "disconnected"
        return f"<RedisBackend prefix={self._prefix!r} {state} sessions={len(self._sessions)}>"

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
        overrides: dict[str, Any] = {
            # Our own loops retry; a retried EVALSHA of the publish script could
            # store an event twice, and a retried read would hide the outage.
            "retry": Retry(NoBackoff(), 0),
            "retry_on_error": [],
            "socket_connect_timeout": self._connect_timeout,
            "socket_timeout": self._socket_timeout,
            "decode_responses": False,
            "health_check_interval": 0,
            # Pub/Sub messages as plain RESP2 arrays (no RESP3 push handling needed).
            "protocol": 2,
        }
        if self._url is not None:
            self._pool = ConnectionPool.from_url(self._url, **overrides)
        else:
            assert self._source_client is not None
            source = self._source_client.connection_pool
            kwargs = {
                k: v
                for k, v in source.connection_kwargs.items()
                if not k.startswith(("maint_notifications", "orig_"))
                and k not in ("himport_registry",)
            }
            kwargs.update(overrides)
            self._pool = ConnectionPool(connection_class=source.connection_class, **kwargs)
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._publish_script = self._client.register_script(_PUBLISH)
        self._read_script = self._client.register_script(_READ)
        self._close_script = self._client.register_script(_CLOSE_SESSION)
        # The reader lives from start to aclose, which may run in different tasks, so
        # no task group can bracket it; the backend is asyncio-only anyway.
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="sse_broadcaster redis reader")
        pool = self._pool
        self._pipeline = _Pipeline(
            lambda: pool.connection_class(**pool.connection_kwargs),
            self._health_interval,
            self._socket_timeout,
        )
        self._pipeline_task = loop.create_task(
            self._pipeline.run(), name="sse_broadcaster redis publisher"
        )
        with anyio.move_on_after(self._connect_timeout):
            while not self._connected:
                await self._wait_changed()
        if not self._connected:
            logger.warning(
                "Redis is not reachable yet (%s); retrying in the background", self._last_error
            )

    async def aclose(self) -> None:
        """Stop following Redis and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._notify()
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
        self._channels.clear()

    def _require_hub(self) -> BackendHub:
        if self._hub is None or self._closed:
            raise BroadcasterClosedError("the backend is not running")
        return self._hub

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def _wait_changed(self) -> None:
        """Wait until the connection, a subscription or a session changes state."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _stream(self, session_id: str) -> str:
        return self._stream_prefix + session_id

    # -- the Pub/Sub connection ----------------------------------------------------------

    async def _run(self) -> None:
        delay = self._min_backoff
        pool = self._pool
        assert pool is not None
        while not self._closed:
            conn: AbstractConnection | None = None
            try:
                conn = pool.connection_class(**pool.connection_kwargs)
                try:
                    await conn.connect()  # type: ignore[no-untyped-call]
                except (RedisError, OSError) as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                else:
                    delay = self._min_backoff
                    await self._serve(conn)
            except Exception as exc:
                logger.exception("the Redis reader failed; reconnecting")
                self._last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._lost()
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await conn.disconnect(nowait=True)
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._max_backoff)

    def _lost(self) -> None:
        if self._link is None:
            return
        self._link = None
        self._connected = False
        for live in self._sessions.values():
            live.confirmed = -1
            if live.cursor is not None:
                live.recovering = True
        if not self._closed:
            logger.warning("lost the Redis Pub/Sub connection (%s); reconnecting", self._last_error)
        self._notify()

    async def _serve(self, conn: AbstractConnection) -> None:
        self._generation += 1
        link = _Connection(conn, self._generation)
        if self._ever_connected:
            self._reconnects += 1
            if self._sessions:
                self._recovery_started = time.monotonic()
            logger.info("reconnected to Redis; resubscribing %d sessions", len(self._sessions))
        self._ever_connected = True
        self._link = link
        for live in self._sessions.values():
            self._subscribe(link, live)
        self._connected = True
        self._notify()
        failure: list[BaseException] = []
        async with anyio.create_task_group() as tg:

            def fail(exc: BaseException) -> None:
                failure.append(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(self._read_loop, link, fail)
            tg.start_soon(self._write_loop, link, fail)
            tg.start_soon(self._health_loop, link, fail)
            tg.start_soon(self._recover_loop, link, fail)
        if failure:
            exc = failure[0]
            self._last_error = f"{type(exc).__name__}: {exc}"

    def _subscribe(self, link: _Connection, live: _Live) -> None:
        link.expected[live.channel] = link.expected.get(live.channel, 0) + 1
        link.send("SUBSCRIBE", live.channel)

    async def _write_loop(self, link: _Connection, fail: Callable[[BaseException], None]) -> None:
        conn = link.conn
        try:
            while True:
                if not link.outbox:
                    link.wakeup = anyio.Event()
                    await link.wakeup.wait()
                    continue
                commands, link.outbox = link.outbox, []
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        except (RedisError, OSError) as exc:
            fail(exc)

    async def _health_loop(self, link: _Connection, fail: Callable[[BaseException], None]) -> None:
        interval = self._health_interval
        while True:
            await anyio.sleep(interval)
            idle = time.monotonic() - link.last_rx
            if idle >= 3 * interval:
                fail(ConnectionError(f"no reply from Redis for {idle:.1f} s"))
                return
            if idle >= interval:
                link.send("PING")

    async def _read_loop(self, link: _Connection, fail: Callable[[BaseException], None]) -> None:
        conn = link.conn
        # Pub/Sub traffic is parsed here in batches, from the connection's stream:
        # one read of up to 64 KB, then every complete message in it, with no await
        # per message or per line as redis-py's reply path has. Its own reader is
        # the fallback where the stream is not reachable (another connection class).
        stream = _stream_of(conn)
        hub = self._require_hub()
        try:
            if stream is not None:
                frames = _frame_reader()
                while True:
                    data = await stream.read(65536)
                    if not data:
                        raise ConnectionError("Connection closed by server.")
                    link.last_rx = time.monotonic()
                    frames.feed(data)
                    while (response := frames.gets()) is not False:
                        self._on_response(hub, link, response)
            else:
                while True:
                    response = await conn.read_response(timeout=math.inf, disconnect_on_error=False)
                    link.last_rx = time.monotonic()
                    self._on_response(hub, link, response)
        except (RedisError, OSError) as exc:
            fail(exc)

    def _on_response(self, hub: BackendHub, link: _Connection, response: Any) -> None:
        if isinstance(response, ResponseError):
            raise response
        if not isinstance(response, list) or not response:
            return  # +PONG outside subscribed mode
        kind = response[0]
        if kind == b"message":
            self._received += 1
            live = self._channels.get(response[1])
            if live is not None:
                try:
                    self._on_message(hub, live, response[2])
                except (ValueError, IndexError) as exc:
                    logger.warning("dropped a malformed message on %r: %s", response[1], exc)
        elif kind == b"subscribe":
            self._on_subscribed(link, response[1])

    def _on_message(self, hub: BackendHub, live: _Live, payload: bytes) -> None:
        if payload == _CLOSE:
            if live.hold or live.recovering:
                self._buffer(live, _NO_KEY, None)
            else:
                self._closed_remotely(hub, live)
            return
        head = payload[: payload.index(b"-")]
        key = (int(head), int(payload[len(head) + 1 : payload.index(b"\n")]))
        if live.hold or live.recovering:
            self._buffer(live, key, payload)
        elif live.cursor is None:
            return  # nobody attached yet, or leaving
        elif key > live.cursor_key:
            event = self._decode(live.session_id, payload)
            live.cursor_key = key
            live.cursor = event.id
            hub.deliver(live.session_id, event)
        else:
            self._duplicates += 1

    def _decode(self, session_id: str, payload: bytes) -> Event:
        event_id, timestamp, name, retry, data = payload.split(b"\n", 4)
        return Event(
            event_id.decode(),
            session_id,
            data.decode("utf-8"),
            name.decode("utf-8") if name else None,
            int(retry) if retry else None,
            float(timestamp),
        )

    def _on_subscribed(self, link: _Connection, channel: bytes) -> None:
        due = link.expected.get(channel, 0) - 1
        if due > 0:
            link.expected[channel] = due
            return
        link.expected.pop(channel, None)
        live = self._channels.get(channel)
        if live is None:
            return
        live.confirmed = link.generation
        if live.recovering:
            link.recover.append(live)
        self._notify()

    def _buffer(self, live: _Live, key: _Key, payload: bytes | None) -> None:
        """Keep a message that arrived while the session's stream is being read.

        Bounded per session by ``max_buffered_messages`` and across sessions by
        ``max_buffered_bytes``. Past a bound the session's
        buffer is dropped and ``overflowed`` set: messages are dropped until the
        next read of the stream from the cursor, which is sent after they arrived
        and so covers them. A close is remembered as a flag meanwhile.
        """
        if live.overflowed:
            if payload is None:
                live.close_seen = True
            return
        size = _PENDING_OVERHEAD + (0 if payload is None else len(payload))
        if (
            len(live.pending) >= self._max_buffered_messages
            or self._pending_bytes + size > self._max_buffered_bytes
        ):
            if payload is None:
                live.close_seen = True
            self._overflow(live)
            return
        live.pending.append((key, payload))
        live.pending_bytes += size
        self._pending_total += 1
        self._pending_bytes += size

    def _overflow(self, live: _Live) -> None:
        self._overflows += 1
        if not live.overflowed:
            logger.info(
                "session %r: more than the buffer holds arrived while its stream was read "
                "(%d messages); reading it again from %r",
                live.session_id,
                len(live.pending),
                live.cursor,
            )
        live.overflowed = True
        self._clear_pending(live)

    def _clear_pending(self, live: _Live) -> None:
        self._pending_total -= len(live.pending)
        self._pending_bytes -= live.pending_bytes
        live.pending = []
        live.pending_bytes = 0

    def _reread(self, live: _Live) -> None:
        """The buffer overflowed during a read: read the stream again from the cursor."""
        live.recovering = True
        link = self._link
        if link is not None and live.confirmed == link.generation:
            link.recover.append(live)
            self._notify()
        # else: the connection is gone; the resubscription queues the recovery.

    def _flush(self, hub: BackendHub, live: _Live) -> None:
        """Deliver what the reader buffered while the session was held, dropping ids seen."""
        if live.hold or live.recovering or live.overflowed or not live.pending:
            return
        pending = live.pending
        self._clear_pending(live)
        session_id = live.session_id
        for key, payload in pending:
            if payload is None:
                self._closed_remotely(hub, live)
                return
            if live.cursor is None:
                continue
            if key > live.cursor_key:
                event = self._decode(session_id, payload)
                live.cursor_key = key
                live.cursor = event.id
                hub.deliver(session_id, event)
            else:
                self._duplicates += 1

    def _closed_remotely(self, hub: BackendHub, live: _Live) -> None:
        hub.end_session(live.session_id)
        self._drop(live)

    def _drop(self, live: _Live) -> None:
        """Stop following the session (its local subscriptions are gone or ended)."""
        if live.dead:
            return
        live.dead = True
        if live.closed is not None:
            live.closed.set()
        self._clear_pending(live)
        if self._sessions.get(live.session_id) is live:
            del self._sessions[live.session_id]
            del self._channels[live.channel]
            link = self._link
            if link is not None:
                link.send("UNSUBSCRIBE", live.channel)
        self._notify()

    async def _recover_loop(self, link: _Connection, fail: Callable[[BaseException], None]) -> None:
        """Catch up the sessions queued in ``link.recover``, many per round trip.

        Sessions whose lock is free are read in pipelined batches of
        `_RECOVERY_BATCH`; one an attach holds is done alone once the attach is over.
        """
        hub = self._require_hub()
        try:
            while True:
                if not link.recover:
                    await self._wait_changed()
                    continue
                queued, link.recover = link.recover, []
                batch: list[_Live] = []
                busy: list[_Live] = []
                seen: set[int] = set()
                for live in queued:
                    if id(live) in seen or not self._due(live, link):
                        continue
                    seen.add(id(live))
                    (busy if live.lock.locked() else batch).append(live)
                for i in range(0, len(batch), _RECOVERY_BATCH):
                    await self._recover_batch(hub, link, batch[i : i + _RECOVERY_BATCH])
                for live in busy:
                    async with live.lock:
                        if self._due(live, link):
                            await self._recover_batch(hub, link, [live], locked=True)
                self._recovery_done(link)
        except (RedisError, OSError) as exc:
            fail(exc)

    def _due(self, live: _Live, link: _Connection) -> bool:
        return not live.dead and live.recovering and live.confirmed == link.generation

    def _recovery_done(self, link: _Connection) -> None:
        if self._recovery_started is None or link.recover:
            return
        if any(live.recovering for live in self._sessions.values()):
            return
        self._last_recovery = time.monotonic() - self._recovery_started
        self._recovery_started = None
        logger.info("recovered every followed session in %.3f s", self._last_recovery)

    async def _recover_batch(
        self, hub: BackendHub, link: _Connection, lives: list[_Live], locked: bool = False
    ) -> None:
        """Read the sessions' streams from their cursors in one pipeline and deliver."""
        held: list[_Live] = []
        try:
            if not locked:
                for live in lives:
                    try:
                        live.lock.acquire_nowait()
                    except anyio.WouldBlock:  # an attach took it since: queue it again
                        link.recover.append(live)
                    else:
                        held.append(live)
                lives = [live for live in held if self._due(live, link)]
            if not lives:
                return
            assert self._client is not None
            # From here on, messages are buffered again: this read covers the earlier ones.
            for live in lives:
                live.overflowed = False
            async with self._client.pipeline(transaction=False) as pipe:
                for live in lives:
                    assert live.cursor is not None
                    await self._read_script(
                        keys=[live.key], args=[live.cursor, "", 0, 0, 1], client=pipe
                    )
                results = await pipe.execute()
            for live, (_, gap, entries) in zip(lives, results, strict=True):
                if self._due(live, link):
                    self._recovered_from(hub, link, live, bool(gap), entries)
        finally:
            for live in held:
                live.lock.release()

    def _recovered_from(
        self, hub: BackendHub, link: _Connection, live: _Live, gap: bool, entries: Sequence[Any]
    ) -> None:
        """Deliver what the session's stream holds after the cursor; end it on a gap."""
        cursor = live.cursor
        assert cursor is not None
        if live.close_seen:  # closed while its buffer was dropped
            self._closed_remotely(hub, live)
            return
        delivered = 0
        # On a gap nothing is delivered: the subscriber resumes from its last id and
        # is told of the gap at entry, with what is retained replayed after it.
        for event in () if gap else self._events(live.session_id, entries):
            key = _key_of(event.id)
            if key > live.cursor_key:
                live.cursor_key = key
                live.cursor = event.id
                hub.deliver(live.session_id, event)
                delivered += 1
        self._recovered += delivered
        if not gap and live.overflowed:
            # More arrived during the read than the buffer holds: read again. A
            # session that cannot be caught up in a few rounds ends its
            # subscriptions as on a gap; they resume from history.
            live.rounds += 1
            if live.rounds < _MAX_ROUNDS:
                link.recover.append(live)
                return
        live.rounds = 0
        live.recovering = False
        if gap or live.overflowed:
            self._live_gaps += 1
            reason = "is gone from Redis" if gap else "could not be caught up"
            logger.warning(
                "session %r: history after %r %s; ending its subscriptions with GapError",
                live.session_id,
                cursor,
                reason,
            )
            why = (
                "Redis no longer holds them"
                if gap
                else "they arrived faster than this process could catch up"
            )
            hub.end_session(
                live.session_id,
                GapError(
                    f"events of session {live.session_id!r} after {cursor!r} may have been "
                    f"lost: {why}; resubscribe with the last event id"
                ),
            )
            self._drop(live)
            return
        if delivered:
            logger.info("session %r: recovered %d events from Redis", live.session_id, delivered)
        self._flush(hub, live)

    # -- Redis commands --------------------------------------------------------------------

    async def _read(
        self, key: str, after: str, upto: str, ttl_ms: int, refresh_ms: int, fetch: bool
    ) -> tuple[str, bool, list[Any]]:
        result = await self._read_script(
            keys=[key], args=[after, upto, ttl_ms, refresh_ms, 1 if fetch else 0]
        )
        last, gap, entries = result
        return last.decode() if last else "", bool(gap), entries

    def _events(self, session_id: str, entries: Sequence[Any]) -> list[Event]:
        events = []
        for entry_id, fields in entries:
            # fields: p, prev, t, ts, e, name, r, retry, d, data
            name, retry = fields[5], fields[7]
            events.append(
                Event(
                    entry_id.decode(),
                    session_id,
                    fields[9].decode("utf-8"),
                    name.decode("utf-8") if name else None,
                    int(retry) if retry else None,
                    float(fields[3]),
                )
            )
        return events

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
        hub = self._require_hub()
        config = hub.config
        timestamp = hub.clock()
        probe = Event(_PROBE_ID, session_id, data, event, retry, timestamp)
        if probe.size > config.max_event_bytes:
            raise EventTooLargeError(
                f"event of {probe.size} bytes encoded exceeds "
                f"max_event_bytes={config.max_event_bytes}"
            )
        pipeline = self._pipeline
        assert pipeline is not None
        size = len(data)
        if pipeline.pending and (
            pipeline.pending >= self._max_pending_publishes
            or pipeline.pending_bytes + size > self._max_pending_publish_bytes
        ):
            self._publishes_refused += 1
            raise BackendUnavailableError(
                f"could not publish to session {session_id!r}: {pipeline.pending} publishes "
                f"({pipeline.pending_bytes} bytes) already wait for Redis "
                f"(max_pending_publishes={self._max_pending_publishes}, "
                f"max_pending_publish_bytes={self._max_pending_publish_bytes})"
            )
        command = (
            "EVALSHA",
            self._publish_script.sha,
            1,
            self._stream(session_id),
            self._channel_prefix + session_id,
            data,
            event or "",
            "" if retry is None else retry,
            repr(timestamp),
            max(1, config.max_history_per_session),
            self._ttl_ms(hub),
            max(1, math.ceil(config.session_ttl * 1000)),
        )
        try:
            try:
                event_id = await pipeline.call(*command, size=size)
            except NoScriptError:
                # Redis restarted or its script cache was flushed: the script did not
                # run, so loading it and sending the call again cannot duplicate it.
                assert self._client is not None
                await self._client.script_load(_PUBLISH)
                event_id = await pipeline.call(*command, size=size)
        except (RedisError, OSError) as exc:
            self._publish_failures += 1
            raise BackendUnavailableError(
                f"could not publish to session {session_id!r}: Redis is unavailable "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self._published += 1
        return Event(event_id.decode(), session_id, data, event, retry, timestamp)

    async def attach(
        self, session_id: str, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay:
        """Follow the session's channel and compute the replay up to the cursor.

        Raises:
            SessionLimitError: this process already follows ``max_sessions`` sessions.
            BackendUnavailableError: Redis stayed unreachable for ``attach_timeout``.
        """
        hub = self._require_hub()
        try:
            with anyio.fail_after(self._attach_timeout):
                while True:
                    live = self._follow(hub, session_id)
                    live.attaching += 1
                    try:
                        replay = await self._attach_once(hub, live, last_event_id, register)
                    finally:
                        live.attaching -= 1
                        if (
                            not live.dead
                            and live.attaching == 0
                            and not hub.has_subscribers(session_id)
                        ):
                            self._drop(live)
                    if replay is not None:
                        return replay
        except TimeoutError:
            raise BackendUnavailableError(
                f"could not subscribe to session {session_id!r}: Redis was unavailable for "
                f"{self._attach_timeout} s ({self._last_error})"
            ) from None

    def _follow(self, hub: BackendHub, session_id: str) -> _Live:
        live = self._sessions.get(session_id)
        if live is not None:
            return live
        limit = hub.config.max_sessions
        if limit is not None and len(self._sessions) >= limit:
            raise SessionLimitError(
                f"cannot follow session {session_id!r}: this process follows "
                f"max_sessions={limit} sessions"
            )
        live = _Live(
            session_id,
            self._stream(session_id),
            (self._channel_prefix + session_id).encode(),
        )
        self._sessions[session_id] = live
        self._channels[live.channel] = live
        if self._link is not None:
            self._subscribe(self._link, live)
        return live

    async def _attach_once(
        self, hub: BackendHub, live: _Live, last_event_id: str | None, register: Callable[[], None]
    ) -> Replay | None:
        """One attempt; None to start over (connection changed, session dropped, lagging)."""
        # The SUBSCRIBE must be confirmed before the stream is read: then every event
        # after what the read returns arrives on the Pub/Sub connection.
        while live.confirmed != self._generation or self._link is None:
            if self._closed:
                raise BroadcasterClosedError("the backend is closed")
            if live.dead:
                return None
            await self._wait_changed()
        after = ""
        client_key: _Key | None = None
        if last_event_id is not None:
            client_key = _parse_id(last_event_id)
            if client_key is not None:
                after = last_event_id
        async with live.lock:
            if self._closed:
                raise BroadcasterClosedError("the backend is closed")
            if live.dead or live.confirmed != self._generation:
                return None
            cursor = live.cursor
            if cursor is not None and last_event_id is None:
                register()  # nothing to replay: live delivery starts after the cursor
                return Replay((), False)
            # Replay up to the cursor: what the reader delivers next comes after it.
            # "" is a cursor before any entry (the stream did not exist); None reads
            # up to the stream's end and makes its last id the cursor.
            upto = "" if cursor is None else (cursor or "0-0")
            if cursor is None:  # a fresh start: nothing before this read is due
                live.overflowed = live.close_seen = False
            live.hold += 1
            try:
                try:
                    last, gap, entries = await self._read(
                        live.key,
                        after,
                        upto,
                        self._ttl_ms(hub),
                        max(1, math.ceil(hub.config.session_ttl * 1000)),
                        last_event_id is not None,
                    )
                except ResponseError as exc:
                    raise BackendUnavailableError(
                        f"could not subscribe to session {live.session_id!r}: Redis refused "
                        f"to read its stream ({exc})"
                    ) from exc
                except (RedisError, OSError) as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    failed = True
                else:
                    failed = False
                if failed:
                    wait = True
                elif (
                    gap
                    and cursor is not None
                    and client_key is not None
                    and client_key > live.cursor_key
                    and last
                    and client_key <= _key_of(last)
                ):
                    # The client saw events this process's reader has not delivered
                    # yet (it read them on another node): wait for the reader.
                    wait = True
                else:
                    wait = False
                    if cursor is None:
                        live.cursor = last
                        live.cursor_key = _key_of(last) if last else _NO_KEY
                    register()
            finally:
                live.hold -= 1
                if live.overflowed and not live.hold:
                    if live.cursor is None:  # nobody registered: nothing to catch up on
                        live.overflowed = live.close_seen = False
                    elif not live.recovering:
                        self._reread(live)
            self._flush(hub, live)
        if wait:
            await anyio.sleep(self._min_backoff if failed else 0.001)
            return None
        if last_event_id is None:
            return Replay((), False)
        if client_key is None:
            gap = True
        events = self._events(live.session_id, entries)
        if not hub.config.max_history_per_session:
            events = []
        return Replay(events, gap)

    async def detach(self, session_id: str) -> None:
        live = self._sessions.get(session_id)
        hub = self._hub
        if live is None or hub is None or live.attaching or hub.has_subscribers(session_id):
            return
        self._drop(live)

    async def history(self, session_id: str, after: str | None) -> list[Event]:
        """Retained events of the session after `after` (all when None or unknown).

        Raises:
            BackendUnavailableError: Redis could not be reached.
        """
        hub = self._require_hub()
        if after is not None and _parse_id(after) is None:
            after = None
        try:
            _, _, entries = await self._read(
                self._stream(session_id), after or "", "", self._ttl_ms(hub), 0, True
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not read session {session_id!r}: Redis is unavailable ({exc})"
            ) from exc
        if not hub.config.max_history_per_session:
            return []
        return self._events(session_id, entries)

    async def close_session(self, session_id: str) -> bool:
        """Delete the session's stream and end its subscriptions on every process.

        Raises:
            BackendUnavailableError: Redis could not be reached.
        """
        self._require_hub()
        try:
            existed = await self._close_script(
                keys=[self._stream(session_id)], args=[self._channel_prefix + session_id]
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not close session {session_id!r}: Redis is unavailable ({exc})"
            ) from exc
        live = self._sessions.get(session_id)
        if live is not None and not live.attaching and not live.dead:
            # The close message travels on the session's channel behind every event
            # published before it: wait for it (bounded), so this process's
            # subscribers get those events before their stream ends, as elsewhere.
            live.closed = anyio.Event()
            with anyio.move_on_after(self._socket_timeout):
                await live.closed.wait()
            self._drop(live)
        return bool(existed)

    async def sweep(self) -> SweepResult:
        """Keep followed sessions from expiring and refresh the figures of `counts`.

        Redis trims and expires history itself; a session with a subscriber on this
        process gets its ``session_ttl`` renewed here, as the in-memory backend
        keeps sessions that have subscribers. Cost: one pipelined round trip for
        the followed sessions.
        """
        hub = self._require_hub()
        if self._client is None:
            return SweepResult()
        # Sessions followed with no local subscriber left (their subscriptions ended
        # without a detach reaching here) stop being followed.
        for live in list(self._sessions.values()):
            if not live.attaching and not hub.has_subscribers(live.session_id):
                self._drop(live)
        keys = [live.key for live in self._sessions.values() if live.cursor is not None]
        ttl_ms = max(1, math.ceil(hub.config.session_ttl * 1000))
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pexpire(key, ttl_ms)
                    pipe.xlen(key)
                pipe.info("memory")
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.info("Redis sweep skipped: %s", exc)
            return SweepResult()
        self._retained_estimate = sum(int(n) for n in results[1:-1:2])
        memory = results[-1]
        if isinstance(memory, dict):
            used = memory.get("used_memory")
            self._redis_memory = int(used) if used is not None else None
        return SweepResult()

    def counts(self) -> BackendCounts:
        """Sessions followed here, their retained events at the last sweep, bytes held here.

        O(1) and local: history lives in Redis, so the event count covers the
        sessions this process follows, as of the last sweep, and the bytes are
        this process's own bookkeeping (Redis memory is ``stats()['usedMemory']``).
        """
        estimate = len(self._sessions) * _SESSION_OVERHEAD + self._pending_bytes
        return BackendCounts(len(self._sessions), self._retained_estimate, estimate)

    def stats(self) -> dict[str, object]:
        return {
            "type": "redis",
            "connected": self._connected,
            "reconnects": self._reconnects,
            "recoveredEvents": self._recovered,
            "gapsSignalled": self._live_gaps,
            "followedSessions": len(self._sessions),
            "published": self._published,
            "publishFailures": self._publish_failures,
            "messagesReceived": self._received,
            "duplicatesDropped": self._duplicates,
            "pendingMessages": self._pending_total,
            "pendingBytes": self._pending_bytes,
            "bufferOverflows": self._overflows,
            "pendingPublishes": 0 if self._pipeline is None else self._pipeline.pending,
            "publishesRefused": self._publishes_refused,
            "lastRecoverySeconds": self._last_recovery,
            "usedMemory": self._redis_memory,
            "lastError": self._last_error,
        }
