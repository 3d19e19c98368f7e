"""Publishing: S3 against a real, authenticating S3 server on loopback (moto's standalone server);
the Hub up to the huggingface_hub call (the Hub itself is unreachable from the tests)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import httpx2  # huggingface_hub 2.x's own httpx fork: its errors are built here as the Hub raises them
import pytest
from botocore.exceptions import ClientError
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

import s3server
from train import publish as pub
from train.publish import PublishError, publish, publish_hub, publish_s3
from train.spec import PublishSpec

HF_TOKEN = "hf_SECRETtokenVALUE0123456789abcdef"
MODEL_CARD = """---
base_model: black-forest-labs/FLUX.1-dev
library_name: diffusers
tags:
- text-to-image
- lora
- advanced-trainer
---

# my-lora
"""


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated_aws_env(monkeypatch, tmp_path):
    """No credentials or config from the machine running the tests leak into boto3's default chain."""
    for name in list(os.environ):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """A LoRA job's output folder (README "What comes out"), plus the .work/ scratch folder."""
    d = tmp_path / "out"
    (d / "samples").mkdir(parents=True)
    (d / ".work" / "cache").mkdir(parents=True)
    (d / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(4096))
    (d / "lora_kohya.safetensors").write_bytes(os.urandom(3000))
    (d / "config.json").write_text(json.dumps({"trainer": "advanced-trainer", "spec": {"steps": 6}}) + "\n")
    (d / "dataset_report.json").write_text(json.dumps({"images": 3, "skipped": []}) + "\n")
    (d / "README.md").write_text(MODEL_CARD)
    (d / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (d / "samples" / "step-000006-0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (d / "samples" / "step-000006-1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    (d / ".work" / "cache" / "latents.bin").write_bytes(os.urandom(100))
    (d / ".work" / "staging.txt").write_text("scratch")
    return d


EXPECTED = {
    "config.json": "application/json",
    "dataset_report.json": "application/json",
    "lora_kohya.safetensors": "application/octet-stream",
    "loss.png": "image/png",
    "pytorch_lora_weights.safetensors": "application/octet-stream",
    "README.md": "text/markdown",
    "samples/step-000006-0.png": "image/png",
    "samples/step-000006-1.png": "image/png",
}


def _prefix() -> str:
    return f"runs/{uuid.uuid4().hex[:10]}"


def _stored(server, prefix: str) -> dict[str, tuple[bytes, str]]:
    """Every object under ``prefix/`` (or the whole bucket for ""), read back with the valid keys."""
    c = server.client()
    listed = c.list_objects_v2(Bucket=server.bucket, Prefix=f"{prefix}/" if prefix else "")
    out = {}
    for obj in listed.get("Contents", []):
        got = c.get_object(Bucket=server.bucket, Key=obj["Key"])
        out[obj["Key"]] = (got["Body"].read(), got["ContentType"])
    return out


def _upload(server, folder, prefix, **kw):
    args = dict(
        endpoint_url=server.endpoint_url,
        region=server.region,
        public_base_url=None,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
    )
    args.update(kw)
    return publish_s3(folder, server.bucket, prefix, **args)


# ----------------------------------------------------------------------------- the server itself


def test_server_enforces_authentication(s3):
    """The server is not a pushover: made-up keys, a wrong secret and a key without a policy are refused."""
    cases = [
        ("AKIAMADEUPMADEUP0000", "y" * 40, "InvalidAccessKeyId"),
        (s3.access_key_id, "wrong-secret-" * 3, "SignatureDoesNotMatch"),
        (s3.denied_access_key_id, s3.denied_secret_access_key, "AccessDenied"),
    ]
    for ak, sk, code in cases:
        with pytest.raises(ClientError) as info:
            s3.client(ak, sk).put_object(Bucket=s3.bucket, Key="probe", Body=b"x")
        assert info.value.response["Error"]["Code"] == code
    s3.client().head_bucket(Bucket=s3.bucket)


# ----------------------------------------------------------------------------- S3


def test_s3_uploads_every_file_with_bytes_and_content_types(s3, out_dir):
    prefix = _prefix()
    urls = _upload(s3, out_dir, f"/{prefix}/")  # slashes around the prefix are normalised away
    stored = _stored(s3, prefix)
    assert sorted(stored) == sorted(f"{prefix}/{rel}" for rel in EXPECTED)
    for rel, ctype in EXPECTED.items():
        body, got_type = stored[f"{prefix}/{rel}"]
        assert body == (out_dir / rel).read_bytes(), rel
        assert got_type == ctype, rel
    # deterministic order, s3:// URIs without a public base URL
    assert urls == [f"s3://{s3.bucket}/{prefix}/{rel}" for rel in sorted(EXPECTED)]


def test_s3_skips_work_folder_and_keeps_nested_folders(s3, out_dir):
    prefix = _prefix()
    (out_dir / "checkpoints" / "step-3").mkdir(parents=True)
    (out_dir / "checkpoints" / "step-3" / "state.safetensors").write_bytes(b"ckpt")
    (out_dir / "samples" / ".work").mkdir()
    (out_dir / "samples" / ".work" / "tmp.png").write_bytes(b"tmp")
    _upload(s3, out_dir, prefix)
    keys = set(_stored(s3, prefix))
    assert f"{prefix}/checkpoints/step-3/state.safetensors" in keys
    assert f"{prefix}/samples/step-000006-0.png" in keys
    assert not any("/.work/" in k or k.endswith("/.work") for k in keys)
    assert len(keys) == len(EXPECTED) + 1


def test_s3_public_base_url(s3, out_dir):
    prefix = _prefix()
    (out_dir / "samples" / "a b.png").write_bytes(b"\x89PNG")
    urls = _upload(s3, out_dir, prefix, public_base_url="https://cdn.example.com/models/")
    assert f"https://cdn.example.com/models/{prefix}/config.json" in urls
    assert f"https://cdn.example.com/models/{prefix}/samples/step-000006-0.png" in urls
    assert f"https://cdn.example.com/models/{prefix}/samples/a%20b.png" in urls
    assert all(u.startswith("https://cdn.example.com/models/runs/") for u in urls)
    assert f"{prefix}/samples/a b.png" in _stored(s3, prefix)


def test_s3_empty_prefix_is_bucket_root(s3, tmp_path):
    server = s3server.S3Server(**{**s3.__dict__, "process": None})
    bucket = f"root-{uuid.uuid4().hex[:8]}"
    server.client().create_bucket(Bucket=bucket)
    server.bucket = bucket
    folder = tmp_path / "small"
    (folder / "samples").mkdir(parents=True)
    (folder / "README.md").write_text(MODEL_CARD)
    (folder / "samples" / "x.png").write_bytes(b"\x89PNG")
    urls = _upload(server, folder, "", public_base_url="https://pub.example.org")
    assert urls == ["https://pub.example.org/README.md", "https://pub.example.org/samples/x.png"]
    stored = _stored(server, "")
    assert set(stored) == {"README.md", "samples/x.png"}
    assert stored["README.md"] == (MODEL_CARD.encode(), "text/markdown")
    assert _upload(server, folder, "/") == [f"s3://{bucket}/README.md", f"s3://{bucket}/samples/x.png"]


def test_s3_large_file_goes_multipart(s3, out_dir, monkeypatch):
    monkeypatch.setattr(pub, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(pub, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    big = os.urandom(11 * 2**20)
    (out_dir / "pytorch_lora_weights.safetensors").write_bytes(big)
    prefix = _prefix()
    _upload(s3, out_dir, prefix)
    key = f"{prefix}/pytorch_lora_weights.safetensors"
    head = s3.client().head_object(Bucket=s3.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert head["ContentType"] == "application/octet-stream"
    assert _stored(s3, prefix)[key][0] == big


def test_s3_default_credential_chain(s3, out_dir, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    prefix = _prefix()
    assert len(_upload(s3, out_dir, prefix, access_key_id=None, secret_access_key=None)) == len(EXPECTED)
    assert len(_stored(s3, prefix)) == len(EXPECTED)


@pytest.mark.parametrize("which", ["unknown-key", "wrong-secret"])
def test_s3_bad_credentials(s3, out_dir, which):
    access_key = "AKIAWRONGWRONG123456" if which == "unknown-key" else s3.access_key_id
    secret = "sEcReTvAlUe/ThatMustNotLeak+0123456789ab"
    prefix = _prefix()
    with pytest.raises(PublishError) as info:
        _upload(s3, out_dir, prefix, access_key_id=access_key, secret_access_key=secret)
    msg = str(info.value)
    assert "credentials were refused" in msg
    assert ("InvalidAccessKeyId" if which == "unknown-key" else "SignatureDoesNotMatch") in msg
    assert f"s3://{s3.bucket}/{prefix}/" in msg
    assert secret not in msg and access_key not in msg and s3.secret_access_key not in msg
    assert _stored(s3, prefix) == {}


def test_s3_key_without_permission(s3, out_dir):
    with pytest.raises(PublishError) as info:
        _upload(
            s3,
            out_dir,
            _prefix(),
            access_key_id=s3.denied_access_key_id,
            secret_access_key=s3.denied_secret_access_key,
        )
    msg = str(info.value)
    assert "AccessDenied" in msg and "s3:PutObject" in msg
    assert s3.denied_secret_access_key not in msg


def test_s3_only_one_credential(s3, out_dir):
    with pytest.raises(PublishError, match="set both"):
        _upload(s3, out_dir, _prefix(), secret_access_key=None)


def test_s3_missing_bucket(s3, out_dir):
    with pytest.raises(PublishError) as info:
        publish_s3(
            out_dir,
            "no-such-bucket-here",
            "p",
            endpoint_url=s3.endpoint_url,
            region=s3.region,
            public_base_url=None,
            access_key_id=s3.access_key_id,
            secret_access_key=s3.secret_access_key,
        )
    msg = str(info.value)
    assert "NoSuchBucket" in msg and "'no-such-bucket-here' does not exist" in msg
    assert msg.startswith("S3 upload to s3://no-such-bucket-here/p/")


def test_s3_unreachable_endpoint(out_dir):
    # the production retry settings: connection errors are retried, with a short back-off
    endpoint = f"http://127.0.0.1:{s3server.free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(PublishError) as info:
        publish_s3(
            out_dir,
            "bucket",
            "p",
            endpoint_url=endpoint,
            region="auto",
            public_base_url=None,
            access_key_id="AKIAEXAMPLE",
            secret_access_key="secret-value-xyz",
        )
    msg = str(info.value)
    assert "EndpointConnectionError" in msg and "could not reach" in msg and endpoint in msg
    assert "secret-value-xyz" not in msg
    assert time.monotonic() - t0 < 10


def test_s3_no_credentials_anywhere(out_dir, monkeypatch):
    monkeypatch.setattr(pub, "S3_MAX_ATTEMPTS", 1)
    with pytest.raises(PublishError, match="no usable S3 credentials"):
        publish_s3(
            out_dir,
            "bucket",
            "p",
            endpoint_url=f"http://127.0.0.1:{s3server.free_port()}",
            region=None,
            public_base_url=None,
            access_key_id=None,
            secret_access_key=None,
        )


def test_content_types():
    assert pub.content_type("a.safetensors") == "application/octet-stream"
    assert pub.content_type("x/config.json") == "application/json"
    assert pub.content_type("README.md") == "text/markdown"
    assert pub.content_type("loss.png") == "image/png"
    assert pub.content_type("unknown.zzz") == "application/octet-stream"


# ----------------------------------------------------------------------------- Hub


class _HubRecorder:
    """Stands in for HfApi.create_repo / upload_folder; checks the folder while the upload is 'running'."""

    def __init__(self, monkeypatch, create_error=None, upload_error=None):
        self.calls = []
        self.create_error, self.upload_error = create_error, upload_error
        rec = self

        def create_repo(api, repo_id, **kw):
            rec.calls.append(("create_repo", api.token, repo_id, kw))
            if rec.create_error:
                raise rec.create_error
            from huggingface_hub.hf_api import RepoUrl

            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, **kw):
            folder = Path(kw["folder_path"])
            rec.card = (folder / "README.md").read_text()
            rec.calls.append(("upload_folder", api.token, kw["repo_id"], kw))
            if rec.upload_error:
                raise rec.upload_error
            return None

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def _http_error(status: int, server_message: str | None = None) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(
        f"{status} Client Error for url: {request.url}",
        response=httpx2.Response(status, request=request),
        server_message=server_message,
    )


def test_hub_upload_calls(monkeypatch, out_dir):
    rec = _HubRecorder(monkeypatch)
    up = publish_hub(out_dir, "someone/my-lora", token=HF_TOKEN)
    assert up.url == "https://huggingface.co/someone/my-lora"
    (c_name, c_token, c_repo, c_kw), (u_name, u_token, u_repo, u_kw) = rec.calls
    assert (c_name, c_repo, c_token) == ("create_repo", "someone/my-lora", HF_TOKEN)
    assert c_kw["private"] is True and c_kw["exist_ok"] is True and c_kw["repo_type"] == "model"
    assert c_kw.get("token") == HF_TOKEN
    assert (u_name, u_repo, u_token) == ("upload_folder", "someone/my-lora", HF_TOKEN)
    assert Path(u_kw["folder_path"]) == out_dir and u_kw.get("token") == HF_TOKEN
    assert ".work/*" in u_kw["ignore_patterns"]
    assert "advanced-trainer" in u_kw["commit_message"]
    assert rec.card == MODEL_CARD  # the model card goes up as is


def test_hub_public_repo(monkeypatch, out_dir):
    rec = _HubRecorder(monkeypatch)
    publish_hub(out_dir, "someone/my-lora", private=False, token=HF_TOKEN)
    assert rec.calls[0][3]["private"] is False


def test_hub_injected_api(out_dir):
    class FakeApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            return f"https://hub.example/{repo_id}"

        def upload_folder(self, **kw):
            self.calls.append(("upload_folder", kw["repo_id"], kw))

    api = FakeApi()
    assert publish_hub(out_dir, "org/model", token=HF_TOKEN, api=api).url == "https://hub.example/org/model"
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]


@pytest.mark.parametrize(
    "status,where,expect",
    [
        (401, "create", "set hf_token"),
        (403, "upload", "write access"),
        (404, "create", "check publish.hub_model_id"),
        (503, "upload", "try again later"),
    ],
)
def test_hub_http_errors(monkeypatch, out_dir, status, where, expect):
    err = _http_error(status, server_message=f"Invalid token {HF_TOKEN}")  # even if the server echoes it
    _HubRecorder(monkeypatch, **{f"{where}_error": err})
    with pytest.raises(PublishError) as info:
        publish_hub(out_dir, "someone/my-lora", token=HF_TOKEN)
    msg = str(info.value)
    assert "someone/my-lora" in msg and f"HTTP {status}" in msg and expect in msg
    assert HF_TOKEN not in msg
    assert ("repo creation" if where == "create" else "upload") in msg


def test_hub_missing_token_and_network(monkeypatch, out_dir):
    _HubRecorder(monkeypatch, create_error=LocalTokenNotFoundError("Token is required"))
    with pytest.raises(PublishError, match="set hf_token"):
        publish_hub(out_dir, "someone/my-lora", token=None)
    _HubRecorder(monkeypatch, upload_error=httpx2.ConnectError("Name or service not known"))
    with pytest.raises(PublishError, match="could not reach the Hub"):
        publish_hub(out_dir, "someone/my-lora", token=HF_TOKEN)


# ----------------------------------------------------------------------------- publish()


def test_publish_both_targets(s3, out_dir, monkeypatch):
    rec = _HubRecorder(monkeypatch)
    prefix = _prefix()
    spec = PublishSpec(
        hub_model_id="someone/my-lora",
        s3_bucket=s3.bucket,
        s3_prefix=prefix,
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
        s3_public_base_url="https://cdn.example.com",
    )
    lines = []
    result = publish(
        out_dir,
        spec,
        hf_token=HF_TOKEN,
        s3_access_key_id=s3.access_key_id,
        s3_secret_access_key=s3.secret_access_key,
        log=lines.append,
    )
    assert result["hub"] == "https://huggingface.co/someone/my-lora"
    assert result["s3"] == [f"https://cdn.example.com/{prefix}/{rel}" for rel in sorted(EXPECTED)]
    assert [c[0] for c in rec.calls] == ["create_repo", "upload_folder"]
    assert rec.calls[0][3]["private"] is True
    assert len(_stored(s3, prefix)) == len(EXPECTED)
    assert lines == [
        f"publish: {len(EXPECTED)} files to https://huggingface.co/someone/my-lora",
        f"publish: {len(EXPECTED)} files to s3://{s3.bucket}/{prefix}",
    ]
    assert not any(HF_TOKEN in line or s3.secret_access_key in line for line in lines)


def test_publish_nothing_configured(out_dir, monkeypatch):
    rec = _HubRecorder(monkeypatch, create_error=AssertionError("must not be called"))
    lines = []
    assert publish(out_dir, PublishSpec(), hf_token=HF_TOKEN, log=lines.append) == {}
    assert publish(out_dir, None, log=lines.append) == {}
    assert lines == [] and rec.calls == []


def test_publish_failing_target_raises(s3, out_dir, monkeypatch):
    # S3 fails after the Hub succeeded: raised, and the message says what already went out
    _HubRecorder(monkeypatch)
    spec = PublishSpec(
        hub_model_id="someone/my-lora",
        s3_bucket=s3.bucket,
        s3_prefix=_prefix(),
        s3_endpoint_url=s3.endpoint_url,
        s3_region=s3.region,
    )
    with pytest.raises(PublishError) as info:
        publish(
            out_dir,
            spec,
            hf_token=HF_TOKEN,
            s3_access_key_id=s3.access_key_id,
            s3_secret_access_key="not-the-secret-0123456789",
            log=lambda _: None,
        )
    msg = str(info.value)
    assert (
        "credentials were refused" in msg
        and "already published" in msg
        and "huggingface.co/someone/my-lora" in msg
    )
    assert "not-the-secret-0123456789" not in msg

    # the Hub fails first: raised before S3 is tried
    _HubRecorder(monkeypatch, create_error=_http_error(401))
    prefix = _prefix()
    spec = spec.model_copy(update={"s3_prefix": prefix})
    with pytest.raises(PublishError, match="Hub repo creation for someone/my-lora failed"):
        publish(
            out_dir,
            spec,
            hf_token=HF_TOKEN,
            s3_access_key_id=s3.access_key_id,
            s3_secret_access_key=s3.secret_access_key,
            log=lambda _: None,
        )
    assert _stored(s3, prefix) == {}
