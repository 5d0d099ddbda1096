"""`RedisRunStore`: the state of resumable runs (#13) in Redis, shared by every process.

Keys (``{prefix}`` is the backend's):

- ``{prefix}:r:{session}``: the session's run, a hash (run_id, state, started_at,
  replay_from, ended_at, first_event_id, end_event_id, events, bytes, error,
  retained, and the flags ``pin`` (the publish script keeps the stream's entries),
  ``cancel`` (asked to stop), ``dead`` (its producer stopped)).
- ``{prefix}:runs:running``: a sorted set of the sessions with a running run, scored
  by the time (Redis ms) the producer's heartbeat lapses.
- ``{prefix}:runs:ended``: the sessions with a retained ended run, scored by the
  end of their ``run_ttl``.
- ``{prefix}:runs:counts``: runs retained by state, and their transcript bytes.
- ``{prefix}:runs:cancel``: the channel a cancel is published on (``session\\nrun_id``).

Every change of state is one Lua script, so two processes cannot both start a
run of a session, and a dead producer's run is handed to exactly one sweeper (for
a lease of ``run_heartbeat_timeout``: if that process dies too, another takes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .._errors import BackendUnavailableError, RunActiveError, RunLimitError
from .._run_state import RunCounts, RunInfo, RunState, RunSweep

if TYPE_CHECKING:
    from .._config import BroadcasterConfig

__all__ = ["RedisRunStore"]

logger = logging.getLogger("sse_broadcaster")

# Ended runs whose transcript one sweep drops, and dead runs it hands out, at most.
_SWEEP_LIMIT = 1000

_NOW = """
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Unpins an ended run's transcript (run_ttl passed, a new run, max_runs): the
# stream falls back to the session's limits and expiry; the run is remembered
# (retained 0) for session_ttl. KEYS[2] ended set, KEYS[3] counts; ARGV[1] run key
# prefix, ARGV[2] stream key prefix, ARGV[3] max history, ARGV[4] session ttl ms.
_DROP = """
local function drop(sid)
    local rk = ARGV[1] .. sid
    redis.call('ZREM', KEYS[2], sid)
    local st = redis.call('HGET', rk, 'state')
    if not st or st == 'running' or redis.call('HGET', rk, 'retained') ~= '1' then
        return 0
    end
    redis.call('HSET', rk, 'retained', '0', 'pin', '0')
    redis.call('PEXPIRE', rk, ARGV[4])
    redis.call('HINCRBY', KEYS[3], st, -1)
    redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(redis.call('HGET', rk, 'bytes') or '0'))
    local sk = ARGV[2] .. sid
    if redis.call('EXISTS', sk) == 1 then
        redis.call('XTRIM', sk, 'MAXLEN', ARGV[3])
        redis.call('PEXPIRE', sk, ARGV[4])
    end
    return 1
end
"""

# KEYS: running, ended, counts, run hash, stream. ARGV 1-4 as _DROP, then 5 session,
# 6 run id, 7 started_at, 8 heartbeat timeout ms, 9 max_runs. Returns {'ok',
# replay_from}, {'active', run id} or {'limit'}.
_CLAIM = (
    _NOW
    + _DROP
    + """
local sid = ARGV[5]
local state = redis.call('HGET', KEYS[4], 'state')
if state == 'running' then return {'active', redis.call('HGET', KEYS[4], 'run_id')} end
local limit = tonumber(ARGV[9])
if redis.call('ZCARD', KEYS[1]) >= limit then return {'limit'} end
if state then drop(sid) end
while redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= limit do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
    if not oldest[1] then break end
    drop(oldest[1])
end
local replay = '0-0'
local tail = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)
if tail[1] then replay = tail[1][1] end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'run_id', ARGV[6], 'state', 'running', 'started_at', ARGV[7],
    'replay_from', replay, 'pin', '1', 'tbytes', '0', 'retained', '1',
    'events', '0', 'bytes', '0')
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[8]), sid)
return {'ok', replay}
"""
)

