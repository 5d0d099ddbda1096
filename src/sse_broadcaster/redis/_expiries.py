"""Which session streams Redis expired: what a process can learn for `sweep`'s counters.

Redis expires a session's stream by itself and tells nobody. A process knows
the streams it kept alive (it published to them, or its sweep renewed a
followed session), and when each would expire unless someone else renews it;
once that time has passed, its sweep asks Redis (PTTL). A stream that is gone
counts as one expired session; one that is still there was renewed elsewhere
and is looked at again when its new expiry is due.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TRACKED_OVERHEAD", "Expiries"]

# Bytes counted per remembered stream in `RedisBackend.counts` (the key, the dict slot).
TRACKED_OVERHEAD = 200


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
