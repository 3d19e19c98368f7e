"""The local server's own security, over HTTP: Host allow-list, CSRF, authentication beyond
loopback, body-size caps and response headers. (The browser-level checks are in test_web.py.)"""

from __future__ import annotations

import json

import httpx
import pytest

from test_client_server import TOKEN, LocalServer


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def local(env):
    from fake_replicate import FakeReplicate

    with FakeReplicate(token=TOKEN) as fake:
        server = LocalServer(env, fake)
        yield server
        server.close()


def test_foreign_host_headers_are_refused(local):
    for host in ("evil.example", "evil.example:8080", "attacker.localhost.evil"):
        r = local.http.get("/api/cloud/jobs", headers={"host": host})
        assert r.status_code == 421, host
    assert local.http.get("/api/cloud/jobs", headers={"host": f"localhost:{local.port}"}).status_code == 200
    assert local.http.get("/api/cloud/jobs").status_code == 200


def test_cross_site_writes_are_refused_and_change_nothing(local, env):
    before = (env / "settings.json").read_text()
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": "http://localhost:9999"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ):
        for method, path, body in (
            ("PUT", "/api/cloud/providers/replicate", {"public_url": "https://evil.example"}),
            ("POST", "/api/cloud/jobs/submit", {"spec": {}, "dataset": "/tmp"}),
            ("PUT", "/api/cloud/spend-limit", None),
            ("DELETE", "/api/cloud/providers/replicate/token", None),
            ("POST", "/api/cloud/jobs/x/cancel", None),
        ):
            r = local.http.request(method, path, json=body, headers=headers)
            assert r.status_code == 403, (method, path, headers, r.status_code)
    assert (env / "settings.json").read_text() == before
    # the page's own origin, and tools that send no Origin at all, are fine
    ok = local.http.put(
        "/api/cloud/spend-limit", json=None, headers={"origin": local.url, "sec-fetch-site": "same-origin"}
    )
    assert ok.status_code == 200
    assert local.http.put("/api/cloud/spend-limit", json=None).status_code == 200


def test_security_headers_and_no_token_in_the_page(local):
    r = local.http.get("/")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    api = local.http.get("/api/cloud/providers/replicate")
    assert api.headers["cache-control"] == "no-store" and TOKEN not in api.text
    assert local.http.get("/docs").status_code == 404  # Swagger UI would need a CDN


def test_body_size_caps(local):
    big = json.dumps({"spec": {"x": "y" * (2 * 2**20)}, "dataset": "/tmp"})
    r = local.http.post("/api/cloud/jobs/submit", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():
        for _ in range(3):
            yield b"x" * 2**20

    r = local.http.post(
        "/api/cloud/spec/validate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413


def test_beyond_loopback_every_route_but_webhooks_needs_the_key(env, monkeypatch):
    from client import server as srv
    from fake_replicate import FakeReplicate

    key = srv.ensure_api_key(env)
    assert key and srv.ensure_api_key(env) is None  # made once, stored hashed
    assert key not in (env / "secrets.json").read_text()
    with FakeReplicate(token=TOKEN) as fake:
        server = LocalServer(env, fake, bind="0.0.0.0")
        try:
            assert server.http.get("/api/cloud/jobs").status_code == 401
            assert server.http.get("/").status_code == 200  # the page (its login form) holds no data
            assert (
                server.http.get("/api/cloud/jobs", headers={"authorization": "Bearer wrong"}).status_code
                == 401
            )
            assert (
                server.http.get("/api/cloud/jobs", headers={"authorization": f"Bearer {key}"}).status_code
                == 200
            )
            assert server.http.get("/api/cloud/jobs", headers={"x-api-key": key}).status_code == 200
            # the page logs in once and gets an HttpOnly, SameSite=Strict session cookie
            assert server.http.post("/api/session", json={"api_key": "nope"}).status_code == 401
            r = server.http.post("/api/session", json={"api_key": key})
            assert r.status_code == 204
            cookie = r.headers["set-cookie"]
            assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
            assert server.http.get("/api/cloud/jobs").status_code == 200  # the client kept the cookie
            # webhooks stay reachable (they carry their own signature)
            fresh = httpx.post(f"{server.url}/api/webhooks/replicate", content=b"{}")
            assert fresh.status_code != 401
        finally:
            server.close()
