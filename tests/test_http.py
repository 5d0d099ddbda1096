"""sse_broadcaster.http against real servers on 127.0.0.1 (see tests/support/http_servers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import math
import re
import shutil
import socket
import ssl
import subprocess
import threading
import weakref
from collections import Counter as Tally
from collections.abc import Sequence
from typing import Any

import anyio
import httpcore
import httpx
import pytest

from sse_broadcaster.http import (
    DNSCacheBackend,
    HostLimitTransport,
    HTTPClientConfig,
    aclose_http_clients,
    create_http_client,
    get_http_client,
)

from .support.clock import FakeClock
from .support.http_servers import Connection, Counters, Request, delayed, serve, stall

pytestmark = pytest.mark.anyio


async def _gather(n: int, fn: Any, *args: Any) -> None:
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(fn, *args)


# --------------------------------------------------------------------------- config


def test_defaults_are_the_reference_settings() -> None:
    config = HTTPClientConfig()
    assert config.max_connections == 100
    assert config.max_connections_per_host == 20
    assert config.keepalive_expiry == 30.0
    assert config.dns_cache_ttl == 300.0
    assert config.timeout == httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=10.0)
    assert config.limits == httpx.Limits(
        max_connections=100, max_keepalive_connections=100, keepalive_expiry=30.0
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_connections": 0}, "max_connections must be >= 1, got 0", id="total-0"),
        pytest.param(
            {"max_connections_per_host": 0},
            "max_connections_per_host must be >= 1, got 0",
            id="per-host-0",
        ),
        pytest.param(
            {"max_connections_per_host": 101},
            "max_connections_per_host must be <= max_connections (100), got 101",
            id="per-host-above-total",
        ),
        pytest.param(
            {"max_keepalive_connections": -1},
            "max_keepalive_connections must be >= 0, got -1",
            id="keepalive-connections-negative",
        ),
        pytest.param(
            {"keepalive_expiry": -1.0}, "keepalive_expiry must be >= 0, got -1.0", id="expiry-neg"
        ),
        pytest.param(
            {"keepalive_expiry": math.inf},
            "keepalive_expiry must be finite (use None for no limit), got inf",
            id="expiry-inf",
        ),
        pytest.param(
            {"dns_cache_ttl": -5}, "dns_cache_ttl must be >= 0, got -5", id="dns-ttl-negative"
        ),
        pytest.param(
            {"dns_cache_ttl": math.nan}, "dns_cache_ttl must be finite, got nan", id="dns-ttl-nan"
        ),
        pytest.param(
            {"connect_timeout": 0}, "connect_timeout must be > 0, got 0", id="connect-timeout-0"
        ),
        pytest.param(
            {"read_timeout": -1.0}, "read_timeout must be > 0, got -1.0", id="read-timeout-neg"
        ),
        pytest.param(
            {"write_timeout": 0.0}, "write_timeout must be > 0, got 0.0", id="write-timeout-0"
        ),
        pytest.param(
            {"pool_timeout": math.inf},
            "pool_timeout must be finite (use None for no limit), got inf",
            id="pool-timeout-inf",
        ),
    ],
)
def test_bad_config_values_raise_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        HTTPClientConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"max_connections": 1.5}, "max_connections must be an int, got 1.5", id="f"),
        pytest.param(
            {"max_connections_per_host": True},
            "max_connections_per_host must be an int, got True",
            id="bool",
        ),
        pytest.param(
            {"read_timeout": "5"},
            "read_timeout must be a number of seconds or None, got '5'",
            id="str",
        ),
    ],
)
def test_wrong_config_types_raise_type_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
        HTTPClientConfig(**kwargs)


def test_config_is_frozen_and_keyword_only() -> None:
    config = HTTPClientConfig()
    with pytest.raises(AttributeError):
        config.max_connections = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        HTTPClientConfig(5)  # type: ignore[misc]


@pytest.mark.parametrize("name", ["transport", "limits", "timeout", "proxy"])
def test_create_http_client_rejects_kwargs_that_bypass_the_config(name: str) -> None:
    with pytest.raises(TypeError, match=f"does not accept '{name}'"):
        create_http_client(**{name: None})


# --------------------------------------------------------------------------- httpx/httpcore guards


def test_error_table_matches_httpx_own_transport() -> None:
    # Our transport maps httpcore errors the way httpx.AsyncHTTPTransport does.
    # httpx keeps its table private: if this fails, httpx changed its mapping and
    # sse_broadcaster._http._pool.HTTPCORE_TO_HTTPX must follow.
    from httpx._transports import default as httpx_default

    from sse_broadcaster._http._pool import HTTPCORE_TO_HTTPX

    assert httpx_default._load_httpcore_exceptions() == HTTPCORE_TO_HTTPX
    exported = {
        obj
        for name in httpcore.__all__
        if isinstance(obj := getattr(httpcore, name), type) and issubclass(obj, Exception)
    }
    assert exported - set(HTTPCORE_TO_HTTPX) == {httpcore.ConnectionNotAvailable}


def test_httpcore_extension_points_are_still_there() -> None:
    # What this module is built on, all public httpcore API: single connections
    # (pooled here) and network backends.
    params = inspect.signature(httpcore.AsyncHTTPConnection).parameters
    for name in ("origin", "ssl_context", "keepalive_expiry", "http1", "http2", "retries"):
        assert name in params
    assert {"network_backend", "local_address", "socket_options"} <= set(params)
    for method in ("handle_async_request", "aclose", "is_available", "has_expired", "is_idle"):
        assert callable(getattr(httpcore.AsyncHTTPConnection, method))
    assert issubclass(httpcore.ConnectionNotAvailable, Exception)
    for method in ("connect_tcp", "connect_unix_socket", "sleep"):
        assert method in vars(httpcore.AsyncNetworkBackend)
    for method in ("read", "write", "aclose", "start_tls", "get_extra_info"):
        assert method in vars(httpcore.AsyncNetworkStream)
    params = inspect.signature(httpcore.AsyncNetworkBackend.connect_tcp).parameters
    assert list(params) == [
        "self",
        "host",
        "port",
        "timeout",
        "local_address",
        "socket_options",
    ]


# --------------------------------------------------------------------------- limits


async def test_per_host_limit_is_20_and_two_hosts_reach_40() -> None:
    both = Counters()
    async with (
        serve(delayed(0.4), shared=both) as a,
        serve(delayed(0.4), shared=both) as b,
        create_http_client() as client,
    ):

        async def get(url: str) -> None:
            assert (await client.get(url)).status_code == 200

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(get, a.url())
                tg.start_soon(get, b.url())
        assert a.counters.peak_in_flight == 20
        assert b.counters.peak_in_flight == 20
        assert both.peak_in_flight == 40
        assert a.counters.accepted == b.counters.accepted == 20
        assert both.requests == 60


async def test_total_never_exceeds_max_connections() -> None:
    total = Counters()
    async with (
        serve(delayed(0.5), shared=total) as s1,
        serve(delayed(0.5), shared=total) as s2,
        serve(delayed(0.5), shared=total) as s3,
        serve(delayed(0.5), shared=total) as s4,
        serve(delayed(0.5), shared=total) as s5,
        serve(delayed(0.5), shared=total) as s6,
        create_http_client() as client,
    ):
        servers = [s1, s2, s3, s4, s5, s6]

        async def get(url: str) -> None:
            assert (await client.get(url)).status_code == 200

        pools = client._transport.transport  # type: ignore[attr-defined]
        peak_connections = 0
        async with anyio.create_task_group() as tg:
            for _ in range(25):
                for server in servers:
                    tg.start_soon(get, server.url())

            async def sample() -> None:
                nonlocal peak_connections
                while total.requests < 150 or total.in_flight:
                    peak_connections = max(peak_connections, pools.connection_count())
                    await anyio.sleep(0.005)

            tg.start_soon(sample)
        assert total.peak_in_flight == 100  # 6 hosts x 20 would be 120
        assert total.accepted >= 100
        assert 0 < peak_connections <= 100
        assert all(s.counters.peak_in_flight <= 20 for s in servers)
        assert total.requests == 150


async def test_small_limits_are_enforced() -> None:
    config = HTTPClientConfig(max_connections=3, max_connections_per_host=2)
    total = Counters()
    async with (
        serve(delayed(0.2), shared=total) as a,
        serve(delayed(0.2), shared=total) as b,
        create_http_client(config) as client,
    ):
        await _gather(5, client.get, a.url())
        assert a.counters.peak_in_flight == 2
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(client.get, a.url())
                tg.start_soon(client.get, b.url())
        assert total.peak_in_flight == 3


async def test_idle_connections_of_other_hosts_make_room_for_new_ones() -> None:
    config = HTTPClientConfig(max_connections=2, max_connections_per_host=2)
    async with (
        serve(delayed(0.1)) as a,
        serve(delayed(0)) as b,
        serve(delayed(0)) as c,
        create_http_client(config) as client,
    ):
        pools = client._transport.transport  # type: ignore[attr-defined]
        await _gather(2, client.get, a.url())
        assert a.counters.accepted == 2
        assert pools.connection_count() == 2
        # A is idle: its whole pool is closed to make room for B.
        await client.get(b.url())
        await a.wait_open(0)
        assert pools.connection_count() == 1
        # B idle, A busy on one connection (and idle on another): C gets room.
        async with client.stream("GET", a.url()) as busy:
            await client.get(a.url())
            assert a.counters.open == 2
            await client.get(c.url())
            assert pools.connection_count() <= 2
            await busy.aread()
        await b.wait_open(0)
        assert c.counters.accepted == 1


async def test_slot_is_held_until_the_response_is_closed() -> None:
    async def body_then_wait(request: Request, conn: Connection) -> bool:
        await conn.respond(200, b"x" * 10)
        return True

    config = HTTPClientConfig(max_connections_per_host=1, pool_timeout=0.2)
    async with serve(body_then_wait) as server, create_http_client(config) as client:
        transport = client._transport
        assert isinstance(transport, HostLimitTransport)
        async with client.stream("GET", server.url()) as response:
            assert transport.in_flight(server.url()) == 1
            with pytest.raises(httpx.PoolTimeout, match="timed out waiting for one of 1"):
                await client.get(server.url())
            await response.aread()
        assert transport.in_flight(server.url()) == 0
        assert (await client.get(server.url())).status_code == 200
        assert transport._hosts == {}  # hosts nobody uses are forgotten


async def test_slot_is_released_when_the_request_fails() -> None:
    config = HTTPClientConfig(max_connections_per_host=1, read_timeout=0.1)
    async with serve(stall) as server, create_http_client(config) as client:
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                await client.get(server.url())
        transport = client._transport
        assert isinstance(transport, HostLimitTransport)
        assert transport._hosts == {}


async def test_cancelled_response_close_neither_leaks_nor_reuses_the_connection() -> None:
    # Closing a response is not shielded from cancellation on HTTP/1.1: a close
    # cancelled midway leaves the connection in an unknown state, so the pool
    # closes it, and gives back its slot and its place under max_connections.
    async with serve(delayed(0)) as server, create_http_client() as client:
        transport = client._transport
        assert isinstance(transport, HostLimitTransport)
        pools = transport.transport
        with anyio.CancelScope() as scope:
            async with client.stream("GET", server.url()) as response:
                scope.cancel()
                # On asyncio the body is read from the buffer without a
                # checkpoint; the close it ends with is cancelled at its first
                # (httpcore's lock). On trio the read itself is cancelled.
                await response.aread()
        assert scope.cancelled_caught
        assert transport.in_flight(server.url()) == 0
        assert pools.connection_count() == 0  # closed, not left busy
        assert (await client.get(server.url())).text == "ok"
        assert pools.connection_count() == 1
        assert server.counters.accepted == 2  # the first connection was not reused


async def test_connect_retries_and_trace_events_are_httpcore_ones() -> None:
    # HTTP/1.1 connections connect without httpcore.AsyncHTTPConnection but
    # keep its behaviour: ``retries`` connect attempts, and the same events for
    # the ``trace`` extension as a plain httpx client.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    events: dict[str, list[str]] = {}

    async def send(client: httpx.AsyncClient, key: str, url: str) -> None:
        names = events.setdefault(key, [])

        async def trace(name: str, info: dict[str, Any]) -> None:
            names.append(name)

        with contextlib.suppress(httpx.ConnectError):
            await client.get(url, extensions={"trace": trace})

    async with serve(delayed(0)) as server:
        async with create_http_client(retries=2) as ours:
            await send(ours, "ours ok", server.url())
            await send(ours, "ours refused", f"http://127.0.0.1:{port}/")
        transport = httpx.AsyncHTTPTransport(retries=2)
        async with httpx.AsyncClient(transport=transport) as plain:
            await send(plain, "httpx ok", server.url())
            await send(plain, "httpx refused", f"http://127.0.0.1:{port}/")
    assert events["ours ok"] == events["httpx ok"]
    assert "connection.connect_tcp.complete" in events["ours ok"]
    assert events["ours refused"] == events["httpx refused"]
    assert events["ours refused"].count("connection.connect_tcp.failed") == 3
    assert events["ours refused"].count("connection.retry.complete") == 2


# --------------------------------------------------------------------------- keep-alive


async def test_100_sequential_requests_reuse_one_connection() -> None:
    async with serve(delayed(0)) as server, create_http_client() as client:
        for _ in range(100):
            response = await client.get(server.url())
            assert response.text == "ok"
        assert server.counters.accepted == 1
        assert server.counters.requests == 100


async def test_idle_connection_is_closed_after_keepalive_expiry() -> None:
    config = HTTPClientConfig(keepalive_expiry=0.2)
    async with serve(delayed(0)) as server, create_http_client(config) as client:
        await client.get(server.url())
        await client.get(server.url())
        assert server.counters.accepted == 1
        await anyio.sleep(0.4)
        # httpcore drops expired connections when the pool is next used (it runs
        # no timer): the old connection closes and a new one serves the request.
        await client.get(server.url())
        assert server.counters.accepted == 2
        await server.wait_open(1)


async def test_connection_closed_by_the_server_is_not_reused() -> None:
    async def answer_then_hang_up(request: Request, conn: Connection) -> bool:
        await conn.respond(200, b"ok")  # no "Connection: close": looks reusable
        return False

    async with serve(answer_then_hang_up) as server, create_http_client() as client:
        pools = client._transport.transport  # type: ignore[attr-defined]
        for expected in (1, 2, 3):
            assert (await client.get(server.url())).status_code == 200
            await server.wait_open(0)
            assert server.counters.accepted == expected
        assert (await client.get(server.url())).status_code == 200
        assert pools.connection_count() <= 1  # the dead ones were closed and uncounted


async def test_most_recently_used_connection_is_reused_and_idle_ones_are_capped() -> None:
    config = HTTPClientConfig(max_connections_per_host=5, max_keepalive_connections=2)
    async with serve(delayed(0.1)) as server, create_http_client(config) as client:
        await _gather(5, client.get, server.url())
        assert server.counters.accepted == 5
        await server.wait_open(2)  # three of the five were closed when they went idle
        for _ in range(3):
            await client.get(server.url())
        numbers = [request.connection_number for request in server.requests]
        assert len(set(numbers[-3:])) == 1  # one connection: the most recently used
        assert numbers[-1] in numbers[:5]
        assert server.counters.accepted == 5


async def test_large_body_read_slowly_arrives_whole() -> None:
    # More than the client buffers before it stops reading the socket.
    body = bytes(range(256)) * 8192  # 2 MiB
    async with serve(delayed(0, body=body)) as server, create_http_client() as client:
        async with client.stream("GET", server.url()) as response:
            await anyio.sleep(0.2)
            received = b"".join([chunk async for chunk in response.aiter_raw()])
        assert received == body
        assert (await client.get(server.url())).content == body
        assert server.counters.accepted == 1


async def test_connection_is_kept_before_keepalive_expiry() -> None:
    config = HTTPClientConfig(keepalive_expiry=5.0)
    async with serve(delayed(0)) as server, create_http_client(config) as client:
        await client.get(server.url())
        await anyio.sleep(0.3)
        await client.get(server.url())
        assert server.counters.accepted == 1


# --------------------------------------------------------------------------- DNS cache


class CountingResolver:
    """Resolves every name to 127.0.0.1, counting calls; can be told to fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: Tally[str] = Tally()
        self.delay = delay
        self.fail_next: list[BaseException | None] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls[host] += 1
        await anyio.sleep(self.delay)
        if self.fail_next:
            failure = self.fail_next.pop(0)
            if failure is not None:
                raise failure
            return []
        return ["127.0.0.1"]


