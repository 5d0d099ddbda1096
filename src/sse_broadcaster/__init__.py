"""Server-Sent Events fan-out with bounded memory, on asyncio and trio.

::

    from sse_broadcaster import BroadcasterConfig, EventBroadcaster

    async with EventBroadcaster(BroadcasterConfig()) as broadcaster:
        await broadcaster.publish("room-1", {"text": "hi"}, event="chat")
        async with broadcaster.subscribe("room-1", last_event_id=None) as sub:
            async for event in sub:
                ...

Adapters live in `sse_broadcaster.starlette` and `sse_broadcaster.aiohttp`, the
Redis backend in `sse_broadcaster.redis`, the pooled HTTP client in
`sse_broadcaster.http` and the SSE client in `sse_broadcaster.client`.
"""

from .__version__ import __version__
from ._broadcaster import EventBroadcaster
from ._config import BroadcasterConfig
from ._errors import (
    BackendUnavailableError,
    BroadcasterClosedError,
    BroadcasterError,
    EventTooLargeError,
    GapError,
    RunActiveError,
    RunLimitError,
    SessionLimitError,
    SlowSubscriberError,
    SubscriberLimitError,
)
from ._event import Event
from ._metrics import MemoryMetrics
from ._multi import MultiSubscription
from ._run_state import RUN_END_EVENT, RunInfo, RunState
from ._subscription import Subscription
from ._types import OverflowPolicy, check_session_id

__all__ = [
    "BackendUnavailableError",
    "BroadcasterClosedError",
    "BroadcasterConfig",
    "BroadcasterError",
    "Event",
    "EventBroadcaster",
    "EventTooLargeError",
    "GapError",
    "MemoryMetrics",
    "MultiSubscription",
    "OverflowPolicy",
    "RUN_END_EVENT",
    "RunActiveError",
    "RunInfo",
    "RunLimitError",
    "RunState",
    "SessionLimitError",
    "SlowSubscriberError",
    "SubscriberLimitError",
    "Subscription",
    "__version__",
    "check_session_id",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("sse_broadcaster."):
        _obj.__module__ = "sse_broadcaster"
del _name, _obj
