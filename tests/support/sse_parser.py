"""A reference SSE parser, written from the WHATWG HTML standard, for the tests.

It follows "9.2.6 Interpreting an event stream" of
https://html.spec.whatwg.org/multipage/server-sent-events.html line by line, so
that the encoder is checked against the spec rather than against itself:

- the stream is decoded as UTF-8 (invalid sequences become U+FFFD) and one
  leading BYTE ORDER MARK is ignored;
- lines end with CRLF, a lone LF or a lone CR, also when a CRLF pair is split
  across two chunks;
- an empty line dispatches the event; a line starting with a colon is a comment;
- a line with a colon is ``field:value`` and exactly one leading space of the
  value is removed; a line without a colon is a field with an empty value;
- ``event`` sets the event type buffer, ``data`` appends the value and an LF to
  the data buffer, ``id`` sets the last event ID buffer unless the value
  contains NUL, ``retry`` sets the reconnection time if it is ASCII digits only,
  and any other field is ignored;
- on dispatch, the last event ID is set from its buffer (it persists across
  events), an empty data buffer dispatches nothing, one trailing LF is removed
  from the data, and the type is "message" when no event type was given;
- whatever follows the last complete event when the stream ends is discarded.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["ParsedEvent", "SSEParser", "parse"]

_END_OF_LINE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ParsedEvent:
    """A dispatched event, as a browser's ``MessageEvent`` would show it."""

    type: str
    data: str
    last_event_id: str
    retry: int | None
    """The event source's reconnection time when the event was dispatched."""


class SSEParser:
    """An incremental parser: `feed` bytes in any chunks, then `close`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self._buffer = ""
        self._skip_lf = False
        self._data = ""
        self._event_type = ""
        self._last_event_id_buffer = ""
        self.last_event_id = ""
        """The event source's last event ID string."""
        self.reconnection_time: int | None = None
        """Set by the last valid ``retry`` field (None: never set)."""

    def feed(self, chunk: bytes) -> list[ParsedEvent]:
        """Parse a chunk of the stream; the events it completes."""
        return self._feed_text(self._decoder.decode(chunk))

    def close(self) -> list[ParsedEvent]:
        """End of stream: an incomplete line and an undispatched event are discarded."""
        events = self._feed_text(self._decoder.decode(b"", final=True))
        self._buffer = ""
        self._data = self._event_type = ""
        return events

    def _feed_text(self, text: str) -> list[ParsedEvent]:
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            # The previous chunk ended with CR: an LF here is the second half of CRLF.
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buffer = self._buffer + text
        events: list[ParsedEvent] = []
        start = 0
        for match in _END_OF_LINE.finditer(buffer):
            event = self._process_line(buffer[start : match.start()])
            if event is not None:
                events.append(event)
            start = match.end()
        if start == len(buffer) and buffer.endswith("\r"):
            self._skip_lf = True
        self._buffer = buffer[start:]
        return events

    def _process_line(self, line: str) -> ParsedEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id" and "\0" not in value:
            self._last_event_id_buffer = value
        elif name == "retry" and value and all("0" <= c <= "9" for c in value):
            self.reconnection_time = int(value)
        return None

    def _dispatch(self) -> ParsedEvent | None:
        self.last_event_id = self._last_event_id_buffer
        if not self._data:
            self._data = self._event_type = ""
            return None
        data = self._data[:-1] if self._data.endswith("\n") else self._data
        event = ParsedEvent(
            type=self._event_type or "message",
            data=data,
            last_event_id=self.last_event_id,
            retry=self.reconnection_time,
        )
        self._data = self._event_type = ""
        return event


def parse(stream: bytes, *, chunk_size: int | None = None) -> list[ParsedEvent]:
    """Every event of a complete stream, fed whole or in chunks of `chunk_size` bytes."""
    parser = SSEParser()
    events: list[ParsedEvent] = []
    step = chunk_size or max(len(stream), 1)
    for offset in range(0, len(stream), step):
        events.extend(parser.feed(stream[offset : offset + step]))
    events.extend(parser.close())
    return events
