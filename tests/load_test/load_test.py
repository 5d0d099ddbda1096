"""Locust load test for the demo server (``python -m sse_broadcaster.demo``).

    locust -f tests/load_test/load_test.py -H http://127.0.0.1:8000 --headless \
        -t 30s -u 200 -r 20 --csv=tests/load_test/.results/results \
        --html=tests/load_test/.results/report.html

Two kinds of users, three readers for each publisher:

- ``SSEReader`` opens ``GET /events/{room}`` on one of ``LOAD_TEST_ROOMS``
  rooms (default 10), reads it for 5-15 s and reconnects. Locust records the
  time to the response headers as ``GET /events/[room]``, and every event
  received as ``SSE event (publish-to-receive)``: the time from the
  publisher's clock stamp in the event to its arrival;
- ``Publisher`` sends ``POST /publish/{room}`` with a JSON body holding that
  stamp, every 0.1-0.5 s (recorded as ``POST /publish/[room]``).

The reference target is a p95 response time under 200 ms with 200+ users.
See tests/load_test/README.md.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

ROOMS = int(os.environ.get("LOAD_TEST_ROOMS", "10"))


def _room() -> str:
    return f"load-{random.randrange(ROOMS)}"


class SSEReader(HttpUser):
    """Holds an event stream open and measures publish-to-receive per event."""

    weight = 3
    wait_time = between(0.1, 0.5)

    @task
    def read_stream(self) -> None:
        hold = random.uniform(5.0, 15.0)
        with self.client.get(
            f"/events/{_room()}",
            name="GET /events/[room]",
            headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
            stream=True,
            timeout=(5, 20),
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            response.success()
            deadline = time.time() + hold
            for line in response.iter_lines(chunk_size=None):
                if line.startswith(b"data:"):
                    self._record(line[5:].strip())
                if time.time() > deadline:
                    break

    def _record(self, data: bytes) -> None:
        try:
            sent = float(json.loads(data)["sent"])
        except (ValueError, KeyError, TypeError):
            return  # the demo's ticker events and the like carry no stamp
        events.request.fire(
            request_type="SSE",
            name="SSE event (publish-to-receive)",
            response_time=(time.time() - sent) * 1000,
            response_length=len(data),
            exception=None,
            context={},
        )


class Publisher(HttpUser):
    """Publishes small JSON events carrying the time they were sent."""

    weight = 1
    wait_time = between(0.1, 0.5)

    @task
    def publish(self) -> None:
        body = {"data": {"sent": time.time(), "text": "hello " * 10}, "event": "load"}
        self.client.post(f"/publish/{_room()}", json=body, name="POST /publish/[room]")
