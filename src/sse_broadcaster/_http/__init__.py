"""The machinery behind `sse_broadcaster.http` (private: import from there).

One concern per module, each importing only those listed before it:

- `_backends`: httpcore network backends: the wrapping base, and the native
  one (asyncio transports on asyncio, httpcore's AnyIO backend on trio);
- `_dns`: `DNSCacheBackend`, name resolution with a TTL cache;
- `_limits`: `HostLimitTransport` (requests in flight per origin) and the
  connection cap (TCP connections open in total);
- `_connection`: `HTTP11Connection`, one HTTP/1.1 connection of the pool
  (connect, then httpcore's `AsyncHTTP11Connection`, without a lock);
- `_pool`: the per-origin pool transport that turns httpx requests into
  httpcore ones;
- `_loops`: the shared client of each running event loop.
"""
