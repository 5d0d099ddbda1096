"""Event and its SSE wire encoder: exact bytes, bad input, round trips through two parsers."""

from __future__ import annotations

import dataclasses
import re

import httpx
import httpx_sse
import pytest
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_broadcaster import Event
from sse_broadcaster._event import encode_comment, make_event

from .support.sse_parser import ParsedEvent, SSEParser, parse

pytestmark = pytest.mark.anyio


def make(data: str = "x", *, id: str = "e-1", event: str | None = None, retry: int | None = None):
    return Event(id, "room", data, event, retry, 0.0)


# -- exact bytes ---------------------------------------------------------------------------

WIRE_CASES = [
    pytest.param(make("hello"), b"id: e-1\ndata: hello\n\n", id="data-simple"),
    pytest.param(make("a\nb"), b"id: e-1\ndata: a\ndata: b\n\n", id="data-LF"),
    pytest.param(make("a\r\nb"), b"id: e-1\ndata: a\ndata: b\n\n", id="data-CRLF"),
    pytest.param(make("a\rb"), b"id: e-1\ndata: a\ndata: b\n\n", id="data-CR"),
    pytest.param(make("a\r\rb"), b"id: e-1\ndata: a\ndata: \ndata: b\n\n", id="data-CR-CR"),
    pytest.param(make("a\n\r\nb"), b"id: e-1\ndata: a\ndata: \ndata: b\n\n", id="data-LF-CRLF"),
    pytest.param(make("a\n"), b"id: e-1\ndata: a\ndata: \n\n", id="data-trailing-LF"),
    pytest.param(make("a\r\n"), b"id: e-1\ndata: a\ndata: \n\n", id="data-trailing-CRLF"),
    pytest.param(make("\na"), b"id: e-1\ndata: \ndata: a\n\n", id="data-leading-LF"),
    pytest.param(make("\n"), b"id: e-1\ndata: \ndata: \n\n", id="data-only-LF"),
    pytest.param(make("a\n\nb"), b"id: e-1\ndata: a\ndata: \ndata: b\n\n", id="data-blank-line"),
    pytest.param(make(" a"), b"id: e-1\ndata:  a\n\n", id="leading-space"),
    pytest.param(make("  a "), b"id: e-1\ndata:   a \n\n", id="leading-spaces-kept"),
    pytest.param(make(":a"), b"id: e-1\ndata: :a\n\n", id="leading-colon"),
    pytest.param(make("a\n: b"), b"id: e-1\ndata: a\ndata: : b\n\n", id="comment-like-line"),
    pytest.param(
        make("a\nid: evil"), b"id: e-1\ndata: a\ndata: id: evil\n\n", id="field-like-line"
    ),
    pytest.param(make(""), b"id: e-1\ndata: \n\n", id="empty-data"),
    pytest.param(make("a\0b"), b"id: e-1\ndata: a\0b\n\n", id="NUL-in-data"),
    pytest.param(
        make("h\u00e9llo \u2603 \U0001f389"),
        "id: e-1\ndata: h\u00e9llo \u2603 \U0001f389\n\n".encode(),
        id="non-ascii",
    ),
    pytest.param(
        make("a\u2028b\x85c"),
        "id: e-1\ndata: a\u2028b\x85c\n\n".encode(),
        id="unicode-breaks-are-data",
    ),
    pytest.param(
        make("x", event="chat", retry=3000),
        b"id: e-1\nevent: chat\nretry: 3000\ndata: x\n\n",
        id="event-and-retry",
    ),
    pytest.param(make("x", retry=0), b"id: e-1\nretry: 0\ndata: x\n\n", id="retry-zero"),
    pytest.param(
        make("x", event=" spaced "),
        b"id: e-1\nevent:  spaced \ndata: x\n\n",
        id="event-leading-space",
    ),
    pytest.param(
        make("x", event="a:b"), b"id: e-1\nevent: a:b\ndata: x\n\n", id="event-with-colon"
    ),
    pytest.param(
        make("x", event="\u00e9v\u00e9nement"),
        "id: e-1\nevent: \u00e9v\u00e9nement\ndata: x\n\n".encode(),
        id="event-non-ascii",
    ),
    pytest.param(make("x", id=""), b"data: x\n\n", id="no-id"),
    pytest.param(make("x", id=" e-1"), b"id:  e-1\ndata: x\n\n", id="id-leading-space"),
]


