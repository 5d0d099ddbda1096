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

# Every redis-py module the submodules use, imported here so that a missing (or too
# old) redis-py names the extra even when a submodule is already imported.
try:
    import redis._parsers.base
    import redis.asyncio
    import redis.asyncio.connection
    import redis.asyncio.retry
    import redis.backoff
    import redis.exceptions  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "sse_broadcaster.redis needs redis-py: pip install 'sse-broadcaster[redis]'"
    ) from exc

from ._backend import RedisBackend

__all__ = ["RedisBackend"]

# Reprs and docs name the public module, not the private one.
RedisBackend.__module__ = __name__
