"""What the tests share: real servers to run, a fake clock, a spec parser, checks.

- `servers`: uvicorn and aiohttp apps on 127.0.0.1 with a free port, raw sockets;
- `http_servers`: a small scriptable HTTP server for the HTTP pool and client tests;
- `demo_server`: the demo app on uvicorn;
- `redis_server`: a real redis-server (the ``redis_server`` and ``private_redis``
  fixtures, registered by tests/conftest.py);
- `redis_node`: a broadcaster process on Redis, driven by tests/test_redis.py;
- `sse_parser`: a WHATWG event-stream parser written from the spec;
- `clock`: `FakeClock`, the injectable clock;
- `core`: checks on a broadcaster shared by the core and backend tests.
"""