@pytest.mark.parametrize(("event", "expected"), WIRE_CASES)
def test_encode_exact_bytes(event: Event, expected: bytes) -> None:
    assert event.encode() == expected
    assert event.size == len(expected)
    # Built once and shared: every call returns the same object.
    assert event.encode() is event.encode()


@pytest.mark.parametrize(("event", "expected"), WIRE_CASES)
def test_exact_cases_read_back_by_the_spec_parser(event: Event, expected: bytes) -> None:
    [parsed] = parse(expected)
    assert parsed.data == _normalised(event.data)
    assert parsed.type == (event.event or "message")
    assert parsed.last_event_id == event.id
    assert parsed.retry == event.retry


def test_comment() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("ping") == b": ping\n\n"
    assert parse(encode_comment("ping") + make("x").encode()) == [
        ParsedEvent("message", "x", "e-1", None)
    ]


@pytest.mark.parametrize("text", ["a\nb", "a\rb", "a\0b"], ids=["LF", "CR", "NUL"])
def test_comment_rejects_line_breaks(text: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"comment must not contain CR, LF or NUL, got {text!r}")
    ):
        encode_comment(text)


# -- bad input -------------------------------------------------------------------------

BAD_FIELD_VALUES = [
    pytest.param("a\nb", id="LF"),
    pytest.param("a\rb", id="CR"),
    pytest.param("a\r\nb", id="CRLF"),
    pytest.param("a\0b", id="NUL"),
    pytest.param("\n", id="only-LF"),
    pytest.param("ab\r", id="trailing-CR"),
]


@pytest.mark.parametrize("value", BAD_FIELD_VALUES)
def test_event_name_with_line_break_or_nul_is_rejected(value: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"event must not contain CR, LF or NUL, got {value!r}")
    ) as info:
        make(event=value)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("value", BAD_FIELD_VALUES)
def test_id_with_line_break_or_nul_is_rejected(value: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"id must not contain CR, LF or NUL, got {value!r}")
    ):
        make(id=value)


def test_empty_event_name_is_rejected() -> None:
    with pytest.raises(
        ValueError, match=re.escape("event must be a non-empty name or None, got ''")
    ):
        make(event="")


@pytest.mark.parametrize("retry", [-1, True, 1.5, "10"], ids=["negative", "bool", "float", "str"])
def test_bad_retry_is_rejected(retry: object) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"retry must be an int >= 0 or None, got {retry!r}")
    ):
        make(retry=retry)  # type: ignore[arg-type]


def test_data_must_be_str() -> None:
    with pytest.raises(TypeError, match=re.escape("data must be a str, got bytes")):
        make(b"x")  # type: ignore[arg-type]


def test_data_with_lone_surrogate_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"^data is not encodable as UTF-8: .*surrogate"):
        make("a\ud800b")


def test_event_is_frozen_slotted_and_compares_by_value() -> None:
    event = make("x", event="chat")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc,unused-ignore]
    assert not hasattr(event, "__dict__")
    assert event == make("x", event="chat")
    assert event != make("y", event="chat")
    assert "_wire" not in repr(event)
    assert repr(event).startswith("Event(id='e-1', session_id='room', data='x', event='chat'")


