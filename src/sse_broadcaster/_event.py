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
        _check_name_and_retry(self.event, self.retry)
        object.__setattr__(self, "_wire", _encode(self.id, self.event, self.retry, self.data))

    def encode(self) -> bytes:
        """The event as an SSE message: UTF-8 bytes ending with a blank line."""
        return self._wire

    @property
    def size(self) -> int:
        """Length of the encoded message in bytes (what queue and history limits count)."""
        return len(self._wire)


def _check_name_and_retry(event: str | None, retry: int | None) -> None:
    if event is not None:
        if not event:
            raise ValueError("event must be a non-empty name or None, got ''")
        _check_field("event", event)
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int) or retry < 0):
        raise ValueError(f"retry must be an int >= 0 or None, got {retry!r}")


# The slots' own setters: what the frozen dataclass's __init__ does, minus its
# per-field object.__setattr__ lookups (a third of a publish with one subscriber).
_new = object.__new__
_set_id, _set_session_id, _set_data, _set_event, _set_retry, _set_timestamp, _set_wire = (
    Event.__dict__[name].__set__
    for name in ("id", "session_id", "data", "event", "retry", "timestamp", "_wire")
)


def make_event(
    id: str, session_id: str, data: str, event: str | None, retry: int | None, timestamp: float
) -> Event:
    """`Event(...)` for a backend that made the id itself and holds `data` as a str.

    Equal to the dataclass constructor in every field; checks ``event`` and
    ``retry`` the same way (ValueError) but trusts ``id`` (no CR, LF or NUL)
    and the type of ``data``.
    """
    if event is not None or retry is not None:
        _check_name_and_retry(event, retry)
    new: Event = _new(Event)
    _set_id(new, id)
    _set_session_id(new, session_id)
    _set_data(new, data)
    _set_event(new, event)
    _set_retry(new, retry)
    _set_timestamp(new, timestamp)
    _set_wire(new, _encode(id, event, retry, data))
    return new


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
