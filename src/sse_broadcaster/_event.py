from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Event", "encode_comment"]

# WHATWG HTML, "Parsing an event stream": a line ends at CRLF, a lone LF or a lone CR.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _check_field(name: str, value: str) -> None:
    # A CR or LF would end the field early and let the rest be read as new fields
    # (header injection); the spec's parser ignores an id containing NUL.
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"{name} must not contain CR, LF or NUL, got {value!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """One published event, as stored in history and sent to subscribers.

    The broadcaster builds events; its SSE encoding is computed once, when the
    event is created, and shared by every subscriber.

    Raises:
        ValueError: ``id`` or ``event`` contains CR, LF or NUL; ``event`` is
            empty; ``retry`` is negative; ``data`` is not encodable as UTF-8.
    """

    id: str
    """Unique within the session and strictly increasing in publish order ("" for none)."""
    session_id: str
    """The session (channel) the event was published to."""
    data: str
    """The payload. Line breaks reach clients as LF, the only break SSE data can carry."""
    event: str | None = None
    """The event name (``event:`` field); None sends none, which clients read as "message"."""
    retry: int | None = None
    """Reconnection time in milliseconds sent with the event (``retry:`` field)."""
    timestamp: float = 0.0
    """When it was published, in seconds since the epoch (the broadcaster's clock)."""
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.data, str):
            raise TypeError(f"data must be a str, got {type(self.data).__name__}")
        _check_field("id", self.id)
        if self.event is not None:
            if not self.event:
                raise ValueError("event must be a non-empty name or None, got ''")
            _check_field("event", self.event)
        if self.retry is not None and (
            isinstance(self.retry, bool) or not isinstance(self.retry, int) or self.retry < 0
        ):
            raise ValueError(f"retry must be an int >= 0 or None, got {self.retry!r}")
        object.__setattr__(self, "_wire", _encode(self.id, self.event, self.retry, self.data))

    def encode(self) -> bytes:
        """The event as an SSE message: UTF-8 bytes ending with a blank line."""
        return self._wire

    @property
    def size(self) -> int:
        """Length of the encoded message in bytes (what queue and history limits count)."""
        return len(self._wire)


def _encode(id: str, event: str | None, retry: int | None, data: str) -> bytes:
    head = ""
    if id:
        head = f"id: {id}\n"
    if event is not None:
        head += f"event: {event}\n"
    if retry is not None:
        head += f"retry: {retry}\n"
    if "\n" in data or "\r" in data:
        # Every line break starts a new data: line. The space after the colon is
        # always written so that data starting with a space or colon survives: the
        # parser strips exactly one leading space.
        body = "".join([f"data: {line}\n" for line in _LINE_BREAK.split(data)])
    else:
        body = f"data: {data}\n"
    try:
        return f"{head}{body}\n".encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"data is not encodable as UTF-8: {exc}") from None


def encode_comment(text: str = "") -> bytes:
    """An SSE comment line (``: text``), ignored by clients; used for keep-alive.

    Raises:
        ValueError: ``text`` contains CR, LF or NUL.
    """
    _check_field("comment", text)
    return f": {text}\n\n".encode() if text else b":\n\n"