async def test_resolver_is_called_once_per_host_per_ttl() -> None:
    clock = FakeClock(1000.0)
    resolver = CountingResolver()
    close = {"Connection": "close"}
    config = HTTPClientConfig(dns_cache_ttl=300.0)
    async with (
        serve(delayed(0)) as server,
        create_http_client(config, resolver=resolver, clock=clock) as client,
    ):
        a = f"http://svc-a.test:{server.port}/"
        b = f"http://svc-b.test:{server.port}/"
        for _ in range(3):
            await client.get(a, headers=close)
            await client.get(b, headers=close)
        assert server.counters.accepted == 6  # six connections...
        assert resolver.calls == {"svc-a.test": 1, "svc-b.test": 1}  # ...two lookups
        assert server.requests[0].headers["host"] == f"svc-a.test:{server.port}"

        clock.now += 299.0
        await client.get(a, headers=close)
        assert resolver.calls["svc-a.test"] == 1
        clock.now += 1.0  # the entry is now 300 s old
        await client.get(a, headers=close)
        await client.get(a, headers=close)
        assert resolver.calls == {"svc-a.test": 2, "svc-b.test": 1}


async def test_concurrent_connections_share_one_lookup() -> None:
    resolver = CountingResolver(delay=0.1)
    async with (
        serve(delayed(0)) as server,
        create_http_client(resolver=resolver) as client,
    ):
        await _gather(10, client.get, f"http://svc.test:{server.port}/")
        assert server.counters.accepted == 10
        assert resolver.calls == {"svc.test": 1}


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(socket.gaierror(socket.EAI_NONAME, "Name or service not known"), id="error"),
        pytest.param(None, id="no-address"),
    ],
)
async def test_failed_resolution_is_not_cached(failure: BaseException | None) -> None:
    resolver = CountingResolver()
    resolver.fail_next = [failure]
    async with serve(delayed(0)) as server, create_http_client(resolver=resolver) as client:
        url = f"http://svc.test:{server.port}/"
        with pytest.raises(httpx.ConnectError, match=r"cannot resolve 'svc\.test'"):
            await client.get(url)
        assert (await client.get(url)).status_code == 200
        assert resolver.calls == {"svc.test": 2}
        assert server.counters.accepted == 1


