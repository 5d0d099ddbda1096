"""The wire side of the SSE client: received events, its errors, and the parser.

`sse_broadcaster.client` re-exports the public names; this module holds no I/O.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from ._errors import BroadcasterError

__all__ = [
    "EventSourceError",
    "InvalidContentTypeError",
    "InvalidStatusError",
    "OversizedEventError",
    "SSEParser",
    "ServerSentEvent",
]

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event received from an SSE stream."""

    id: str = ""
    """The last event id when the event was dispatched ("" if none yet), as in browsers."""
    event: str = "message"
    """The event type; "message" when the stream named none."""
    data: str = ""
    """The data lines of the event, joined with LF."""
    retry: int | None = None
    """The ``retry:`` value (milliseconds) sent in the same message, if any."""


class EventSourceError(BroadcasterError):
    """The stream cannot be (re)opened: retrying would not help.

    Raised from the `EventSource` iterator; the source is closed afterwards.
    """


class OversizedEventError(EventSourceError):
    """An event of the stream grew past ``max_event_size``."""


class InvalidStatusError(EventSourceError):
    """The server answered with a status that is neither 2xx nor retryable."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class InvalidContentTypeError(EventSourceError):
    """The server answered 2xx, but not with ``Content-Type: text/event-stream``."""

    def __init__(self, message: str, *, content_type: str) -> None:
        super().__init__(message)
        self.content_type = content_type


class SSEParser:
    """An incremental parser of ``text/event-stream`` bytes.

    Feed it bytes as they arrive, split anywhere (inside a UTF-8 sequence or
    between the CR and LF of a CRLF); it returns the events completed so far.
    Its cost is linear in the bytes fed, however the stream is split: only the
    new bytes are searched for line ends, and an unfinished line is kept as a
    list of pieces until its end arrives.
    """

    MAX_RETRY = 2**31 - 1
    """The largest ``retry:`` value kept (ms, about 24.8 days); larger values count as this."""

    def __init__(self, last_event_id: str = "", *, max_event_size: int | None = None) -> None:
        if max_event_size is not None and (isinstance(max_event_size, bool) or max_event_size < 1):
            raise ValueError(f"max_event_size must be >= 1 or None, got {max_event_size!r}")
        self.max_event_size = max_event_size
        """Characters an event (its data and unfinished line) may reach; None: no limit."""
        self.last_event_id = last_event_id
        """The last event id string: what a reconnection sends as Last-Event-ID."""
        self.retry: int | None = None
        """The last valid ``retry:`` value seen, in milliseconds (at most `MAX_RETRY`)."""
        self._id_buffer = last_event_id
        self.reset()

    def reset(self) -> None:
        """Start a new stream (a reconnection): drop any half-received event."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._bom_checked = False
        self._pending: list[str] = []
        self._pending_size = 0
        self._skip_lf = False
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._message_retry: int | None = None
        self._id_buffer = self.last_event_id
        self._error: OversizedEventError | None = None

    def feed(self, chunk: bytes, *, final: bool = False) -> list[ServerSentEvent]:
        """Parse ``chunk``; ``final`` marks the end of the stream.

        Raises:
            OversizedEventError: an event, or a line not finished yet, grew
                past ``max_event_size``. The events completed before it in the
                same chunk are returned first; this call and every later one
                (until `reset`) then raise.
        """
        if self._error is not None:
            raise self._error
        text = self._decoder.decode(chunk, final)
        if not text:
            return []
        if not self._bom_checked:
            self._bom_checked = True
            if text[0] == "\ufeff":  # one leading BOM is ignored
                text = text[1:]
        if self._skip_lf and text:
            # The previous text ended with CR: a LF now belongs to that CRLF.
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []
        # Only the new text is split: the pieces of an unfinished line are
        # joined once, when its end arrives, so the cost stays linear.
        lines = _LINE_END.split(text) if "\r" in text else text.split("\n")
        rest = lines.pop()
        events: list[ServerSentEvent] = []
        try:
            if lines:
                if self._pending:
                    self._pending.append(lines[0])
                    lines[0] = "".join(self._pending)
                    self._pending.clear()
                    self._pending_size = 0
                for line in lines:
                    event = self._line(line)
                    if event is not None:
                        events.append(event)
                self._skip_lf = text[-1] == "\r"
            if rest:
                self._pending.append(rest)
                self._pending_size += len(rest)
                self._check_size()
        except OversizedEventError as exc:
            self._error = exc
            self._pending.clear()  # the memory is released now, not at reset()
            self._data.clear()
            if not events:
                raise
            # Deliver what was complete before the oversized event; raise next time.
        return events

    def _check_size(self) -> None:
        limit = self.max_event_size
        if limit is not None and self._data_size + self._pending_size > limit:
            raise OversizedEventError(
                f"an event of the stream exceeded max_event_size ({limit} characters)"
            )

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None  # a comment
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self.max_event_size is not None and self._data_size > self.max_event_size:
                self._check_size()
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._message_retry = _retry_ms(value, self.MAX_RETRY)
        # Any other field is ignored.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id_buffer
        data, event, retry = self._data, self._event, self._message_retry
        self._data, self._event, self._message_retry = [], "", None
        self._data_size = 0
        if not data:
            return None
        return ServerSentEvent(
            id=self.last_event_id, event=event or "message", data="\n".join(data), retry=retry
        )


def _retry_ms(digits: str, maximum: int) -> int:
    """The value of a ``retry:`` field of ASCII digits, at most ``maximum``.

    The length is checked before converting: ``int()`` of thousands of digits
    is slow, and refused past 4300 digits (CVE-2020-10735).
    """
    digits = digits.lstrip("0")
    if len(digits) > len(str(maximum)):
        return maximum
    return min(int(digits or "0"), maximum)
