"""The Lua scripts, and how events are encoded into stream entries and messages.

A stream entry has the fields p (the previous entry's id, "" for the first
entry of the stream: what makes a gap detectable, since stream ids are not
contiguous), t (publisher's clock), e (event name, "" for none), r (retry, ""
for none), d (data), in this order: a fixed field list lets Redis store the
names once per node. The Pub/Sub message of an event is its id, t, e, r and d
joined by newlines; ``!close`` is the message of a closed session.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from .._event import Event

__all__ = [
    "CLOSE",
    "EMPTY_POSITION",
    "NO_KEY",
    "PROBE_ID",
    "Key",
    "Streams",
    "Swept",
    "decode_entries",
    "decode_message",
    "key_of",
    "message_key",
    "parse_id",
]

# A stream id is "<ms>-<seq>", two unsigned 64-bit integers.
_STREAM_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = 2**64 - 1
# Stands for the unknown id when checking max_event_bytes before the publish: a
# 13-digit millisecond time and a one-digit sequence, what nearly every id looks like.
PROBE_ID = "0000000000000-0"
CLOSE = b"!close"
# The position of an empty stream (`Replay.position`): as a last id, the read
# script takes it for the predecessor "" of a stream's first entry, so it replays
# the whole stream with no gap while the stream still starts with that entry.
EMPTY_POSITION = "0-0"

Key = tuple[int, int]
NO_KEY: Key = (-1, -1)

# Appends the event (ARGV: channel, data, event, retry, timestamp, max history,
# ttl ms (0: no age trim), session ttl ms, max run events, max run bytes), trims
# by count and age, refreshes the key's expiry and publishes the message; returns
# the new id. KEYS[2] is the session's run hash: while it says ``pin`` (a run is
# running or retained) the stream is trimmed only by the run caps, never by age,
# and its expiry is only ever extended; past max run bytes the pin is lost.
_PUBLISH = """
local key = KEYS[1]
local prev = ''
local tail = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if tail[1] then prev = tail[1][1] end
local maxlen = ARGV[6]
local pinned = redis.call('HGET', KEYS[2], 'pin') == '1'
if pinned then
    local held = redis.call('HINCRBY', KEYS[2], 'tbytes', string.len(ARGV[2]))
    if held > tonumber(ARGV[10]) then pinned = false else maxlen = ARGV[9] end
end
local id = redis.call('XADD', key, 'MAXLEN', maxlen, '*',
    'p', prev, 't', ARGV[5], 'e', ARGV[3], 'r', ARGV[4], 'd', ARGV[2])
local ttl = tonumber(ARGV[7])
if ttl > 0 and not pinned then
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl + 1
    if cutoff > 0 then
        redis.call('XTRIM', key, 'MINID', string.format('%d', cutoff))
    end
end
if not pinned or redis.call('PTTL', key) < tonumber(ARGV[8]) then
    redis.call('PEXPIRE', key, ARGV[8])
end
redis.call('PUBLISH', ARGV[1],
    id .. '\\n' .. ARGV[5] .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[4] .. '\\n' .. ARGV[2])
return id
"""

# Returns {last id of the stream or "", gap (0/1), entries}. ARGV: after ("" for
# none), upto ("" for the end), ttl ms (0: no age filter), session ttl ms (0: no
# refresh), fetch (0: only the last id). Entries are those in (after, upto]; all
# retained ones up to upto when there is a gap. Trimming by age happens on
# publish, so the age filter is applied here too, except for a pinned session
# (KEYS[2], the run hash, optional): a run's transcript does not age out.
_READ = """
local key = KEYS[1]
local pinned = KEYS[2] and redis.call('HGET', KEYS[2], 'pin') == '1'
local after, upto = ARGV[1], ARGV[2]
local tail = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
if not tail[1] then
    if after ~= '' and after ~= '0-0' then return {'', 1, {}} end
    return {'', 0, {}}
end
local last = tail[1][1]
local session_ttl = tonumber(ARGV[4])
if session_ttl > 0 and (not pinned or redis.call('PTTL', key) < session_ttl) then
    redis.call('PEXPIRE', key, session_ttl)
end
local hi = upto
if hi == '' then hi = last end
local gap = 0
local lo = '-'
if after ~= '' then
    local first = redis.call('XRANGE', key, '(' .. after, hi, 'COUNT', 1)
    if first[1] then
        local prev = first[1][2][2]
        if prev == after or (prev == '' and after == '0-0') then
            lo = '(' .. after
        else
            gap = 1
        end
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
if ttl > 0 and entries[1] and not pinned then
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

# A followed session's stream at a sweep: renews its expiry and trims the entries
# that aged out, as a publish would, but keeps the last one (the next publish
# names it as its predecessor, which is how gaps are detected; replay hides it by
# age anyway). ARGV: session ttl ms, ttl ms (0: no age trim). Returns {length,
# entries trimmed}, {-1, 0} when the stream does not exist. A pinned session's
# (KEYS[2], its run hash) stream is not trimmed and its expiry only extended.
_SWEEP = """
local key = KEYS[1]
local pinned = redis.call('HGET', KEYS[2], 'pin') == '1'
local pttl = redis.call('PTTL', key)
if pttl == -2 then return {-1, 0} end
if not pinned or pttl < tonumber(ARGV[1]) then redis.call('PEXPIRE', key, ARGV[1]) end
local trimmed = 0
local ttl = tonumber(ARGV[2])
if ttl > 0 and not pinned then
    local tail = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    local now = redis.call('TIME')
    local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - ttl + 1
    if tail[1] and cutoff > 0 then
        local minid = string.format('%d', cutoff)
        if tonumber(string.match(tail[1][1], '^(%d+)')) < cutoff then minid = tail[1][1] end
        trimmed = redis.call('XTRIM', key, 'MINID', minid)
    end
end
return {redis.call('XLEN', key), trimmed}
"""

