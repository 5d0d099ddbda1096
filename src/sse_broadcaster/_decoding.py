"""Content decoding for the SSE client with bounded memory.

httpx's decoders inflate a whole network read at once, so a few hundred bytes
of a compression bomb become gigabytes before the event size limit is checked.
Here gzip, deflate and brotli are inflated at most `_PIECE` bytes at a time.
"""

from __future__ import annotations

import importlib
import zlib
from collections.abc import Iterator
from typing import Any

__all__ = ["ACCEPT_ENCODING", "DecodeError", "Decoder", "decode", "decoders"]

# At most this many decompressed bytes exist at once per read: a compressed
# body is inflated piece by piece, each piece parsed (and the event size limit
# checked) before the next one is made, so a compression bomb cannot fill memory.
_PIECE = 64 * 1024


def _load_brotli() -> Any:
    """The ``brotli`` (or ``brotlicffi``) module if it can bound its output, else None."""
    for name in ("brotli", "brotlicffi"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        # Only releases with an output limit (brotli 1.2) can be fed safely.
        if hasattr(module.Decompressor(), "can_accept_more_data"):
            return module
    return None


_brotli = _load_brotli()

ACCEPT_ENCODING = "gzip, deflate, br" if _brotli is not None else "gzip, deflate"
"""The ``Accept-Encoding`` an `EventSource` sends: what it can decode with bounded memory."""


class DecodeError(Exception):
    pass


class _ZlibDecoder:
    """gzip or deflate, inflated at most `_PIECE` bytes at a time."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._gzip = encoding != "deflate"
        # zlib-wrapped deflate, as RFC 9110 says; raw deflate is tried if that fails.
        self._wbits = zlib.MAX_WBITS | 16 if self._gzip else zlib.MAX_WBITS
        self._inflate = zlib.decompressobj(self._wbits)
        self._started = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        while True:
            try:
                out = self._inflate.decompress(data, _PIECE)
            except zlib.error as exc:
                if self._gzip or self._started or self._wbits < 0:
                    raise DecodeError(str(exc)) from exc
                self._wbits = -zlib.MAX_WBITS
                self._inflate = zlib.decompressobj(self._wbits)
                continue
            self._started = True
            data = self._inflate.unconsumed_tail
            if out:
                yield out
            if self._inflate.eof:
                data = self._inflate.unused_data
                if not (self._gzip and data):
                    return  # anything after a deflate stream is ignored, as httpx does
                self._inflate = zlib.decompressobj(self._wbits)  # the next gzip member
            elif not data and len(out) < _PIECE:
                return  # all input used and no output held back


class _BrotliDecoder:
    """Brotli, at most about `_PIECE` bytes of output at a time."""

    encoding = "br"

    def __init__(self) -> None:
        self._brotli = _brotli
        self._decompressor = _brotli.Decompressor()

    def decode(self, data: bytes) -> Iterator[bytes]:
        process = self._decompressor.process
        try:
            out: bytes = process(data, output_buffer_limit=_PIECE)
            if out:
                yield out
            while len(out) >= _PIECE or not self._decompressor.can_accept_more_data():
                out = process(b"", output_buffer_limit=_PIECE)
                if out:
                    yield out
        except self._brotli.error as exc:
            raise DecodeError(str(exc)) from exc


Decoder = _ZlibDecoder | _BrotliDecoder


def decoders(content_encoding: list[str]) -> list[Decoder]:
    """The decoders for a ``Content-Encoding`` list, in the order to apply them.

    Raises:
        ValueError: an encoding the client does not know.
    """
    decoders: list[Decoder] = []
    for value in reversed(content_encoding):  # the last one applied is undone first
        encoding = value.strip().lower()
        if encoding in ("", "identity"):
            continue
        if encoding in ("gzip", "x-gzip", "deflate"):
            decoders.append(_ZlibDecoder(encoding))
        elif encoding == "br" and _brotli is not None:
            decoders.append(_BrotliDecoder())
        else:
            raise ValueError(value)
    return decoders


def decode(decoders: list[Decoder], data: bytes) -> Iterator[bytes]:
    """``data`` through every decoder, lazily: one bounded piece at a time."""
    if not decoders:
        if data:
            yield data
        return
    first, rest = decoders[0], decoders[1:]
    for piece in first.decode(data):
        yield from decode(rest, piece)
