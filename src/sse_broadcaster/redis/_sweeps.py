"""What a process's sweeps do in Redis, and the counters they can keep honestly.

A sweep renews the streams of the sessions this process follows, trims the
events of theirs that aged out (counted: ``expired_events``), and looks up the
streams whose expiry is due (counted when gone: ``sessions_expired``).

Redis expires a session's stream by itself and tells nobody. A process knows
the streams it kept alive (it published to them, or its sweep renewed a
followed session), and when each would expire unless someone else renews it;
once that time has passed, its sweep asks Redis (PTTL). A stream that is gone
counts as one expired session; one that is still there was renewed elsewhere
and is looked at again when its new expiry is due.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from redis.exceptions import RedisError

from ..backends._base import SweepResult
from ._scripts import Streams

__all__ = ["Expiries", "Sweeps"]

logger = logging.getLogger("sse_broadcaster")

# Bytes counted per remembered stream in `RedisBackend.counts` (the key, the dict slot).
_TRACKED_OVERHEAD = 200
# Streams whose expiry a process remembers, and how many of them one sweep looks
# up (the rest wait for the next sweep).
_TRACKED_STREAMS = 100_000
_CHECKS_PER_SWEEP = 10_000


class Sweeps:
    """One process's sweeps: what they found, and the streams whose expiry they watch."""

    __slots__ = ("expiries", "redis_memory", "retained")

    def __init__(self) -> None:
        self.expiries = Expiries(_TRACKED_STREAMS)
        self.retained = 0  # events in the followed streams at the last sweep
        self.redis_memory: int | None = None  # Redis's used_memory at the last sweep

    @property
    def held_bytes(self) -> int:
        return len(self.expiries) * _TRACKED_OVERHEAD

    async def run(
        self, streams: Streams, followed: Sequence[str], session_ttl: float, ttl_ms: int
    ) -> SweepResult:
        """Renew and trim the followed streams, look up the due ones: one round trip."""
        asked = time.monotonic()
        due = self.expiries.due(asked, _CHECKS_PER_SWEEP)
        try:
            swept = await streams.sweep(
                followed, max(1, math.ceil(session_ttl * 1000)), ttl_ms, due
            )
        except (RedisError, OSError) as exc:
            logger.info("Redis sweep skipped: %s", exc)
            return SweepResult()
        now = time.monotonic()
        for key, length in zip(followed, swept.lengths, strict=True):
            if length >= 0:
                self.expiries.renewed(key, now + session_ttl)
        self.retained = sum(n for n in swept.lengths if n > 0)
        if swept.memory is not None:
            used = swept.memory.get("used_memory")
            self.redis_memory = int(used) if used is not None else None
        gone = self.expiries.checked(due, swept.pttls, asked)
        return SweepResult(swept.trimmed, gone)


class Expiries:
    """Streams this process kept alive, in the order of their local expiry time.

    Bounded by `limit`: past it the stream due soonest is forgotten, and its
    expiry goes uncounted. Times are `time.monotonic()` seconds, taken after
    Redis answered, so a stream is never looked at before Redis expired it.
    """

    __slots__ = ("_due", "_limit")

    def __init__(self, limit: int) -> None:
        # stream key -> when it expires unless renewed; insertion order is due order
        # (every renewal here adds the same session_ttl to a later time).
        self._due: dict[str, float] = {}
        self._limit = limit

    def __len__(self) -> int:
        return len(self._due)

    def renewed(self, key: str, deadline: float) -> None:
        """This process (re)set the stream's expiry to `deadline`."""
        due = self._due
        due.pop(key, None)
        due[key] = deadline
        if len(due) > self._limit:
            del due[next(iter(due))]

    def forget(self, key: str) -> None:
        """The stream is gone for another reason than expiry (this process closed it)."""
        self._due.pop(key, None)

    def due(self, now: float, most: int) -> list[str]:
        """Up to `most` streams whose expiry time has passed, soonest first."""
        keys: list[str] = []
        for key, deadline in self._due.items():
            if deadline > now or len(keys) >= most:
                break
            keys.append(key)
        return keys

    def checked(self, keys: Sequence[str], pttls: Sequence[int], now: float) -> int:
        """Record Redis's PTTL answers for the streams `due(now)` gave; how many are gone."""
        gone = 0
        for key, pttl in zip(keys, pttls, strict=True):
            deadline = self._due.get(key)
            if deadline is None or deadline > now:
                continue  # forgotten, or renewed here while Redis answered
            del self._due[key]
            if pttl == -2:
                gone += 1
            elif pttl >= 0:  # renewed by another process: look again then
                self._due[key] = now + pttl / 1000
            # -1: someone made it persistent; it will not expire
        return gone