_CLOSE_SESSION = """
local existed = redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], '!close')
return existed
"""


def parse_id(event_id: str) -> Key | None:
    """The stream id's (ms, seq), None for anything that is not a valid stream id."""
    match = _STREAM_ID.fullmatch(event_id)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > _U64 or seq > _U64 or (ms, seq) == (_U64, _U64):
        return None
    return ms, seq


def key_of(event_id: str) -> Key:
    """The (ms, seq) of an id Redis assigned."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def message_key(payload: bytes) -> Key:
    """The (ms, seq) of an event's Pub/Sub message, read without decoding the rest."""
    head = payload[: payload.index(b"-")]
    return int(head), int(payload[len(head) + 1 : payload.index(b"\n")])


def decode_message(session_id: str, payload: bytes) -> Event:
    """The event a Pub/Sub message of the publish script carries."""
    event_id, timestamp, name, retry, data = payload.split(b"\n", 4)
    return Event(
        event_id.decode(),
        session_id,
        data.decode("utf-8"),
        name.decode("utf-8") if name else None,
        int(retry) if retry else None,
        float(timestamp),
    )


def decode_entries(session_id: str, entries: Sequence[Any]) -> list[Event]:
    """The events of stream entries as XRANGE (or the read script) returns them."""
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


class Swept(NamedTuple):
    """What `Streams.sweep` found."""

    lengths: list[int]
    """Entries of each followed stream after the trim, -1 for one that does not exist."""
    trimmed: int
    """Entries trimmed by age from the followed streams."""
    pttls: list[int]
    """PTTL of each due stream: -2 gone, -1 no expiry, else milliseconds left."""
    memory: dict[str, Any] | None
    """Redis's INFO memory."""


class Streams:
    """The scripts registered on a client, and the commands that run them."""

    def __init__(self, client: aioredis.Redis, stream_prefix: str, run_prefix: str) -> None:
        self._client = client
        self._stream_prefix = stream_prefix
        self._run_prefix = run_prefix
        self._publish = client.register_script(_PUBLISH)
        self._read = client.register_script(_READ)
        self._close = client.register_script(_CLOSE_SESSION)
        self._sweep = client.register_script(_SWEEP)

    def run_key(self, stream: str) -> str:
        """The run hash of the session whose stream this is (it says whether it is pinned)."""
        return self._run_prefix + stream[len(self._stream_prefix) :]

    def publish_command(
        self,
        stream: str,
        channel: str,
        data: str,
        event: str | None,
        retry: int | None,
        timestamp: float,
        max_history: int,
        ttl_ms: int,
        session_ttl_ms: int,
        max_run_events: int,
        max_run_bytes: int,
    ) -> tuple[Any, ...]:
        """The EVALSHA command of the publish script, for `Pipeline.call`."""
        return (
            "EVALSHA",
            self._publish.sha,
            2,
            stream,
            self.run_key(stream),
            channel,
            data,
            event or "",
            "" if retry is None else retry,
            repr(timestamp),
            max_history,
            ttl_ms,
            session_ttl_ms,
            max_run_events,
            max_run_bytes,
        )

    async def load_publish(self) -> None:
        """Load the publish script again (Redis restarted or its script cache was flushed)."""
        await self._client.script_load(_PUBLISH)

    async def read(
        self, key: str, after: str, upto: str, ttl_ms: int, refresh_ms: int, fetch: bool
    ) -> tuple[str, bool, list[Any]]:
        """One stream's (last id, gap, entries) by the read script."""
        result = await self._read(
            keys=[key, self.run_key(key)], args=[after, upto, ttl_ms, refresh_ms, 1 if fetch else 0]
        )
        last, gap, entries = result
        return last.decode() if last else "", bool(gap), entries

    async def read_many(self, cursors: Sequence[tuple[str, str]]) -> list[Any]:
        """Each stream's [last, gap, entries] after its cursor, in one pipelined round trip."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key, after in cursors:
                await self._read(keys=[key], args=[after, "", 0, 0, 1], client=pipe)
            results: list[Any] = await pipe.execute()
        return results

    async def close(self, stream: str, channel: str) -> bool:
        """Delete the stream and publish the close message; whether it existed."""
        existed = await self._close(keys=[stream], args=[channel])
        return bool(existed)

    async def sweep(
        self, followed: Sequence[str], session_ttl_ms: int, ttl_ms: int, due: Sequence[str]
    ) -> Swept:
        """One round trip: renew and trim the followed streams, ask the due ones' PTTL."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in followed:
                await self._sweep(
                    keys=[key, self.run_key(key)], args=[session_ttl_ms, ttl_ms], client=pipe
                )
            for key in due:
                pipe.pttl(key)
            pipe.info("memory")
            results = await pipe.execute()
        swept = results[: len(followed)]
        memory = results[-1]
        return Swept(
            [int(length) for length, _ in swept],
            sum(int(trimmed) for _, trimmed in swept),
            [int(pttl) for pttl in results[len(followed) : -1]],
            memory if isinstance(memory, dict) else None,
        )