async def test_zero_ttl_disables_the_cache() -> None:
    resolver = CountingResolver()
    config = HTTPClientConfig(dns_cache_ttl=0)
    async with (
        serve(delayed(0)) as server,
        create_http_client(config, resolver=resolver) as client,
    ):
        for _ in range(3):
            await client.get(f"http://svc.test:{server.port}/", headers={"Connection": "close"})
        assert resolver.calls == {"svc.test": 3}


async def test_ip_literals_skip_the_resolver_and_later_addresses_are_tried() -> None:
    calls: list[str] = []

    async def resolver(host: str, port: int) -> Sequence[str]:
        calls.append(host)
        # Nothing listens on 127.0.0.2 (the server binds 127.0.0.1 only): refused,
        # so the second address is tried.
        return ["127.0.0.2", "127.0.0.1"]

    backend = DNSCacheBackend(resolver=resolver)
    assert await backend.resolve("127.0.0.1", 80) == ("127.0.0.1",)
    assert await backend.resolve("[::1]", 80) == ("::1",)
    assert calls == []
    async with serve(delayed(0)) as server:
        stream = await backend.connect_tcp("svc.test", server.port, timeout=2.0)
        await stream.aclose()
        await server.wait_open(0)
        assert server.counters.accepted == 1
    assert calls == ["svc.test"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for svc.test (its own CA): (cert, key) paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("needs the openssl command: apt-get install -y openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert, "-subj", "/CN=svc.test",
         "-addext", "subjectAltName=DNS:svc.test"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_verifies_the_host_name_not_the_cached_address(
    certificate: tuple[str, str],
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=cert)
    resolver = CountingResolver()
    async with (
        serve(delayed(0), ssl_context=server_context) as server,
        create_http_client(resolver=resolver, verify=client_context) as client,
    ):
        pools = client._transport.transport  # type: ignore[attr-defined]
        for _ in range(3):
            response = await client.get(f"https://svc.test:{server.port}/")
            assert response.text == "ok"
        assert server.counters.accepted == 1
        assert resolver.calls == {"svc.test": 1}
        assert pools.connection_count() == 1
        # Same address, other name: the certificate does not match.
        with pytest.raises(httpx.ConnectError, match="certificate verify failed"):
            await client.get(f"https://other.test:{server.port}/")
        assert pools.connection_count() == 1  # the failed handshake gave its slot back
    assert pools.connection_count() == 0


async def test_tls_offers_only_http11_even_on_a_context_shared_with_h2(
    certificate: tuple[str, str],
) -> None:
    # HTTP/1.1 connections speak h11 whatever the handshake picks, so they
    # offer only http/1.1 at each handshake, even on a context that another
    # client (offering h2) set up meanwhile.
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    client_context = ssl.create_default_context(cafile=cert)
    async with (
        serve(delayed(0), ssl_context=server_context) as server,
        create_http_client(resolver=CountingResolver(), verify=client_context) as client,
    ):
        client_context.set_alpn_protocols(["h2", "http/1.1"])
        response = await client.get(f"https://svc.test:{server.port}/")
        assert response.text == "ok"
        assert response.http_version == "HTTP/1.1"
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "http/1.1"


async def test_default_resolver_resolves_localhost() -> None:
    async with serve(delayed(0)) as server, create_http_client() as client:
        response = await client.get(f"http://localhost:{server.port}/")
        assert response.status_code == 200


# --------------------------------------------------------------------------- timeouts


async def test_connect_timeout_covers_name_resolution() -> None:
    async def slow_resolver(host: str, port: int) -> Sequence[str]:
        await anyio.sleep(math.inf)
        raise AssertionError

    config = HTTPClientConfig(connect_timeout=0.2)
    async with create_http_client(config, resolver=slow_resolver) as client:
        with pytest.raises(httpx.ConnectTimeout, match=r"timed out connecting to svc\.test:80"):
            await client.get("http://svc.test/")


async def test_connect_timeout_when_the_server_never_accepts() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so
    # the connection attempt hangs until the connect timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        config = HTTPClientConfig(connect_timeout=0.3)
        async with create_http_client(config) as client:
            with pytest.raises(httpx.ConnectTimeout):
                await client.get(f"http://127.0.0.1:{port}/")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_read_timeout() -> None:
    config = HTTPClientConfig(read_timeout=0.2)
    async with serve(stall) as server, create_http_client(config) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(server.url())


# httpx leaves its request-body generator unexhausted when a write fails, and
# trio warns when such a generator is collected (an httpx matter, not ours).
@pytest.mark.filterwarnings("ignore:Async generator 'httpx._content:ResourceWarning")
async def test_write_timeout() -> None:
    async def never_read(request: Request, conn: Connection) -> bool:
        await anyio.sleep(math.inf)
        return False

    # The server reads the headers, then never the body: once the socket
    # buffers are full, the send blocks until the write timeout.
    config = HTTPClientConfig(write_timeout=0.3)
    async with serve(never_read) as server, create_http_client(config) as client:
        with pytest.raises(httpx.WriteTimeout):
            await client.post(server.url(), content=b"x" * 64 * 1_048_576)


async def test_pool_timeout_total() -> None:
    config = HTTPClientConfig(max_connections=1, max_connections_per_host=1, pool_timeout=0.2)
    other = HTTPClientConfig(max_connections=1, max_connections_per_host=1, pool_timeout=0.2)
    assert config == other
    async with (
        serve(stall) as busy,
        serve(delayed(0)) as free,
        create_http_client(config) as client,
    ):
        async with anyio.create_task_group() as tg:

            async def hold() -> None:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get(busy.url(), timeout=httpx.Timeout(5.0, read=1.0))

            tg.start_soon(hold)
            await busy.wait_open(1)
            with pytest.raises(httpx.PoolTimeout):
                await client.get(free.url())
        assert free.counters.accepted == 0


# --------------------------------------------------------------------------- shared client per loop


async def test_shared_client_is_one_per_loop_and_renewed_after_close() -> None:
    async with serve(delayed(0)) as server:
        client = get_http_client()
        try:
            assert get_http_client() is client
            assert isinstance(client._transport, HostLimitTransport)
            assert (await client.get(server.url())).status_code == 200
        finally:
            await aclose_http_clients()
        assert client.is_closed
        await aclose_http_clients()  # nothing to close: no error
        renewed = get_http_client()
        try:
            assert renewed is not client
            assert (await renewed.get(server.url())).status_code == 200
        finally:
            await aclose_http_clients()


def test_shared_client_outside_an_event_loop_raises() -> None:
    with pytest.raises(RuntimeError):
        get_http_client()


async def test_aclose_http_clients_closes_the_client_of_every_running_loop(
    anyio_backend: str,
) -> None:
    # This loop and another, running at once in another thread on the other
    # backend; each has its own shared client with a connection open in its pool.
    other_backend = {"asyncio": "trio", "trio": "asyncio"}[anyio_backend]
    ready = threading.Event()
    proceed = threading.Event()
    clients: dict[str, httpx.AsyncClient] = {}
    statuses: list[int] = []
    errors: list[BaseException] = []

    async with serve(delayed(0)) as server:

        async def other_loop() -> None:
            clients["other"] = client = get_http_client()
            statuses.append((await client.get(server.url())).status_code)
            ready.set()
            with anyio.fail_after(10):  # closed by the other thread's call
                while not client.is_closed:
                    await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(proceed.wait, 10)
            clients["renewed"] = renewed = get_http_client()
            assert renewed is not client
            statuses.append((await renewed.get(server.url())).status_code)
            await aclose_http_clients()

        def run() -> None:
            try:
                anyio.run(other_loop, backend=other_backend)
            except BaseException as exc:
                errors.append(exc)
                ready.set()

        own = get_http_client()
        assert (await own.get(server.url())).status_code == 200
        thread = threading.Thread(target=run)
        thread.start()
        try:
            await anyio.to_thread.run_sync(ready.wait, 10)
            assert not errors, errors
            assert clients["other"] is not own
            await server.wait_open(2)
            await aclose_http_clients()
            # Both are closed when the call returns, each on its own loop, and
            # so are the connections of both pools.
            assert own.is_closed
            assert clients["other"].is_closed
            await server.wait_open(0)
        finally:
            proceed.set()
            await anyio.to_thread.run_sync(thread.join, 30)
    assert not thread.is_alive()
    assert not errors, errors
    assert statuses == [200, 200]
    assert clients["renewed"].is_closed


async def test_waiting_for_a_blocked_loop_can_be_cancelled_and_its_close_still_happens() -> None:
    # The other loop blocks its thread for a while: the close handed to it
    # waits; cancelling the call stops the wait, not the close.
    ready = threading.Event()
    unblock = threading.Event()
    clients: list[httpx.AsyncClient] = []
    errors: list[BaseException] = []

    async with serve(delayed(0)) as server:

        async def blocked_loop() -> None:
            client = get_http_client()
            clients.append(client)
            assert (await client.get(server.url())).status_code == 200
            ready.set()
            unblock.wait(10)  # blocks this event loop, on purpose
            with anyio.fail_after(10):
                while not client.is_closed:
                    await anyio.sleep(0.01)

        def run() -> None:
            try:
                anyio.run(blocked_loop, backend="asyncio")
            except BaseException as exc:
                errors.append(exc)
                ready.set()

        thread = threading.Thread(target=run)
        thread.start()
        try:
            await anyio.to_thread.run_sync(ready.wait, 10)
            with anyio.move_on_after(0.5) as scope:
                await aclose_http_clients()
            assert scope.cancelled_caught
            assert not clients[0].is_closed
        finally:
            unblock.set()
            await anyio.to_thread.run_sync(thread.join, 30)
        assert not errors, errors
        assert clients[0].is_closed
        await server.wait_open(0)


def test_client_of_an_ended_loop_is_forgotten() -> None:
    # An asyncio loop that was closed (here still referenced, so its entry
    # stays) with its shared client open: nothing can run that client's close
    # any more, so the next aclose_http_clients, on another loop, drops it.
    async def take() -> weakref.ref[httpx.AsyncClient]:
        return weakref.ref(get_http_client())

    loop = asyncio.new_event_loop()
    try:
        ref = loop.run_until_complete(take())
    finally:
        loop.close()
    assert ref() is not None
    anyio.run(aclose_http_clients, backend="trio")
    gc.collect()
    assert ref() is None
    assert loop.is_closed()  # the loop itself is still there


def test_client_of_an_idle_asyncio_loop_is_kept_until_that_loop_runs() -> None:
    # An asyncio loop between two run_until_complete calls runs nothing: its
    # client cannot be closed from another loop, and is closed by a call made
    # on it later.
    async def take() -> httpx.AsyncClient:
        return get_http_client()

    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(take())
        anyio.run(aclose_http_clients, backend="trio")
        assert not client.is_closed
        assert loop.run_until_complete(take()) is client
        loop.run_until_complete(aclose_http_clients())
        assert client.is_closed
    finally:
        loop.close()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "gopher://127.0.0.1/"])
async def test_an_unsupported_scheme_is_httpx_s_own_error(url: str) -> None:
    async with create_http_client() as client:
        with pytest.raises(httpx.UnsupportedProtocol, match="unsupported protocol"):
            await client.get(url)
