"""A loopback HTTP file server that behaves like a CDN or an object store for fetch tests and the
fetch benchmark: single byte ranges (``206``, ``Content-Range``, an ``ETag``), a per-connection
rate cap (what makes parallel connections pay off), and faults on demand: no range support, or a
connection cut once in the middle of the part that starts at a given offset.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_BLOCK = 256 << 10


class RangeServer:
    """Serves ``files`` (URL path -> file on disk) on 127.0.0.1.

    ``ranges``: honour ``Range`` (else every answer is the whole file, ``200``). ``rate``: bytes per
    second per connection (None: as fast as it goes). ``cut_at``: part start offsets whose first
    answer stops after ``cut_after`` bytes (the connection drops, as a flaky network does).
    ``requests``: (path, Range header) of every GET, in order."""

    def __init__(
        self,
        files: dict[str, Path],
        *,
        ranges: bool = True,
        rate: float | None = None,
        cut_at: set[int] | None = None,
        cut_after: int = 100_000,
    ):
        self.files = {k.lstrip("/"): Path(v) for k, v in files.items()}
        self.ranges, self.rate = ranges, rate
        self.cut_at, self.cut_after = set(cut_at or ()), cut_after
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._get(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # a client that hung up: no traceback
                import sys

                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.split("?", 1)[0].lstrip("/")
        asked = h.headers.get("Range")
        with self.lock:
            self.requests.append((name, asked))
        path = self.files.get(name)
        if path is None:
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        size = path.stat().st_size
        etag = '"' + hashlib.sha1(f"{path}:{size}:{path.stat().st_mtime_ns}".encode()).hexdigest() + '"'
        match = _RANGE.match(asked or "") if self.ranges else None
        start, end = 0, size - 1
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            h.send_response(200)
            if self.ranges:
                h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        h.send_header("ETag", etag)
        h.end_headers()
        cut = None
        with self.lock:
            if match and start in self.cut_at:
                self.cut_at.discard(start)
                cut = self.cut_after
        try:
            for block in self._blocks(path, start, end, cut):
                h.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError):
            return
        if cut is not None:
            h.close_connection = True
            h.wfile.flush()
            h.connection.close()

    def _blocks(self, path: Path, start: int, end: int, cut: int | None) -> Iterator[bytes]:
        sent, began = 0, time.monotonic()
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start + 1 if cut is None else min(cut, end - start + 1)
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    return
                left -= len(block)
                sent += len(block)
                yield block
                if self.rate:
                    ahead = sent / self.rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RangeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    """``size`` pseudo-random bytes (fast: a repeated 1 MiB block, varied per MiB)."""
    import random

    rng = random.Random(seed)
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(len(block), left)
            f.write(rng.randbytes(16) + block[16:n] if n > 16 else block[:n])
            left -= n
    return path
