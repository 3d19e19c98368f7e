"""Helpers for the web page's browser tests: the local server on a real port, Debian's Chromium
through Playwright, and a plain second HTTP server (another origin) for cross-site attempts."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("ADVANCED_TRAINER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """client.server's app (page + API) on a real loopback port, uvicorn in a thread, plus its poller.

    Settings: ``public_url`` is this server (so Replicate's fake delivers signed webhooks here) and
    the webhook allow-list is loopback. ``state_host`` is the address the app believes it is bound to
    ("0.0.0.0" turns on its API-key login) while uvicorn itself stays on loopback."""

    def __init__(
        self,
        root: Path,
        fake_url: str,
        public: bool = True,
        allowed=("127.0.0.1/32",),
        state_host: str = "127.0.0.1",
    ):
        import uvicorn

        from client import server as srv
        from client.config import Settings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        Settings(
            public_url=self.url if public else None, webhook_allowed_ips=list(allowed), hardware="gpu-l40s"
        ).save(root)
        self.state = srv.State(root=root, base_url=fake_url, host=state_host, port=self.port)
        self.app = srv.create_app(self.state)
        self.seen: list[dict] = []  # every request the app answered: method, path, origin, status
        self.server = uvicorn.Server(
            srv.uvicorn_config(Recorder(self.app, self.seen), "127.0.0.1", self.port, log_level="error")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.poller = threading.Thread(target=srv._poller, args=(self.state,), daemon=True)
        self.poller.start()
        self.http = httpx.Client(base_url=self.url, timeout=60)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                self.http.get("/openapi.json")
                break
            except httpx.HTTPError:
                time.sleep(0.05)

    def close(self) -> None:
        self.state.stop.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.http.close()


class Recorder:
    """An outermost ASGI layer that notes each request and the status it got (the app is untouched)."""

    def __init__(self, app, seen: list[dict]):
        self.app, self.seen = app, seen

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        entry = {
            "method": scope["method"],
            "path": scope["path"],
            "origin": headers.get("origin"),
            "site": headers.get("sec-fetch-site"),
            "status": None,
        }
        self.seen.append(entry)

        async def send_noting(message):
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, send_noting)


class Browser:
    """Headless Debian Chromium with a fresh profile; one context for the module."""

    def __init__(self, viewport=(1280, 900)):
        from playwright.sync_api import sync_playwright

        self.profile = tempfile.mkdtemp(prefix="at-chromium-")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            self.profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
            service_workers="block",
        )
        self.problems: list[str] = []  # page errors and CSP refusals, from every page

    def page(self, viewport=None):
        page = self.context.new_page()
        if viewport:
            page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
        page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console: {msg.text}")
                if msg.type == "error" and ("Content Security Policy" in msg.text or "Refused to" in msg.text)
                else None
            ),
        )
        return page

    def close(self) -> None:
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self.profile, ignore_errors=True)


def shot(target, name: str, **kw) -> Path:
    """A screenshot of a page or an element into test-artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    target.screenshot(path=str(path), animations="disabled", **kw)
    return path


class OtherOrigin:
    """A second local HTTP server (another port, so another origin) serving one HTML page and its script."""

    def __init__(self, html: str, script: str):
        files = {"/": ("text/html", html.encode()), "/attack.js": ("text/javascript", script.encode())}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                kind, body = files.get(self.path.split("?")[0], ("text/plain", b"not found"))
                self.send_response(200 if self.path.split("?")[0] in files else 404)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
