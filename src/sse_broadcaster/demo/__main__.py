"""``python -m sse_broadcaster.demo``: run the demo server with uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = ["main"]

_MISSING_EXTRA = "the demo server needs uvicorn: pip install 'sse-broadcaster[demo]'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sse_broadcaster.demo",
        description="Serve the sse-broadcaster demo page, its event stream and stats.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="share sessions through Redis at URL (needs the Redis backend, sse_broadcaster.redis)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default %(default)s)",
    )
    return parser


def _redis_backend(url: str) -> Backend:
    try:
        from ..redis import RedisBackend
    except ImportError as exc:
        raise SystemExit(
            f"--redis: the Redis backend is not available ({exc}); "
            "drop --redis to run the demo in memory"
        ) from None
    return RedisBackend(url)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve until interrupted (Ctrl-C or SIGTERM)."""
    args = _parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port must be between 0 and 65535, got {args.port}")
    try:
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f"{_MISSING_EXTRA} ({exc})") from None

    from .. import EventBroadcaster
    from .app import create_app, demo_config

    backend = _redis_backend(args.redis) if args.redis else None
    app = create_app(EventBroadcaster(demo_config(), backend=backend))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # Streams end on the server's shutdown signal (the adapter's lifespan);
        # this is a backstop so that Ctrl-C never hangs on a stuck client.
        timeout_graceful_shutdown=3,
    )


if __name__ == "__main__":
    main()
