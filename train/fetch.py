"""Fetching big files at wire speed: several concurrent range requests, as Replicate's pget does.

One HTTP stream from a CDN or an object store is capped per connection (typically 100–300 MB/s);
a base pipeline is tens of GB. So a URL is fetched as ``parts`` of ``PART_BYTES`` over
``connections`` concurrent requests (``ADVANCED_TRAINER_FETCH_CONNECTIONS``, default 16) on the
project's one HTTP library (httpx), two ways:

- ``fetch_file(url, dest)``: the parts are written in place (``os.pwrite``) into a file of the final
  size; a cut part is asked again from where it stopped (only the missing bytes); the size, and
  the sha256 when one is known, are checked before the file is renamed into place.
- ``open_stream(url)``: the parts are read in order as a file object, the fetched parts held in
  memory in a bounded window (``window`` parts: memory stays flat whatever the size), so a
  ``.tar`` / ``.tar.gz`` can be extracted while it arrives (``train/weights.py``): disk holds one
  copy, and the fetch and the unpacking overlap.

A server that does not honour ranges (no ``206`` to ``Range: bytes=0-0``) gets one stream
(``train.http.download``, resumable). No external tool: aria2 or pget would be one more binary in
the image and a second retry and error path; the range logic is a hundred lines on httpx.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .http import (
    DEFAULT_RETRY,
    USER_AGENT,
    DownloadError,
    RetryPolicy,
    _status_error,
    download,
)

PART_BYTES = 16 << 20  # parts written in place (fetch_file)
STREAM_PART_BYTES = 4 << 20  # parts held in memory until read (RangeStream): the window's unit
DEFAULT_CONNECTIONS = 16
_READ = 1 << 20


def connections_from_env() -> int:
    raw = os.environ.get("ADVANCED_TRAINER_FETCH_CONNECTIONS", "").strip()
    return max(1, min(64, int(raw))) if raw.isdigit() else DEFAULT_CONNECTIONS


@dataclass(frozen=True)
class Remote:
    """What the server says of a URL: its size, whether it serves ranges, the validator a range
    request must match (the file must not change between parts)."""

    size: int | None
    ranges: bool
    validator: str | None


def probe(url: str, timeout: float = 60.0, retry: RetryPolicy = DEFAULT_RETRY) -> Remote:
    """``GET`` of the first byte: a ``206`` with ``Content-Range: bytes 0-0/SIZE`` means ranges work."""

    def ask() -> Remote:
        headers = {"User-Agent": USER_AGENT, "Range": "bytes=0-0"}
        with httpx.stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
            if r.status_code == 416:  # no first byte: an empty file (one plain stream fetches it)
                return Remote(None, False, None)
            if r.status_code not in (200, 206):
                raise _status_error(url, r)
            validator = r.headers.get("etag") or r.headers.get("last-modified")
            total = r.headers.get("content-range", "").rpartition("/")[2]
            if r.status_code == 206 and total.isdigit():
                return Remote(int(total), True, validator)
            length = r.headers.get("content-length", "")
            return Remote(int(length) if length.isdigit() else None, False, validator)

    return _as_download_error(url, lambda: retry.call(ask))


def _as_download_error(url: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except DownloadError:
        raise
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise DownloadError(url, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None


def _parts(size: int, part: int) -> list[tuple[int, int]]:
    """(start, end inclusive) of each part."""
    return [(s, min(s + part, size) - 1) for s in range(0, size, part)]


def _client(connections: int, timeout: float) -> httpx.Client:
    """One client for all the parts of a fetch: its connections are reused (a client per request
    would build a TLS context each time, tens of milliseconds of CPU per part)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.Client(
        timeout=timeout, follow_redirects=True, limits=limits, headers={"User-Agent": USER_AGENT}
    )


class _Part:
    """One byte range, fetched with retries; each retry asks only for the bytes still missing."""

    def __init__(
        self, client: httpx.Client, url: str, remote: Remote, start: int, end: int, retry: RetryPolicy
    ):
        self.client, self.url, self.remote, self.start, self.end = client, url, remote, start, end
        self.retry = retry
        self.done = 0  # bytes of this range already delivered to ``sink``

    def fetch(self, sink: Callable[[int, bytes], None]) -> None:
        _as_download_error(self.url, lambda: self.retry.call(lambda: self._attempt(sink)))

    def _attempt(self, sink: Callable[[int, bytes], None]) -> None:
        first = self.start + self.done
        if first > self.end:
            return
        headers = {"Range": f"bytes={first}-{self.end}"}
        if self.remote.validator:
            headers["If-Range"] = self.remote.validator  # a changed file answers 200: refused below
        with self.client.stream("GET", self.url, headers=headers) as r:
            if r.status_code != 206:
                if r.status_code == 200:
                    raise DownloadError(self.url, "the file changed on the server while it was fetched")
                raise _status_error(self.url, r)
            for chunk in r.iter_bytes():  # as the network hands them: a cut keeps what came before it
                chunk = chunk[: self.end + 1 - (self.start + self.done)]
                sink(self.start + self.done, chunk)
                self.done += len(chunk)
        if self.start + self.done <= self.end:
            raise DownloadError(
                self.url,
                f"the connection ended {self.end + 1 - self.start - self.done} bytes short of a part",
                retryable=True,
            )


