"""The public surface: __all__, module names of re-exports, no optional imports, the error tree."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sse_broadcaster
import sse_broadcaster.backends
from sse_broadcaster import BroadcasterError, EventBroadcaster
from sse_broadcaster.backends import Backend, MemoryBackend

pytestmark = pytest.mark.anyio

INCLUDED_PRIVATE_NAMES = {"__version__"}


def _public_names(module: object) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if (not name.startswith("_") or name in INCLUDED_PRIVATE_NAMES)
        and not inspect.ismodule(value)
    ]


def test_all_equals_the_public_names_sorted() -> None:
    assert sse_broadcaster.__all__ == sorted(sse_broadcaster.__all__)
    assert set(sse_broadcaster.__all__) == set(_public_names(sse_broadcaster))
    assert len(sse_broadcaster.__all__) == len(set(sse_broadcaster.__all__))


def test_backends_all_equals_its_public_names() -> None:
    assert sse_broadcaster.backends.__all__ == sorted(sse_broadcaster.backends.__all__)
    assert set(sse_broadcaster.backends.__all__) == set(_public_names(sse_broadcaster.backends))


def test_design_names_are_exported() -> None:
    assert {
        "BroadcasterConfig",
        "Event",
        "EventBroadcaster",
        "Subscription",
        "MultiSubscription",
        "MemoryMetrics",
        "OverflowPolicy",
        "BroadcasterError",
        "BroadcasterClosedError",
        "SessionLimitError",
        "SubscriberLimitError",
        "SlowSubscriberError",
        "EventTooLargeError",
        "BackendUnavailableError",
        "check_session_id",
        # resumable runs (#13)
        "RunActiveError",
        "RunInfo",
        "RunLimitError",
        "RunState",
        "RUN_END_EVENT",
    } <= set(sse_broadcaster.__all__)


def test_check_session_id_is_the_package_s() -> None:
    assert sse_broadcaster.check_session_id.__module__ == "sse_broadcaster"
    assert sse_broadcaster.check_session_id("room-1") == "room-1"


def test_the_hub_is_not_public() -> None:
    # Backends get a private hub (#11.3): its calls are not on EventBroadcaster.
    for name in ("deliver", "end_session", "has_subscribers"):
        assert not hasattr(EventBroadcaster, name)


@pytest.mark.parametrize("module", ["_subscription.py", "_multi.py", "_hub.py", "_metrics.py"])
def test_no_module_under_the_broadcaster_imports_it(module: str) -> None:
    source = (Path(sse_broadcaster.__file__).parent / module).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert "_broadcaster" not in imported


@pytest.mark.parametrize(
    "name", [n for n in sse_broadcaster.__all__ if isinstance(getattr(sse_broadcaster, n), type)]
)
def test_reexported_classes_belong_to_the_package(name: str) -> None:
    cls = getattr(sse_broadcaster, name)
    assert cls.__module__ == "sse_broadcaster"
    assert repr(cls) in {f"<class 'sse_broadcaster.{name}'>", f"<enum '{name}'>"}


def test_version_is_a_string() -> None:
    assert isinstance(sse_broadcaster.__version__, str)
    assert sse_broadcaster.__version__[0].isdigit()


def test_import_does_not_import_optional_dependencies() -> None:
    code = (
        "import json, sys; import sse_broadcaster; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('starlette', 'aiohttp', 'redis', 'fastapi', 'uvicorn', 'trio'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == []


def test_every_error_derives_from_broadcaster_error() -> None:
    errors = [getattr(sse_broadcaster, n) for n in sse_broadcaster.__all__ if n.endswith("Error")]
    assert len(errors) == 10
    for error in errors:
        assert issubclass(error, BroadcasterError)
    assert issubclass(sse_broadcaster.EventTooLargeError, ValueError)


def test_memory_backend_follows_the_backend_protocol() -> None:
    assert isinstance(MemoryBackend(), Backend)


async def test_a_memory_backend_serves_one_broadcaster() -> None:
    backend = MemoryBackend()
    async with EventBroadcaster(backend=backend) as broadcaster:
        assert broadcaster.backend is backend
        with pytest.raises(RuntimeError, match="a MemoryBackend serves one EventBroadcaster, once"):
            async with EventBroadcaster(backend=backend):
                pass


API_PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _documented_surface() -> dict[str, set[str]]:
    """The table "The public surface on one screen" of docs/api.md: module -> names."""
    surface: dict[str, set[str]] = {}
    for line in API_PAGE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `sse_broadcaster"):
            continue
        module_cell, names_cell = line.strip("|").split("|")[:2]
        module = module_cell.split("`")[1]
        surface[module] = set(names_cell.split("`")[1::2])
    return surface


def test_the_api_page_lists_the_whole_public_surface() -> None:
    surface = _documented_surface()
    assert "sse_broadcaster" in surface  # the table was found and read
    for module_name, names in surface.items():
        module = importlib.import_module(module_name)
        assert module.__all__ == sorted(module.__all__), module_name
        assert set(module.__all__) == names, module_name