# KEYS: running, ended, counts, run hash, stream. ARGV: session, run id, state,
# ended_at, end id, events, bytes, error, first id, run ttl ms, session ttl ms.
_ENDED = (
    _NOW
    + """
local rk = KEYS[4]
if redis.call('HGET', rk, 'run_id') ~= ARGV[2] or redis.call('HGET', rk, 'state') ~= 'running' then
    return 0
end
redis.call('HSET', rk, 'state', ARGV[3], 'ended_at', ARGV[4], 'end_event_id', ARGV[5],
    'events', ARGV[6], 'bytes', ARGV[7], 'error', ARGV[8], 'first_event_id', ARGV[9])
redis.call('HDEL', rk, 'cancel', 'dead')
local run_ttl = tonumber(ARGV[10])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now_ms() + run_ttl, ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('HINCRBY', KEYS[3], 'bytes', tonumber(ARGV[7]))
local pttl = redis.call('PTTL', KEYS[5])
if pttl >= 0 and pttl < run_ttl then redis.call('PEXPIRE', KEYS[5], run_ttl) end
redis.call('PEXPIRE', rk, run_ttl + tonumber(ARGV[11]))
return 1
"""
)

# KEYS: running, run hash, stream. ARGV: session, run id, heartbeat timeout ms,
# events, bytes, first id, session ttl ms. Returns ok, cancel (asked to stop),
# dead (a sweeper ended it) or gone (not this run any more).
_HEARTBEAT = (
    _NOW
    + """
local rk = KEYS[2]
if redis.call('HGET', rk, 'run_id') ~= ARGV[2] or redis.call('HGET', rk, 'state') ~= 'running' then
    return 'gone'
end
if redis.call('HGET', rk, 'dead') == '1' then return 'dead' end
redis.call('HSET', rk, 'events', ARGV[4], 'bytes', ARGV[5], 'first_event_id', ARGV[6])
redis.call('ZADD', KEYS[1], now_ms() + tonumber(ARGV[3]), ARGV[1])
local pttl = redis.call('PTTL', KEYS[3])
if pttl >= 0 and pttl < tonumber(ARGV[7]) then redis.call('PEXPIRE', KEYS[3], ARGV[7]) end
if redis.call('HGET', rk, 'cancel') == '1' then return 'cancel' end
return 'ok'
"""
)

# KEYS: run hash. ARGV: channel, session. Returns the run's fields, {} when not running.
_CANCEL = """
local rk = KEYS[1]
if redis.call('HGET', rk, 'state') ~= 'running' then return {} end
redis.call('HSET', rk, 'cancel', '1')
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '\\n' .. redis.call('HGET', rk, 'run_id'))
return redis.call('HGETALL', rk)
"""

# KEYS: running, ended, counts, run hash. ARGV 1-4 as _DROP, 5 session. Forgets
# an ended run (its session is closed); a running one stays (its producer ends it).
_FORGET = (
    _DROP
    + """
local st = redis.call('HGET', KEYS[4], 'state')
if st == 'running' then return 0 end
drop(ARGV[5])
redis.call('DEL', KEYS[4])
return 1
"""
)

# KEYS: running, ended, counts. ARGV 1-4 as _DROP, 5 heartbeat timeout ms, 6 limit.
# Drops the transcripts past run_ttl; hands out the runs whose heartbeat lapsed,
# each with a lease of one heartbeat timeout. Returns {expired, {session, fields}...,
# running, ended, counts}.
_SWEEP = (
    _NOW
    + _DROP
    + """
local now = now_ms()
local limit = tonumber(ARGV[6])
local expired = 0
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
    expired = expired + drop(sid)
end
local dead = {}
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
    local rk = ARGV[1] .. sid
    if redis.call('HGET', rk, 'state') ~= 'running' then
        redis.call('ZREM', KEYS[1], sid)
    else
        redis.call('HSET', rk, 'dead', '1')
        redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), sid)
        dead[#dead + 1] = {sid, redis.call('HGETALL', rk)}
    end
end
return {expired, dead, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]),
    redis.call('HGETALL', KEYS[3])}
"""
)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fields(flat: Sequence[bytes | str]) -> dict[str, str]:
    """A hash's fields from HGETALL's flat reply."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _info(session_id: str, fields: dict[str, str]) -> RunInfo | None:
    """The RunInfo of a run hash's fields (None for an empty or foreign hash)."""
    try:
        state = RunState(fields["state"])
        return RunInfo(
            session_id=session_id,
            run_id=fields["run_id"],
            state=state,
            started_at=float(fields["started_at"]),
            replay_from=fields.get("replay_from") or None,
            ended_at=float(fields["ended_at"]) if fields.get("ended_at") else None,
            first_event_id=fields.get("first_event_id") or None,
            end_event_id=fields.get("end_event_id") or None,
            events=int(fields.get("events") or 0),
            bytes=int(fields.get("bytes") or 0),
            error=fields.get("error") or None,
            retained=fields.get("retained") == "1",
        )
    except (KeyError, ValueError):
        return None