def fetch_file(
    url: str,
    dest: Path,
    *,
    connections: int | None = None,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: Callable[[int, int | None], Any] | None = None,
    part_bytes: int | None = None,
    timeout: float = 60.0,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> Path:
    """``url`` into ``dest`` over ``connections`` range requests (one stream when the server does not
    serve ranges), checked against ``expected_size`` / the server's size and ``sha256`` before it is
    renamed into place. DownloadError names the URL without its query string."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remote = probe(url, timeout, retry)
    if expected_size is not None and remote.size is not None and remote.size != expected_size:
        raise DownloadError(url, f"the server has {remote.size} bytes, {expected_size} were expected")
    part = dest.with_name(dest.name + ".part")
    if not remote.ranges or not remote.size:
        download(url, part, progress=progress, timeout=timeout, retry=retry)  # resumable, one stream
    else:
        _fetch_ranges(
            url, remote, part, connections or connections_from_env(), part_bytes, timeout, retry, progress
        )
    got = part.stat().st_size
    want = expected_size if expected_size is not None else remote.size
    if want is not None and got != want:
        part.unlink(missing_ok=True)
        raise DownloadError(url, f"got {got} bytes, expected {want}")
    if sha256 and _sha256(part) != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            url, f"the sha256 does not match the expected {sha256[:16]}…; the file was not kept"
        )
    os.replace(part, dest)
    return dest


def _fetch_ranges(url, remote, part, connections, part_bytes, timeout, retry, progress) -> None:
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    lock, done = threading.Lock(), [0]
    client = _client(connections, timeout)

    def sink(offset: int, data: bytes) -> None:
        os.pwrite(fd, data, offset)
        if progress:
            with lock:
                done[0] += len(data)
                progress(done[0], remote.size)

    try:
        os.ftruncate(fd, remote.size)
        ranges = [
            _Part(client, url, remote, s, e, retry) for s, e in _parts(remote.size, part_bytes or PART_BYTES)
        ]
        with ThreadPoolExecutor(max_workers=min(connections, len(ranges))) as pool:
            for future in [pool.submit(r.fetch, sink) for r in ranges]:
                future.result()  # the first failure (after its retries) is the answer
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
        client.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RangeStream:
    """The bytes of ``url`` in order, as a read-only file object, fetched ahead in parts over
    ``connections`` requests. At most ``window`` parts (default twice the connections, 4 MiB each)
    are fetched and not yet read, so memory stays at about ``window * part_bytes`` whatever the size. ``close()`` stops the fetching."""

    def __init__(
        self,
        url: str,
        remote: Remote,
        *,
        connections: int,
        part_bytes: int | None = None,
        window: int | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
    ):
        assert remote.ranges and remote.size is not None
        self.url, self.size = url, remote.size
        self.client = _client(connections, timeout)
        self.parts = [
            _Part(self.client, url, remote, s, e, retry)
            for s, e in _parts(remote.size, part_bytes or STREAM_PART_BYTES)
        ]
        self.ready: dict[int, bytearray] = {}
        self.failed: BaseException | None = None
        self.next_part, self.buffer, self.pos = 0, memoryview(b""), 0
        self.cond = threading.Condition()
        self.slots = threading.Semaphore(window or 2 * connections)
        self.closed = False
        self.peak_parts = 0
        self.hasher = hashlib.sha256()  # of every byte read: the archive's hash, checked at the end
        self.pool = ThreadPoolExecutor(max_workers=min(connections, len(self.parts)) or 1)
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.feeder.start()

    def _feed(self) -> None:
        for i, part in enumerate(self.parts):
            self.slots.acquire()  # waits while the window is full
            if self.closed:
                return
            self.pool.submit(self._fetch, i, part)

    def _fetch(self, i: int, part: _Part) -> None:
        data = bytearray(part.end - part.start + 1)

        def sink(offset: int, chunk: bytes) -> None:
            if self.closed:
                raise DownloadError(self.url, "closed")
            at = offset - part.start
            data[at : at + len(chunk)] = chunk

        try:
            part.fetch(sink)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            with self.cond:
                self.failed = self.failed or exc
                self.cond.notify_all()
            return
        with self.cond:
            self.ready[i] = data
            self.peak_parts = max(self.peak_parts, len(self.ready))
            self.cond.notify_all()

    def _next_buffer(self) -> bool:
        if self.next_part >= len(self.parts):
            return False
        with self.cond:
            while self.next_part not in self.ready:
                if self.failed is not None:
                    raise self.failed
                self.cond.wait()
            data = self.ready.pop(self.next_part)
        self.next_part += 1
        self.slots.release()
        self.buffer = memoryview(data)
        return True

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if not self.buffer and not self._next_buffer():
                break
            take = len(self.buffer) if n < 0 else min(n - len(out), len(self.buffer))
            out += self.buffer[:take]
            self.buffer = self.buffer[take:]
        self.pos += len(out)
        self.hasher.update(out)
        return bytes(out)

    def drain(self) -> None:
        """Read what is left (a tar's end padding): the hash covers every byte, and a cut part at
        the end still fails."""
        while self.read(_READ):
            pass

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.closed = True
        for _ in range(len(self.parts)):
            self.slots.release()  # wake the feeder so it can see ``closed``
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()

    def __enter__(self) -> RangeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
