"""RESP2 on the wire: commands packed into bytes, replies parsed from fed bytes.

The backend parses the replies of its pipelined publishes and the Pub/Sub
stream itself, in batches from one socket read, rather than through redis-py's
reply path (an await per line, a timeout per reply). hiredis, when installed,
parses in C; `RESP2Frames` is the pure-Python fallback.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Sequence
from typing import Any, Protocol

from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import InvalidResponse, ResponseError

__all__ = ["FrameReader", "RESP2Frames", "frame_reader", "has_data", "pack", "stream_of"]

# hiredis (optional) parses the Pub/Sub stream in C; without it, RESP2Frames does.
_hiredis: Any
try:
    _hiredis = importlib.import_module("hiredis")
except ImportError:
    _hiredis = None


async def has_data(conn: AbstractConnection) -> bool:
    """Whether data or end-of-file waits on the connection (a dirty or closed one)."""
    check = getattr(conn, "can_read", None)  # redis-py >= 8
    if check is None:
        check = conn.can_read_destructive  # redis-py 5 to 7
    return bool(await check())


class FrameReader(Protocol):
    def feed(self, data: bytes, /) -> None: ...

    def gets(self) -> Any: ...


class RESP2Frames:
    """RESP2 replies parsed from fed bytes; `gets` returns False until one is complete.

    What a Pub/Sub connection receives: arrays of bulk strings and integers,
    simple strings, errors (returned as `ResponseError`, as hiredis does).
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        else:
            self._buf += data

    def gets(self) -> Any:
        parsed = self._parse(self._buf, self._pos)
        if parsed is None:
            return False
        value, self._pos = parsed
        return value

    def _parse(self, buf: bytes, pos: int) -> tuple[Any, int] | None:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind = buf[pos]
        if kind == 36:  # $: bulk string
            size = int(buf[pos + 1 : end])
            if size < 0:
                return None, end + 2
            stop = end + 2 + size
            if len(buf) < stop + 2:
                return None
            return buf[end + 2 : stop], stop + 2
        if kind == 42:  # *: array
            count = int(buf[pos + 1 : end])
            pos = end + 2
            items: list[Any] = []
            for _ in range(count):
                parsed = self._parse(buf, pos)
                if parsed is None:
                    return None
                item, pos = parsed
                items.append(item)
            return items, pos
        if kind == 58:  # :
            return int(buf[pos + 1 : end]), end + 2
        if kind == 43:  # +
            return buf[pos + 1 : end], end + 2
        if kind == 45:  # -
            return reply_error(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
        raise InvalidResponse(f"unexpected reply from Redis: {buf[pos:end][:80]!r}")


def stream_of(conn: AbstractConnection) -> asyncio.StreamReader | None:
    """The connection's socket stream (redis-py 5 to 8), None for other connection classes."""
    stream = getattr(conn, "_reader", None)
    return stream if isinstance(stream, asyncio.StreamReader) else None


def reply_error(message: str) -> ResponseError:
    """redis-py's exception for an error reply (NoScriptError for NOSCRIPT, ...)."""
    error: ResponseError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def frame_reader() -> FrameReader:
    """hiredis's C reader when installed, else the pure-Python one.

    Error replies come back as redis-py's exception for them (NoScriptError, ...).
    """
    if _hiredis is not None:
        reader: FrameReader = _hiredis.Reader(protocolError=InvalidResponse, replyError=reply_error)
        return reader
    return RESP2Frames()


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """Commands (str, bytes and int arguments) as one RESP2 byte string."""
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif not isinstance(arg, bytes):
                arg = str(arg).encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(parts)
