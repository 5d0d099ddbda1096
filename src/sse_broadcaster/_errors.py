"""The exceptions raised by sse-broadcaster.

Every exception the library raises on purpose derives from `BroadcasterError`::

    BroadcasterError
    ├── BroadcasterClosedError   the broadcaster is not running (closed, or never entered)
    ├── SessionLimitError        max_sessions reached
    ├── SubscriberLimitError     max_subscribers_per_session reached
    ├── SlowSubscriberError      a subscriber fell behind and was disconnected
    ├── GapError                 events were lost while a subscription was live
    ├── BackendUnavailableError  the backend (Redis) cannot be reached
    ├── EventTooLargeError       an event is larger than max_event_bytes (also a ValueError)
    ├── RunActiveError           the session already has a running run
    └── RunLimitError            max_runs runs are running

Invalid arguments (a malformed session id, an event name with a line break, a
bad configuration value) raise plain `ValueError` or `TypeError` whose message
names the argument and its value.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "BroadcasterClosedError",
    "BroadcasterError",
    "EventTooLargeError",
    "GapError",
    "RunActiveError",
    "RunLimitError",
    "SessionLimitError",
    "SlowSubscriberError",
    "SubscriberLimitError",
]


class BroadcasterError(Exception):
    """Base class of every error raised by sse-broadcaster."""


class BroadcasterClosedError(BroadcasterError):
    """The broadcaster is not running: it was closed, or never entered.

    Raised by `publish` and `subscribe` outside ``async with broadcaster:``.
    """


class SessionLimitError(BroadcasterError):
    """Creating another session would exceed ``max_sessions``."""


class SubscriberLimitError(BroadcasterError):
    """Another subscriber would exceed ``max_subscribers_per_session``."""


class SlowSubscriberError(BroadcasterError):
    """The subscriber's queue overflowed under the ``"disconnect"`` policy.

    Raised from the subscription's iterator after the events that were queued
    before the overflow. Reconnecting with the last delivered id replays the
    rest from history.
    """


class GapError(BroadcasterError):
    """Events were lost while the subscription was live.

    The backend found its history gone (for example Redis restarted empty).
    The subscription ends; a client that resubscribes with its last id is told
    of the gap at entry (``Subscription.gap``).
    """


class BackendUnavailableError(BroadcasterError):
    """The backend cannot be reached; the operation did not take effect."""


class EventTooLargeError(BroadcasterError, ValueError):
    """The encoded event is larger than ``max_event_bytes``."""


class RunActiveError(BroadcasterError):
    """`start_run` on a session whose run is still running (in any process).

    At most one run per session: cancel it (`cancel_run`) or wait for its end.
    """


class RunLimitError(BroadcasterError):
    """Starting another run would exceed ``max_runs`` running runs."""