class RedisRunStore:
    """Run state in Redis for `RedisBackend` (made by its ``run_store()``).

    A running or retained run pins its session's stream: the publish script then
    trims it by ``max_run_events`` / ``max_run_bytes`` only, never by
    ``max_history_per_session`` or ``event_ttl``, and only extends its expiry
    (to ``run_ttl`` at the end). The producing process refreshes the run's
    heartbeat every ``run_heartbeat_timeout / 3``; a sweep of any process that
    finds it lapsed gets the run in `RunSweep.dead`, and its manager publishes
    the ``failed`` end. A cancel is a flag in the run's hash (seen by the
    producer's next heartbeat) and a message on the cancel channel (seen at once).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        config: BroadcasterConfig,
        health_interval: float,
    ) -> None:
        self._client = client
        self._config = config
        self._run_prefix = f"{prefix}:r:"
        self._stream_prefix = f"{prefix}:s:"
        self._running_key = f"{prefix}:runs:running"
        self._ended_key = f"{prefix}:runs:ended"
        self._counts_key = f"{prefix}:runs:counts"
        self._channel = f"{prefix}:runs:cancel"
        self._health_interval = health_interval
        self._claim = client.register_script(_CLAIM)
        self._ended = client.register_script(_ENDED)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._cancel = client.register_script(_CANCEL)
        self._forget = client.register_script(_FORGET)
        self._sweep = client.register_script(_SWEEP)
        self._on_cancel: Callable[[str, str], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: PubSub | None = None
        self._counts = RunCounts()
        self.listening = asyncio.Event()
        """Set while the cancel channel is subscribed (tests wait for it)."""

    @property
    def heartbeat_interval(self) -> float:
        return self._config.run_heartbeat_timeout / 3

    def _ms(self, seconds: float) -> int:
        return max(1, math.ceil(seconds * 1000))

    def _drop_args(self) -> list[Any]:
        config = self._config
        return [
            self._run_prefix,
            self._stream_prefix,
            max(1, config.max_history_per_session),
            self._ms(config.session_ttl),
        ]

    def _keys(self, session_id: str) -> list[str]:
        return [
            self._running_key,
            self._ended_key,
            self._counts_key,
            self._run_prefix + session_id,
            self._stream_prefix + session_id,
        ]

    async def start(self, on_cancel: Callable[[str, str], None]) -> None:
        self._on_cancel = on_cancel
        self._listener = asyncio.get_running_loop().create_task(
            self._listen(), name="sse_broadcaster redis run cancels"
        )

    async def aclose(self) -> None:
        task, self._listener = self._listener, None
        if task is None:
            return
        task.cancel()
        # redis-py's get_message can swallow a cancel while it reads: drop its
        # connection under it then, and never wait on it without a bound.
        done, _ = await asyncio.wait({task}, timeout=0.5)
        connection: Any = getattr(self._pubsub, "connection", None)
        if not done and connection is not None:
            await connection.disconnect()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:  # pragma: no cover - a cancel lost twice
            logger.warning("the Redis run cancel listener did not stop")

    async def _listen(self) -> None:
        """Follow the cancel channel, resubscribing after a lost connection.

        A cancel published while this is down is still seen: the producer's next
        heartbeat reads the run's ``cancel`` flag.
        """
        delay = 0.05
        while True:
            pubsub = self._pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self.listening.set()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self._health_interval
                    )
                    if message is None:
                        await pubsub.ping()
                        continue
                    if message.get("type") == "message":
                        session_id, _, run_id = bytes(message["data"]).decode().partition("\n")
                        if self._on_cancel is not None:
                            self._on_cancel(session_id, run_id)
            except (RedisError, OSError) as exc:
                logger.info("Redis run cancel channel lost (%s); resubscribing", exc)
            finally:
                self.listening.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def claim(self, session_id: str, run_id: str, now: float) -> RunInfo:
        config = self._config
        args = [
            *self._drop_args(),
            session_id,
            run_id,
            repr(now),
            self._ms(config.run_heartbeat_timeout),
            config.max_runs,
        ]
        result = await self._call(self._claim, self._keys(session_id), args, session_id)
        verdict = result[0].decode()
        if verdict == "active":
            raise RunActiveError(
                f"session {session_id!r} already has a running run ({result[1].decode()}); "
                "cancel it (cancel_run) or wait for its end"
            )
        if verdict == "limit":
            raise RunLimitError(f"cannot start a run: max_runs={config.max_runs} runs are running")
        return RunInfo(
            session_id=session_id,
            run_id=run_id,
            state=RunState.RUNNING,
            started_at=now,
            replay_from=result[1].decode(),
        )

    async def _call(self, script: Any, keys: list[str], args: list[Any], session_id: str) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not update the run of session {session_id!r}: Redis is unavailable "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    async def ended(self, info: RunInfo) -> None:
        config = self._config
        args = [
            info.session_id,
            info.run_id,
            info.state.value,
            "" if info.ended_at is None else repr(info.ended_at),
            info.end_event_id or "",
            info.events,
            info.bytes,
            info.error or "",
            info.first_event_id or "",
            self._ms(config.run_ttl),
            self._ms(config.session_ttl),
        ]
        await self._call(self._ended, self._keys(info.session_id), args, info.session_id)

    async def get(self, session_id: str) -> RunInfo | None:
        try:
            flat = await self._client.hgetall(self._run_prefix + session_id)
        except (RedisError, OSError) as exc:
            raise BackendUnavailableError(
                f"could not read the run of session {session_id!r}: Redis is unavailable ({exc})"
            ) from exc
        fields = _fields([x for kv in flat.items() for x in kv])
        return _info(session_id, fields) if fields else None

    async def cancel(self, session_id: str) -> RunInfo | None:
        flat = await self._call(
            self._cancel, [self._run_prefix + session_id], [self._channel, session_id], session_id
        )
        return _info(session_id, _fields(flat)) if flat else None

    async def heartbeat(self, info: RunInfo) -> None:
        config = self._config
        keys = [
            self._running_key,
            self._run_prefix + info.session_id,
            self._stream_prefix + info.session_id,
        ]
        args = [
            info.session_id,
            info.run_id,
            self._ms(config.run_heartbeat_timeout),
            info.events,
            info.bytes,
            info.first_event_id or "",
            self._ms(config.session_ttl),
        ]
        verdict = (await self._call(self._heartbeat, keys, args, info.session_id)).decode()
        if verdict != "ok" and self._on_cancel is not None:
            # Cancelled while the channel was down, or ended for dead elsewhere: stop.
            self._on_cancel(info.session_id, info.run_id)

    async def forget(self, session_id: str) -> None:
        await self._call(
            self._forget,
            self._keys(session_id)[:4],
            [*self._drop_args(), session_id],
            session_id,
        )

    async def sweep(self) -> RunSweep:
        args = [*self._drop_args(), self._ms(self._config.run_heartbeat_timeout), _SWEEP_LIMIT]
        try:
            result = await self._sweep(keys=self._keys("")[:3], args=args)
        except (RedisError, OSError) as exc:
            logger.info("Redis run sweep skipped: %s", exc)
            return RunSweep()
        expired, dead_runs, running, _, counts_flat = result
        dead = []
        for session, flat in dead_runs:
            info = _info(session.decode(), _fields(flat))
            if info is not None:
                dead.append(info)
        counts = _fields(counts_flat)
        self._counts = RunCounts(
            int(running),
            int(counts.get("finished", 0)),
            int(counts.get("failed", 0)),
            int(counts.get("cancelled", 0)),
            int(counts.get("bytes", 0)),
        )
        return RunSweep(int(expired), dead)

    def counts(self) -> RunCounts:
        """Runs in Redis (every process's) as of this process's last sweep."""
        return self._counts
