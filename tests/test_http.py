"""train/http.py: the retry policy and the streaming download, against a real HTTP server on loopback
(a file, a 503 then success, a 404, a connection cut mid-body)."""

from __future__ import annotations

import http.server
import random
import threading
from pathlib import Path

import httpx
import pytest

from train.http import DownloadError, RetryPolicy, download, is_retryable, is_transport_error, safe_url

BODY = bytes(range(256)) * 4096  # 1 MiB


class _Server(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.fail_first = {"/flaky": 2}  # path -> how many 503s before it serves
        self.cut_first = {"/cut": 1, "/always-cut": 10**6}  # path -> how many answers end mid-body


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        self.server.requests.append((path, self.headers.get("Range")))
        if self.server.fail_first.get(path, 0) > 0:
            self.server.fail_first[path] -= 1
            return self._answer(503, b"busy", {"Retry-After": "7"})
        if path not in ("/file", "/flaky", "/cut", "/always-cut"):
            return self._answer(404, b"no such file")
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        status, extra = 200, {}
        if start:
            status, extra = 206, {"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"}
        body = BODY[start:]
        if self.server.cut_first.get(path, 0) > 0:
            self.server.cut_first[path] -= 1
            self._head(status, len(body), extra)
            self.wfile.write(body[: len(body) // 3])  # then the connection drops
            self.close_connection = True
            return
        self._answer(status, body, extra)

    def _head(self, status: int, length: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"v1"')
        self.send_header("Accept-Ranges", "bytes")
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def _answer(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
        self._head(status, len(body), extra or {})
        self.wfile.write(body)


@pytest.fixture()
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


@pytest.fixture()
def waits() -> list[float]:
    return []


@pytest.fixture()
def retry(waits) -> RetryPolicy:
    return RetryPolicy(attempts=4, sleep=waits.append, rng=random.Random(0))


def test_a_file_arrives_whole_with_progress(server, tmp_path, retry, waits):
    seen: list[tuple[int, int | None]] = []
    dest = download(
        f"{server.url}/file",
        tmp_path / "out" / "f.bin",
        progress=lambda d, t: seen.append((d, t)),
        retry=retry,
    )
    assert dest.read_bytes() == BODY and not list(dest.parent.glob("*.part"))
    assert seen[0] == (0, len(BODY)) and seen[-1] == (len(BODY), len(BODY)) and waits == []


def test_503_is_retried_after_the_servers_retry_after(server, tmp_path, retry, waits):
    dest = download(f"{server.url}/flaky", tmp_path / "f.bin", retry=retry)
    assert dest.read_bytes() == BODY
    assert waits == [7.0, 7.0]  # Retry-After honoured, not the backoff
    assert [p for p, _ in server.requests] == ["/flaky"] * 3


def test_404_fails_at_once_naming_the_url_and_status_without_the_query(server, tmp_path, retry, waits):
    url = f"{server.url}/missing.zip?X-Amz-Signature=s3cr3t&token=abc"
    with pytest.raises(DownloadError) as e:
        download(url, tmp_path / "f.bin", retry=retry)
    msg = str(e.value)
    assert f"{server.url}/missing.zip" in msg and "HTTP 404" in msg and e.value.status == 404
    assert "s3cr3t" not in msg and "abc" not in msg
    assert waits == [] and len(server.requests) == 1  # not worth another try
    assert not list(tmp_path.iterdir())


def test_a_connection_cut_mid_body_resumes_with_a_range_request(server, tmp_path, retry, waits):
    dest = download(f"{server.url}/cut", tmp_path / "f.bin", retry=retry)
    assert dest.read_bytes() == BODY
    (_, first), (_, second) = server.requests
    assert first is None and second == f"bytes={len(BODY) // 3}-"  # only the missing part came again
    assert len(waits) == 1


def test_giving_up_leaves_nothing_under_the_final_name(server, tmp_path, retry, waits):
    dest = tmp_path / "f.bin"
    with pytest.raises(DownloadError, match="gave up after 4 attempts") as e:
        download(f"{server.url}/always-cut?sig=s3cr3t", dest, retry=retry)
    assert f"{server.url}/always-cut" in str(e.value) and "s3cr3t" not in str(e.value)
    assert not dest.exists() and len(waits) == 3
    assert 0 < (tmp_path / "f.bin.part").stat().st_size < len(BODY)  # kept: the next call resumes it
    server.cut_first["/always-cut"] = 0
    assert download(f"{server.url}/always-cut", dest, retry=retry).read_bytes() == BODY
    assert server.requests[-1][1] is not None


def test_max_bytes_refuses_a_larger_file(server, tmp_path, retry):
    with pytest.raises(DownloadError, match="more than the 1000 allowed"):
        download(f"{server.url}/file", tmp_path / "f.bin", retry=retry, max_bytes=1000)
    assert not (tmp_path / "f.bin").exists()


def test_connection_refused_is_retried_then_named(tmp_path, retry, waits):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="refused") as e:
        download(f"http://127.0.0.1:{port}/w.zip", tmp_path / "f.bin", retry=retry)
    assert f"127.0.0.1:{port}/w.zip" in str(e.value) and len(waits) == 3
    assert waits == sorted(waits) and all(0.5 <= w <= 4 for w in waits)  # backoff: 0.5-1, 1-2, 2-4 s


# -- the policy on its own -------------------------------------------------------------------------


def test_the_policy_retries_any_callable_and_lets_other_errors_through(waits):
    policy = RetryPolicy(attempts=3, base_delay_s=2, sleep=waits.append, rng=random.Random(1))
    calls = []

    @policy
    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise httpx.ConnectError("refused")
        return x * 2

    assert flaky(21) == 42 and len(calls) == 3
    assert 1 <= waits[0] <= 2 and 2 <= waits[1] <= 4  # exponential, with jitter

    def wrong() -> None:
        calls.append(0)
        raise ValueError("a bug, not the network")

    calls.clear()
    with pytest.raises(ValueError):
        policy.call(wrong)
    assert calls == [0]


def test_statuses_and_errors_worth_another_try():
    request = httpx.Request("GET", "https://example.com/x")

    def status_error(status: int) -> httpx.HTTPStatusError:
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))

    assert all(is_retryable(status_error(s)) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable(status_error(s)) for s in (400, 401, 403, 404, 409, 416))
    assert is_retryable(httpx.ReadTimeout("slow")) and is_retryable(ConnectionResetError())
    assert not is_retryable(httpx.UnsupportedProtocol("ftp")) and not is_retryable(KeyError("x"))


def test_the_hub_clients_own_httpx_fork_is_recognised_by_name():
    import httpx2  # huggingface_hub 2.x (pinned) depends on it and raises from it; our code never imports it

    assert is_transport_error(httpx2.ConnectError("Name or service not known"))
    assert is_retryable(httpx2.ReadTimeout("slow"))
    assert not is_transport_error(httpx2.HTTPError("not the network"))


def test_safe_url_drops_credentials_and_query():
    assert (
        safe_url("https://user:pw@example.com:8443/a/b.zip?sig=1#f") == "https://example.com:8443/a/b.zip?…"
    )
    assert safe_url("/local/path.tar") == "/local/path.tar"


def test_retry_after_as_a_date_and_its_cap(waits):
    request = httpx.Request("GET", "https://example.com/x")
    response = httpx.Response(429, request=request, headers={"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"})
    exc = httpx.HTTPStatusError("x", request=request, response=response)
    assert RetryPolicy(max_retry_after_s=60).delay(1, exc) == 60


def test_an_unsupported_scheme_fails_at_once(tmp_path: Path, retry, waits):
    with pytest.raises(DownloadError, match="UnsupportedProtocol"):
        download("ftp://example.com/x", tmp_path / "f.bin", retry=retry)
    assert waits == [] and not list(tmp_path.iterdir())
