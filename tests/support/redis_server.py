"""A private redis-server for the tests: started from PATH on a free port, or REDIS_URL.

Without a redis-server the Redis tests are skipped, unless
``SSE_BROADCASTER_REQUIRE_REDIS=1`` (set by CI) turns that into a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis

__all__ = [
    "RedisServer",
    "private_redis",
    "redis_server",
    "require_redis_server",
    "start_private_server",
]

REQUIRE_ENV = "SSE_BROADCASTER_REQUIRE_REDIS"


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_redis_server() -> str:
    """The redis-server binary; skips the test, or fails it when Redis is required."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not on PATH"
        if _required():
            pytest.fail(f"{message} and {REQUIRE_ENV}=1: install redis-server", pytrace=False)
        pytest.skip(message)
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process on 127.0.0.1 that a test may kill and restart (empty)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="sse-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start on the same port, empty (no persistence), and wait for PING."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the data is lost and clients see their connections drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        self._dir.cleanup()


def start_private_server() -> RedisServer:
    server = RedisServer(require_redis_server())
    server.start()
    return server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """The URL of a Redis shared by the session's tests (use a unique key prefix)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = start_private_server()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may SIGKILL and restart."""
    server = start_private_server()
    try:
        yield server
    finally:
        server.stop()
