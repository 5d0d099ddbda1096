"""``python -m sse_broadcaster.demo``: run the demo server with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..backends import Backend

__all__ = ["main", "parse_args"]

_MISSING_EXTRA = "the demo server needs uvicorn: pip install 'sse-broadcaster[demo]'"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sse_broadcaster.demo",
        description="Serve the sse-broadcaster demo page, its event stream and stats.",
        epilog=(
            "POST, PUT, PATCH and DELETE requests from another origin (a page on another "
            "host or port, known by their Origin, Referer or Sec-Fetch-Site headers) are "
            "refused with 403; requests that send none of these, such as curl's, are served."
        ),
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help=(
            "interface to bind (default %(default)s). Anyone who can reach it can publish "
            "into any room; the admin routes are off by default when --host is not a "
            "loopback address (see --admin). Cross-origin POSTs (from a page on another site) "
            "are refused either way"
        ),
    )
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default %(default)s)")
    admin = parser.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin",
        action="store_true",
        default=None,
        help=(
            "serve the admin routes POST /admin/drop-streams/ROOM and POST /admin/close/ROOM, "
            "which end a room's streams without credentials (default: on for a loopback "
            "--host, off otherwise)"
        ),
    )
    admin.add_argument(
        "--no-admin",
        dest="admin",
        action="store_false",
        help="leave the admin routes out (they answer 404)",
    )
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


def _is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine.

    A name other than ``localhost`` counts as not loopback: what it resolves
    to can change, and the safe side is admin off.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``admin`` resolved to a bool from ``--host``.

    Without ``--admin`` or ``--no-admin`` the admin routes are on only on a
    loopback address: they need no credentials (issue #10).
    """
    args = _parser().parse_args(argv)
    if args.admin is None:
        args.admin = _is_loopback(args.host)
        args.admin_reason = f"--host {args.host} is {'' if args.admin else 'not '}loopback"
    else:
        args.admin_reason = "--admin" if args.admin else "--no-admin"
    return args


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
    args = parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port must be between 0 and 65535, got {args.port}")
    try:
        import uvicorn
    except ImportError as exc:
        raise SystemExit(f"{_MISSING_EXTRA} ({exc})") from None

    from .. import EventBroadcaster
    from .app import create_app, demo_config

    backend = _redis_backend(args.redis) if args.redis else None
    app = create_app(EventBroadcaster(demo_config(), backend=backend), admin=args.admin)
    # Said before uvicorn's own start-up lines, so that whoever exposes the demo sees it.
    print(
        f"sse_broadcaster.demo: admin routes {'on' if args.admin else 'off'} ({args.admin_reason})",
        file=sys.stderr,
        flush=True,
    )
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
