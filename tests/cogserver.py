"""The real Cog HTTP server (cog + coglet from PyPI) on loopback, for tests.

The server spawns its worker as the literal command ``python`` from PATH, so the venv's bin
goes first; it reads ``.cog/openapi_schema.json`` relative to its cwd, so it runs in the
repository root.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``check`` until it returns something truthy and return that; raise TimeoutError naming
    ``what`` after ``timeout`` seconds.  For state only reachable by asking (a process's health, its
    children); ``check`` may raise to fail at once."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"{what} within {timeout:g}s")
        time.sleep(interval)  # the poll interval, not a wait for something to have happened


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CogServer:
    """``mode`` is ``run`` (predict.py: rendering) or ``train`` (cog_train.py: trainings)."""

    def __init__(
        self, mode: str, log_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ):
        assert mode in ("run", "train"), mode
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
            "PORT": str(self.port),
            "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
            "COG_TRAIN_TYPE_STUB": "cog_train.py:Trainer",
            "COG_THROTTLE_RESPONSE_INTERVAL": "0",
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        cmd = [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *args]
        if mode == "train":
            cmd += ["--x-mode", "train"]
        self.log_path = log_dir / f"cog-{mode}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(300, connect=5))

    def health(self) -> dict:
        return self.client.get("/health-check", timeout=2).json()

    def wait(self, statuses=("READY",), timeout: float = 120) -> dict:
        last: dict = {}

        def reached() -> dict | None:
            nonlocal last
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cog server exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                last = self.health()
            except httpx.HTTPError:
                return None  # not listening yet
            if (
                last.get("status") in ("SETUP_FAILED", "UNHEALTHY", "DEFUNCT")
                and "SETUP_FAILED" not in statuses
            ):
                raise RuntimeError(
                    f"cog server {last.get('status')}: {json.dumps(last.get('setup'))[-3000:]}"
                )
            return last if last.get("status") in statuses else None

        try:
            return wait_until(reached, timeout, f"cog server {self.mode} reaching {'/'.join(statuses)}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}: {last}\n{self.log_path.read_text()[-3000:]}") from None

    def post(self, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
        """POST, waiting for the slot first (the server answers 409 just after a job ends)."""

        def accepted() -> httpx.Response | None:
            self.wait()
            r = self.client.post(path, json=body, headers=headers or {})
            return None if r.status_code == 409 else r

        return wait_until(accepted, 30, f"a free slot on the cog server for POST {path}")

    def terminate(self) -> None:
        """Ask the server to exit without waiting (``stop`` then waits): a pool shuts down at once."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self._log.close()


class UploadSink:
    """What ``--upload-url`` points at on Replicate: a file store on loopback. ``PUT /upload/NAME``
    keeps the bytes and answers ``Location: URL/files/ID/NAME`` (what coglet reports as the
    output); ``GET /files/ID/NAME`` serves them back, unauthenticated, as Replicate's delivery
    URLs are."""

    def __init__(self) -> None:
        import uuid

        self.files: dict[str, tuple[bytes, str]] = {}
        self.puts: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                name = self.path.rsplit("/", 1)[-1] or "file"
                key = f"{uuid.uuid4().hex[:12]}/{name}"
                outer.files[key] = (body, self.headers.get("content-type") or "application/octet-stream")
                outer.puts.append(
                    {
                        "path": self.path,
                        "size": len(body),
                        "prediction_id": self.headers.get("x-prediction-id"),
                        "url": f"{outer.url}/files/{key}",
                    }
                )
                self.send_response(201)
                self.send_header(
                    "Location", f"{outer.url}/files/{key}?signature=abc"
                )  # query: coglet strips it
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802
                key = self.path.split("?", 1)[0].removeprefix("/files/")
                if key not in outer.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, ctype = outer.files[key]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.upload_url = f"{self.url}/upload/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store a file directly (as if uploaded); returns its URL."""
        import uuid

        key = f"{uuid.uuid4().hex[:12]}/{name}"
        self.files[key] = (data, content_type)
        return f"{self.url}/files/{key}"

    def get(self, url: str) -> bytes:
        return self.files[url.split("?", 1)[0].removeprefix(self.url + "/files/")][0]

    def close(self) -> None:
        self.server.shutdown()


def data_uri(path: Path, mime: str = "application/zip") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def decode_output(value: str) -> bytes:
    assert value.startswith("data:"), value[:80]
    return base64.b64decode(value.split(",", 1)[1])


class Receiver:
    """A webhook receiver on loopback that keeps every payload it gets."""

    def __init__(self) -> None:
        self.payloads: list[dict] = []
        self.lock = threading.Condition()  # notified on every payload
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.payloads.append(json.loads(body))
                    outer.lock.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, predicate: Callable[[list[dict]], bool], timeout: float, what: str) -> list[dict]:
        """The payloads so far, once ``predicate(payloads)`` holds (re-checked on every webhook)."""
        with self.lock:
            if not self.lock.wait_for(lambda: predicate(self.payloads), timeout):
                raise TimeoutError(
                    f"{what} within {timeout:g}s; got {[p.get('status') for p in self.payloads]}"
                )
            return list(self.payloads)

    def wait_terminal(self, timeout: float = 300) -> dict:
        terminal = ("succeeded", "failed", "canceled")
        got = self.wait(
            lambda ps: any(p.get("status") in terminal for p in ps), timeout, "no terminal webhook"
        )
        return [p for p in got if p.get("status") in terminal][-1]

    def close(self) -> None:
        self.server.shutdown()


class FileServer:
    """Serves one folder over HTTP on loopback (datasets by URL)."""

    def __init__(self, folder: Path):
        from functools import partial
        from http.server import SimpleHTTPRequestHandler

        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