# -- the reference parser itself (so the round trip below means something) ----------------


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        pytest.param(
            b"data: YHOO\ndata: +2\ndata: 10\n\n",
            [ParsedEvent("message", "YHOO\n+2\n10", "", None)],
            id="spec-example-multiline",
        ),
        pytest.param(
            b": test stream\n\ndata: first event\nid: 1\n\n"
            b"data:second event\nid\n\ndata:  third event\n\n",
            [
                ParsedEvent("message", "first event", "1", None),
                ParsedEvent("message", "second event", "", None),
                ParsedEvent("message", " third event", "", None),
            ],
            id="spec-example-ids",
        ),
        pytest.param(
            b"data\n\ndata\ndata\n\ndata:",
            [ParsedEvent("message", "", "", None), ParsedEvent("message", "\n", "", None)],
            id="spec-example-field-without-colon",
        ),
        pytest.param(
            b"data:test\n\ndata: test\n\n",
            [ParsedEvent("message", "test", "", None)] * 2,
            id="spec-example-one-space",
        ),
        pytest.param(b"\xef\xbb\xbfdata: a\n\n", [ParsedEvent("message", "a", "", None)], id="BOM"),
        pytest.param(
            b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n",
            [ParsedEvent("message", "b", "", None)],
            id="only-one-BOM-ignored",
        ),
        pytest.param(
            b"data: a\r\rdata: b\r\n\r\n",
            [ParsedEvent("message", "a", "", None), ParsedEvent("message", "b", "", None)],
            id="CR-and-CRLF",
        ),
        pytest.param(
            b"id: 1\0\ndata: a\n\n",
            [ParsedEvent("message", "a", "", None)],
            id="id-with-NUL-ignored",
        ),
        pytest.param(
            b"retry: 10\ndata: a\n\nretry: 1x\ndata: b\n\nretry:\ndata: c\n\n",
            [
                ParsedEvent("message", "a", "", 10),
                ParsedEvent("message", "b", "", 10),
                ParsedEvent("message", "c", "", 10),
            ],
            id="retry-digits-only",
        ),
        pytest.param(
            b"event: x\nid: 7\n\ndata: a\n\n",
            [ParsedEvent("message", "a", "7", None)],
            id="empty-data-not-dispatched-id-kept-type-reset",
        ),
        pytest.param(
            b"foo: bar\n:comment\ndata: a\n\n",
            [ParsedEvent("message", "a", "", None)],
            id="unknown-field",
        ),
        pytest.param(b"data: a\n", [], id="incomplete-event-discarded"),
        pytest.param(
            b"data: \xff\n\n", [ParsedEvent("message", "\ufffd", "", None)], id="invalid-UTF-8"
        ),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3], ids=["whole", "chunk1", "chunk2", "chunk3"])
def test_reference_parser(
    stream: bytes, expected: list[ParsedEvent], chunk_size: int | None
) -> None:
    assert parse(stream, chunk_size=chunk_size) == expected


def test_reference_parser_keeps_last_event_id_across_events() -> None:
    parser = SSEParser()
    events = parser.feed(b"id: 5\ndata: a\n\ndata: b\n\n")
    assert [e.last_event_id for e in events] == ["5", "5"]
    assert parser.last_event_id == "5"


# -- round trips ----------------------------------------------------------------------------

# SSE data cannot carry a CR: a compliant parser reads every line break (CRLF, CR or
# LF) as a line boundary and joins data lines with LF. So the round trip gives back
# the data with its line breaks normalised to LF, and nothing else changed.
_BREAK = re.compile(r"\r\n|\r")


def _normalised(data: str) -> str:
    return _BREAK.sub("\n", data)


_interesting = st.sampled_from(
    ["\r\n", "\r", "\n", " ", ":", "\0", "\ufeff", "\u00e9", "\U0001f389", "data: "]
)
_text = st.lists(
    st.one_of(_interesting, st.text(st.characters(exclude_categories=["Cs"]), max_size=8)),
    max_size=12,
).map("".join)
_field = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"), max_size=12)

events = st.builds(
    Event,
    id=_field,
    session_id=st.just("room"),
    data=_text,
    event=st.none() | _field.filter(bool),
    retry=st.none() | st.integers(min_value=0, max_value=2**40),
    timestamp=st.just(0.0),
)


def _expected(event: Event) -> tuple[str, str, str, int | None]:
    return (event.event or "message", _normalised(event.data), event.id, event.retry)


