from __future__ import annotations

import enum
import re
from collections.abc import Callable

__all__ = ["Clock", "OverflowPolicy", "check_session_id"]

_MAX_SESSION_ID = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_session_id(session_id: object) -> str:
    """Return `session_id` if the broadcaster accepts it as a session id, else raise.

    A session id is a non-empty str of at most 256 characters with no control
    character (C0, DEL or C1). Validate ids that come from outside (a URL path,
    a form) with it before using them, as `EventBroadcaster.publish` and
    `EventBroadcaster.subscribe` do.

    Raises:
        TypeError: `session_id` is not a str.
        ValueError: it is empty, longer than 256 characters, or holds a control
            character; the message says which.
    """
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
    if not session_id:
        raise ValueError("session_id must not be empty")
    if len(session_id) > _MAX_SESSION_ID:
        raise ValueError(
            f"session_id must be at most {_MAX_SESSION_ID} characters, got {len(session_id)}"
        )
    match = _CONTROL.search(session_id)
    if match is not None:
        raise ValueError(
            f"session_id must not contain control characters, got {match.group()!r} "
            f"in {session_id!r}"
        )
    return session_id


class OverflowPolicy(str, enum.Enum):
    """What happens when a subscriber's queue is full."""

    DISCONNECT = "disconnect"
    """End the subscription with `SlowSubscriberError` after the queued events."""
    DROP_OLDEST = "drop_oldest"
    """Discard the oldest queued events to make room, counting them in ``dropped``."""
    DROP_NEWEST = "drop_newest"
    """Discard the new event, counting it in ``dropped``."""

    def __str__(self) -> str:
        return self.value


#: A clock returns the current time in seconds since the epoch (``time.time``).
Clock = Callable[[], float]
