"""A loopback receiver for a Cog server's (unsigned) webhooks, for `submit --wait` without `serve`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .providers import CogProvider
from .store import JobStore

MAX_BODY = 64 * 2**20


class CogHookReceiver:
    """Feeds each event to the provider (its job table) and to the store; answers 200 to every
    request, since a Cog server does not retry and a bad event must not stop the training."""

    def __init__(self, store: JobStore, provider: CogProvider):
        outer = self
        self.store, self.provider = store, provider

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(min(int(self.headers.get("content-length", 0)), MAX_BODY))
                try:
                    outer.receive(json.loads(body))
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, payload: dict) -> None:
        self.provider.apply_webhook(payload)
        if self.store.get(payload.get("id", "")) is not None:
            self.store.apply_remote(payload["id"], payload, "webhook")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