@settings(
    max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(event=events, chunk_size=st.none() | st.integers(min_value=1, max_value=7))
def test_round_trip_through_the_spec_parser(event: Event, chunk_size: int | None) -> None:
    [parsed] = parse(event.encode(), chunk_size=chunk_size)
    assert (parsed.type, parsed.data, parsed.last_event_id, parsed.retry) == _expected(event)


@settings(
    max_examples=100, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(stream=st.lists(events, min_size=1, max_size=5))
def test_round_trip_of_a_stream_with_comments(stream: list[Event]) -> None:
    wire = encode_comment("ping").join(e.encode() for e in stream)
    parsed = parse(b"\xef\xbb\xbf" + wire)
    assert len(parsed) == len(stream)
    last_id = ""
    for got, sent in zip(parsed, stream, strict=True):
        # An event without an id keeps the previous one, as the browser does.
        last_id = sent.id or last_id
        assert (got.type, got.data, got.last_event_id) == (*_expected(sent)[:2], last_id)


def _httpx_sse_parse(wire: bytes) -> list[httpx_sse.ServerSentEvent]:
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=wire)
    return list(httpx_sse.EventSource(response).iter_sse())


@settings(
    max_examples=300, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(event=events)
def test_round_trip_through_httpx_sse(event: Event) -> None:
    [parsed] = _httpx_sse_parse(event.encode())
    assert (parsed.event, parsed.data, parsed.id, parsed.retry) == _expected(event)


@settings(
    max_examples=100, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(event=events, cut=st.integers(min_value=0))
def test_round_trip_through_httpx_sse_decoders_in_two_chunks(event: Event, cut: int) -> None:
    wire = event.encode().decode()
    cut %= len(wire) + 1
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    decoded = [
        sse
        for line in [*lines.decode(wire[:cut]), *lines.decode(wire[cut:]), *lines.flush()]
        if (sse := decoder.decode(line)) is not None
    ]
    assert [(e.event, e.data, e.id, e.retry) for e in decoded] == [_expected(event)]


async def test_round_trip_through_httpx_sse_async() -> None:
    sent = [make("a\r\nb", event="chat", retry=5), make(" c\n", id="e-2")]
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream; charset=utf-8"},
        content=b"".join(e.encode() for e in sent),
    )
    got = [
        (e.event, e.data, e.id, e.retry) async for e in httpx_sse.EventSource(response).aiter_sse()
    ]
    assert got == [("chat", "a\nb", "e-1", 5), ("message", " c\n", "e-2", None)]


@given(
    data=st.text(),
    event=st.one_of(
        st.none(), st.text(min_size=1).filter(lambda s: not {"\r", "\n", "\0"} & set(s))
    ),
    retry=st.one_of(st.none(), st.integers(min_value=0, max_value=10**12)),
    timestamp=st.floats(allow_nan=False),
)
def test_make_event_is_the_constructor_minus_the_id_check(
    data: str, event: str | None, retry: int | None, timestamp: float
) -> None:
    try:
        expected: Event | ValueError = Event("3-7", "room", data, event, retry, timestamp)
    except ValueError as exc:  # data with lone surrogates
        expected = exc
    if isinstance(expected, ValueError):
        with pytest.raises(ValueError, match="not encodable as UTF-8"):
            make_event("3-7", "room", data, event, retry, timestamp)
        return
    made = make_event("3-7", "room", data, event, retry, timestamp)
    assert type(made) is Event
    assert made == expected
    assert made.encode() == expected.encode()
    assert made.size == expected.size
    assert repr(made) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.data = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("event", "retry", "message"),
    [
        ("", None, "event must be a non-empty name or None, got ''"),
        ("a\nb", None, "event must not contain CR, LF or NUL, got 'a\\\\nb'"),
        (None, -1, "retry must be an int >= 0 or None, got -1"),
        (None, True, "retry must be an int >= 0 or None, got True"),
    ],
)
def test_make_event_checks_name_and_retry(
    event: str | None, retry: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_event("1-1", "room", "data", event, retry, 0.0)
