"""The demo server: ``python -m sse_broadcaster.demo``.

A Starlette app (`create_app`) serving one page that follows a room with the
browser's own ``EventSource``, a form that publishes into it, a ticker, a
live stats panel, and an "agent run" page (``/run``) streaming a simulated
model's answer as a resumable run. Needs the ``demo`` extra:
``pip install 'sse-broadcaster[demo]'``.
"""

from __future__ import annotations

try:
    from .app import DEFAULT_ROOM, create_app, demo_config
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        f"sse_broadcaster.demo needs starlette and uvicorn ({exc}): "
        "pip install 'sse-broadcaster[demo]'"
    ) from exc

__all__ = ["DEFAULT_ROOM", "create_app", "demo_config"]
