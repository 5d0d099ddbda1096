"""Benchmark: the incremental SSE parser of sse_broadcaster.client, against httpx-sse.

    PYTHONPATH=src .venv/bin/python tests/performance/bench_parser.py [--mib 16] [--runs 3]

It asserts nothing; it prints a Markdown table of the seconds each parser takes
to parse the same bytes fed in chunks of a given size (the median of
``--runs``). Workloads:

- one line: a single ``data:`` line of ``--mib`` MiB that ends only at the
  end, the shape that made the old parser quadratic (it re-joined and
  re-scanned the whole unfinished line at every chunk: 8 MiB in 4 KiB chunks
  took 58 s). The target is 16 MiB in 4 KiB chunks in under a second;
- small events: ``--mib`` MiB of ``id:`` + ``data:`` events of about 100 bytes.

Peer: httpx-sse 0.4 on the same chunks, as its ``aiter_sse`` runs them (an
incremental UTF-8 decoder, its ``SSELineDecoder``, then ``SSEDecoder`` per line).

Run the "before" figures with the old tree first on the path
(``PYTHONPATH=/path/to/old/src``); ``--timeout`` skips the remaining runs of a
case once one run took longer.
"""

from __future__ import annotations

import argparse
import codecs
import statistics
import time
from collections.abc import Callable, Iterator

from sse_broadcaster.client import SSEParser

KiB = 1024
MiB = 1024 * KiB

Parse = Callable[[list[bytes]], int]


def ours(chunks: list[bytes]) -> int:
    parser = SSEParser(max_event_size=None)
    count = 0
    for chunk in chunks:
        count += len(parser.feed(chunk))
    return count + len(parser.feed(b"", final=True))


def httpx_sse(chunks: list[bytes]) -> int:
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines = SSELineDecoder()
    events = SSEDecoder()
    count = 0

    def feed(all_lines: list[str]) -> int:
        return sum(events.decode(line.rstrip("\n")) is not None for line in all_lines)

    for chunk in chunks:
        text = text_decoder.decode(chunk)
        if text:
            count += feed(lines.decode(text))
    return count + feed(lines.flush())


def split(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def one_line(mib: int) -> bytes:
    return b"data: " + b"x" * (mib * MiB) + b"\n\n"


def small_events(mib: int) -> bytes:
    event = b"id: 0123456789\ndata: " + b"y" * 70 + b"\n\n"
    return event * (mib * MiB // len(event))


def timed(parse: Parse, chunks: list[bytes], runs: int, timeout: float) -> Iterator[float]:
    for _ in range(runs):
        start = time.perf_counter()
        parse(chunks)
        elapsed = time.perf_counter() - start
        yield elapsed
        if elapsed > timeout:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=16, help="stream size in MiB (default 16)")
    parser.add_argument(
        "--chunks", default="4,64", help="chunk sizes in KiB, comma-separated (default 4,64)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per case; the median is shown")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="stop repeating a case after a run this long"
    )
    parser.add_argument("--no-peer", action="store_true", help="only time sse_broadcaster")
    args = parser.parse_args()

    parsers: dict[str, Parse] = {"sse_broadcaster": ours}
    if not args.no_peer:
        parsers["httpx-sse"] = httpx_sse
    workloads = {"one line": one_line(args.mib), "small events": small_events(args.mib)}
    sizes = [int(size) * KiB for size in args.chunks.split(",")]

    print(f"| workload ({args.mib} MiB) | chunk | " + " | ".join(parsers) + " |")
    print("|---|---:|" + "---:|" * len(parsers))
    for name, stream in workloads.items():
        for size in sizes:
            chunks = split(stream, size)
            cells = []
            for parse in parsers.values():
                times = list(timed(parse, chunks, args.runs, args.timeout))
                cells.append(f"{statistics.median(times):.3f} s")
            print(f"| {name} | {size // KiB} KiB | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
