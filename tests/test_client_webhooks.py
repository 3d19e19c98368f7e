"""The webhook receiver's checks: Standard Webhooks signatures, timestamps, secret rotation,
source addresses (allow-list, X-Forwarded-For through trusted proxies, IPv6). Torch-free."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
from pathlib import Path

import pytest

from client import webhooks as wh
from client.webhooks import (
    MAX_WEBHOOK_BODY,
    REPLICATE_WEBHOOK_CIDRS,
    WebhookRejected,
    WebhookVerifier,
    authenticate,
    check_content_length,
    client_ip,
    ip_allowed,
    parse_networks,
)

KEY = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OTHER_KEY = b"fedcba9876543210fedcba9876543210"
OTHER_SECRET = "whsec_" + base64.b64encode(OTHER_KEY).decode()
NOW = 1_700_000_000
BODY = json.dumps(
    {
        "id": "wj4is6lbdqqkdepnwpr6v2kuva",
        "status": "succeeded",
        "logs": "héllo\n",
        "metrics": {"predict_time": 12.5},
    }
).encode()


def sign(key: bytes, wid: str, ts: int | str, body: bytes) -> str:
    mac = hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(
    wid: str = "msg_1", ts: int | str = NOW, body: bytes = BODY, key: bytes = KEY, sig: str | None = None
):
    return {
        "webhook-id": wid,
        "webhook-timestamp": str(ts),
        "webhook-signature": sig if sig is not None else sign(key, wid, ts, body),
    }


class Secrets:
    """get_secret(refresh) double: returns ``first`` until refreshed, then ``after``."""

    def __init__(self, first: str = SECRET, after: str | None = None, fail: bool = False):
        self.first, self.after, self.fail = first, after, fail
        self.calls: list[bool] = []

    def __call__(self, refresh: bool) -> str:
        self.calls.append(refresh)
        if self.fail:
            raise ConnectionError("secret endpoint down")
        return self.after if (refresh and self.after is not None) else self.first


def verifier(secrets=None, **kw) -> WebhookVerifier:
    clock = kw.pop("clock", None)
    return WebhookVerifier(secrets or Secrets(), now=clock or (lambda: NOW), **kw)


def reject(v: WebhookVerifier, hdrs, body=BODY) -> WebhookRejected:
    with pytest.raises(WebhookRejected) as info:
        v.verify(hdrs, body)
    return info.value


# --------------------------------------------------------------------------- signatures


def test_valid_signature_passes_and_matches_the_official_validator():
    assert verifier().verify(headers(), BODY) == "msg_1"
    # our test signer agrees with replicate 1.0.7's own validator
    from replicate.webhook import Webhooks, WebhookSigningSecret

    Webhooks.validate(headers=headers(), body=BODY.decode(), secret=WebhookSigningSecret(key=SECRET))


def test_uses_the_official_replicate_validator(monkeypatch):
    calls = []
    real = wh.Webhooks.validate

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(wh.Webhooks, "validate", staticmethod(spy))
    verifier().verify(headers(), BODY)
    assert calls and calls[0]["tolerance"] is None and isinstance(calls[0]["body"], str)


def test_header_names_are_case_insensitive():
    h = {k.title(): v for k, v in headers().items()}
    assert verifier().verify(h, BODY) == "msg_1"


@pytest.mark.parametrize("case", ["forged", "tampered_body", "tampered_id", "tampered_ts"])
def test_bad_signatures_are_401(case):
    v = verifier()
    if case == "forged":
        err = reject(v, headers(key=OTHER_KEY))
    elif case == "tampered_body":
        err = reject(v, headers(), BODY.replace(b"succeeded", b"failed\x20\x20\x20"))
    elif case == "tampered_id":
        h = headers()
        h["webhook-id"] = "msg_2"
        err = reject(v, h)
    else:
        h = headers()
        h["webhook-timestamp"] = str(NOW - 10)  # still within tolerance
        err = reject(v, h)
    assert err.status == 401 and "signature" in err.reason


def test_expired_and_future_timestamps_are_401():
    v = verifier(tolerance_s=300)
    old = NOW - 301
    err = reject(v, headers(ts=old))
    assert err.status == 401 and "old" in err.reason
    future = NOW + 301
    err = reject(v, headers(ts=future))
    assert err.status == 401 and "future" in err.reason
    # at the edge of the window it still passes
    assert v.verify(headers(ts=NOW - 300), BODY) == "msg_1"
    assert v.verify(headers(ts=NOW + 300), BODY) == "msg_1"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_are_400(missing):
    h = headers()
    del h[missing]
    err = reject(verifier(), h)
    assert err.status == 400 and missing in err.reason
    h = headers()
    h[missing] = "   "
    assert reject(verifier(), h).status == 400


def test_malformed_timestamp_and_bodies_are_400():
    v = verifier()
    for ts in ("17e8", "-5", "1700000000.5", "now"):
        h = headers(ts=ts)
        assert reject(v, h).status == 400, ts
    assert reject(v, headers(body=b""), b"").status == 400
    bad_utf8 = b'{"logs": "\xff"}'
    assert reject(v, headers(body=bad_utf8), bad_utf8).status == 400


@pytest.mark.parametrize(
    "sig",
    [
        "v1,!!!!not-base64!!!!",
        "v1,abc",  # bad padding: binascii.Error inside 1.0.7
        "v1,YWJj",  # valid base64, wrong length
        "nocomma",  # 1.0.7 raises InvalidSignatureError at once
        "v1,",
        "",
    ],
)
def test_malformed_signatures_are_401_without_binascii_errors(sig):
    h = headers(sig=sig)
    err = reject(verifier(), h)
    assert err.status in (400, 401)  # "" counts as a missing header


def test_malformed_entry_before_a_valid_one_still_passes():
    good = sign(KEY, "msg_1", NOW, BODY)
    for junk in ("v1,!!!!", "v1,abc", "nocomma", "v1a," + good[3:]):
        assert verifier().verify(headers(sig=f"{junk} {good}"), BODY) == "msg_1"


def test_several_signatures_one_valid_passes():
    good = sign(KEY, "msg_1", NOW, BODY)
    forged = sign(OTHER_KEY, "msg_1", NOW, BODY)
    assert verifier().verify(headers(sig=f"{forged} {good}"), BODY) == "msg_1"
    assert verifier().verify(headers(sig=f"{good}  {forged}"), BODY) == "msg_1"


def test_only_v1_label_is_accepted():
    good = sign(KEY, "msg_1", NOW, BODY)
    err = reject(verifier(), headers(sig="v2," + good[3:]))
    assert err.status == 401  # 1.0.7 alone would accept any label


def test_secret_rotation_refreshes_once_and_passes():
    secrets = Secrets(first=SECRET, after=OTHER_SECRET)
    v = verifier(secrets)
    assert v.verify(headers(key=OTHER_KEY), BODY) == "msg_1"
    assert secrets.calls == [False, True]
    v.verify(headers(key=OTHER_KEY, wid="msg_2"), BODY)  # now cached
    assert secrets.calls == [False, True]


def test_signature_failure_refreshes_at_most_once_per_interval():
    clock = [NOW]
    secrets = Secrets()
    v = verifier(secrets, clock=lambda: clock[0], min_refresh_interval_s=30)
    for _ in range(5):
        assert reject(v, headers(key=OTHER_KEY)).status == 401
    assert secrets.calls == [False, True]  # one refresh, not one per forged request
    clock[0] += 31
    assert reject(v, headers(key=OTHER_KEY, ts=clock[0])).status == 401
    assert secrets.calls == [False, True, True]


def test_invalid_or_unavailable_secret():
    for bad in ("not-a-secret!", "whsec_", "whsec_a_b", "whsec_YWJj"):  # last: 3-byte key
        err = reject(verifier(Secrets(first=bad)), headers())
        assert err.status == 500 and "secret" in err.reason, bad
    # an invalid cached secret is refreshed, and the fresh one works
    assert verifier(Secrets(first="garbage", after=SECRET)).verify(headers(), BODY) == "msg_1"
    # a secret without the whsec_ prefix is accepted
    assert verifier(Secrets(first=base64.b64encode(KEY).decode())).verify(headers(), BODY) == "msg_1"
    err = reject(verifier(Secrets(fail=True)), headers())
    assert err.status == 503


def test_body_size_limits():
    assert 4 * 1024 * 1024 <= MAX_WEBHOOK_BODY <= 32 * 1024 * 1024
    big = b"{" + b" " * MAX_WEBHOOK_BODY + b"}"
    assert reject(verifier(), headers(body=big), big).status == 413
    with pytest.raises(WebhookRejected) as info:
        check_content_length({"Content-Length": str(MAX_WEBHOOK_BODY + 1)})
    assert info.value.status == 413
    with pytest.raises(WebhookRejected):
        check_content_length({"content-length": "12x"})
    check_content_length({"content-length": "100"})
    check_content_length({})


# --------------------------------------------------------------------------- addresses


def test_ip_allowed_defaults_and_ipv6():
    assert ip_allowed("34.82.1.2", REPLICATE_WEBHOOK_CIDRS)
    assert ip_allowed("35.185.255.255", REPLICATE_WEBHOOK_CIDRS)
    assert not ip_allowed("34.83.0.1", REPLICATE_WEBHOOK_CIDRS)
    assert not ip_allowed("8.8.8.8", REPLICATE_WEBHOOK_CIDRS)
    assert ip_allowed("::ffff:34.82.0.1", REPLICATE_WEBHOOK_CIDRS)  # IPv4-mapped
    assert not ip_allowed("2001:db8::1", REPLICATE_WEBHOOK_CIDRS)
    assert ip_allowed("2001:db8::1", ["2001:db8::/32"])
    assert not ip_allowed("2001:db9::1", ["2001:db8::/32"])
    assert ip_allowed("192.0.2.7", ["192.0.2.7"])  # single address
    assert ip_allowed("2001:db8::7", ["2001:db8::7"])
    assert not ip_allowed("192.0.2.8", ["192.0.2.7"])
    assert not ip_allowed("34.82.1.2", [])  # empty allows nothing
    assert ip_allowed("8.8.8.8", ["0.0.0.0/0", "::/0"])  # allow-all is explicit
    assert not ip_allowed("not-an-ip", REPLICATE_WEBHOOK_CIDRS)
    assert not ip_allowed("", REPLICATE_WEBHOOK_CIDRS)
    with pytest.raises(ValueError):
        ip_allowed("34.82.1.2", ["34.82.0.0/16", "nonsense"])
    with pytest.raises(ValueError):
        parse_networks("34.82.0.0/16")  # a bare string, not a list


def test_client_ip_ignores_xff_from_untrusted_peers():
    h = {"X-Forwarded-For": "34.82.1.1"}
    assert client_ip("6.6.6.6", h, []) == "6.6.6.6"
    assert client_ip("6.6.6.6", h, ["10.0.0.0/8"]) == "6.6.6.6"
    assert client_ip("6.6.6.6:51234", {}, []) == "6.6.6.6"


def test_client_ip_walks_xff_from_the_right_through_trusted_proxies():
    trusted = ["10.0.0.0/8", "127.0.0.1"]
    # the client spoofed 34.82.9.9; the proxy appended the real address
    h = {"x-forwarded-for": "34.82.9.9, 6.6.6.6"}
    assert client_ip("10.0.0.2", h, trusted) == "6.6.6.6"
    # two proxies: skip the inner trusted hop
    h = {"X-Forwarded-For": "34.82.9.9, 34.82.1.1, 10.1.2.3"}
    assert client_ip("127.0.0.1", h, trusted) == "34.82.1.1"
    # ports are tolerated
    assert client_ip("10.0.0.2", {"X-Forwarded-For": "34.82.1.1:5555"}, trusted) == "34.82.1.1"
    # no XFF: the proxy itself
    assert client_ip("10.0.0.2", {}, trusted) == "10.0.0.2"
    # all hops trusted: the leftmost
    assert client_ip("10.0.0.2", {"X-Forwarded-For": "10.9.9.9, 10.0.0.3"}, trusted) == "10.9.9.9"


def test_client_ip_malformed_xff_is_never_believed():
    trusted = ["10.0.0.0/8"]
    # a malformed entry stops the walk: nothing to its left (client-written) is believed
    h = {"X-Forwarded-For": "34.82.1.1, unknown"}
    assert client_ip("10.0.0.2", h, trusted) == "10.0.0.2"
    assert not ip_allowed(client_ip("10.0.0.2", h, trusted), REPLICATE_WEBHOOK_CIDRS)
    assert client_ip("10.0.0.2", {"X-Forwarded-For": ",,, "}, trusted) == "10.0.0.2"
    assert client_ip("10.0.0.2", {"X-Forwarded-For": "34.82.1.1, 10.0.0.9, garbage"}, trusted) == "10.0.0.2"
    assert client_ip("garbage", {"X-Forwarded-For": "34.82.1.1"}, trusted) == ""


def test_client_ip_ipv6():
    trusted = ["::1/128", "fd00::/8"]
    assert client_ip("[::1]:8080", {"X-Forwarded-For": "2001:db8::5"}, trusted) == "2001:db8::5"
    assert client_ip("::1", {"X-Forwarded-For": "[2001:db8::5]:443, fd00::2"}, trusted) == "2001:db8::5"
    assert client_ip("2001:db8::9", {"X-Forwarded-For": "34.82.1.1"}, trusted) == "2001:db8::9"
    assert client_ip("::ffff:10.0.0.2", {"X-Forwarded-For": "34.82.1.1"}, ["10.0.0.0/8"]) == "34.82.1.1"


def test_authenticate_checks_address_then_size_then_signature():
    v = verifier()
    assert authenticate("34.82.1.1", headers(), BODY, verifier=v) == "msg_1"
    with pytest.raises(WebhookRejected) as info:
        authenticate("6.6.6.6", headers(), BODY, verifier=v)
    assert info.value.status == 403
    # behind a trusted reverse proxy
    h = {**headers(), "X-Forwarded-For": "35.185.3.4"}
    assert authenticate("127.0.0.1", h, BODY, verifier=v, trusted_proxies=["127.0.0.1"]) == "msg_1"
    with pytest.raises(WebhookRejected) as info:
        authenticate(
            "34.82.1.1", {**headers(), "content-length": str(MAX_WEBHOOK_BODY + 1)}, BODY, verifier=v
        )
    assert info.value.status == 413
    with pytest.raises(WebhookRejected) as info:
        authenticate("34.82.1.1", headers(key=OTHER_KEY), BODY, verifier=v)
    assert info.value.status == 401


def test_no_torch_import():
    import subprocess

    code = "import sys, client.webhooks, client.store, client.spend; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "body,reason",
    [
        (b"{oops", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "expected an object"),
        (b"null", "expected an object"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(body, reason):
    with pytest.raises(WebhookRejected) as info:
        wh.parse_payload(body)
    assert info.value.status == 400 and reason in info.value.reason


def test_a_json_object_body_is_the_job():
    assert wh.parse_payload(BODY)["status"] == "succeeded"
