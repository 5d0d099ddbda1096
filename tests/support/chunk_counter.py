"""Count the writes a server made to many SSE streams, from another process.

    python -m tests.support.chunk_counter URL STREAMS EVENTS

Opens STREAMS connections to URL (``http://127.0.0.1:PORT/path``), prints
``ready`` once every response head arrived, reads every stream until it
holds EVENTS events (blank-line terminated blocks; comments and the opening
``retry:`` are not counted), then prints one JSON line: the number of HTTP
chunks each stream needed for its events. Each write of our adapters is one
chunk, so this is the number of writes. A process of its own, with plain
non-blocking sockets and a selector, so that the clients cost the server's
event loop nothing, as in a real deployment.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time


class Stream:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.head = False
        self.events = 0
        self.chunks = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if not self.head:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 200 " not in status:
                raise SystemExit(f"unexpected status: {status!r}")
            del self.buffer[: end + 4]
            self.head = True
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return
            chunk = bytes(self.buffer[line_end + 2 : line_end + 2 + size])
            del self.buffer[: line_end + 2 + size + 2]
            if size == 0:
                raise SystemExit("a stream ended early")
            blocks = [b for b in chunk.split(b"\n\n") if b]
            counted = [b for b in blocks if not b.startswith((b":", b"retry:"))]
            if counted:
                self.chunks += 1
                self.events += len(counted)


def main() -> None:
    url, count, expected = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    selector = selectors.DefaultSelector()
    streams = []
    request = (
        f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(request)
        sock.setblocking(False)
        stream = Stream(sock)
        streams.append(stream)
        selector.register(sock, selectors.EVENT_READ, stream)
    deadline = time.monotonic() + 60
    announced = False
    while any(s.events < expected for s in streams):
        if time.monotonic() > deadline:
            raise SystemExit("timed out: " + str(sorted(s.events for s in streams)[:5]))
        if not announced and all(s.head for s in streams):
            print("ready", flush=True)
            announced = True
        for key, _ in selector.select(1.0):
            stream = key.data
            data = stream.sock.recv(262_144)
            if not data:
                raise SystemExit("a connection closed early")
            stream.feed(data)
    print(json.dumps([s.chunks for s in streams]), flush=True)
    for stream in streams:
        stream.sock.close()


if __name__ == "__main__":
    main()
