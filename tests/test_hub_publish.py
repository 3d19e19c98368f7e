"""Publishing to the Hugging Face Hub, against a loopback stand-in the real huggingface_hub client
talks to (tests/hfserver.py): the train entry checks the token and the namespace before any
training, publishes a finished job, and keeps the weights when the upload fails after training;
the client publishes a delivered job's outputs from the laptop.
"""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from conftest import RENDER_INPUT, cog_server_fixture, stock_sdxl, tiny_spec

WRITE, READ, OTHER = "hf_alice_write_token_0123456789", "hf_bob_read_token_0123456789", "hf_carol_0123456789"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from hfserver import HubServer

    with HubServer() as server:
        server.add_token(WRITE, user="alice", role="write", orgs=["acme"])
        server.add_token(READ, user="bob", role="read")
        server.add_token(OTHER, user="carol", role="write")
        yield server


@pytest.fixture(scope="module")
def hub_train_server(hub, tmp_path_factory, cog_weights, jobs_dir, upload_sink):
    """The train entry reaching the stand-in as it would reach huggingface.co."""
    yield from cog_server_fixture(
        "train",
        tmp_path_factory,
        cog_weights,
        jobs_dir,
        args=("--upload-url", upload_sink.upload_url),
        HF_XET_CACHE=str(tmp_path_factory.mktemp("xet-cache")),
        **hub.client_env(),
    )


def _train(server, sample_zip, repo: str, token: str) -> dict:
    from cogserver import data_uri

    inputs = {
        "dataset": data_uri(sample_zip),
        "spec": tiny_spec(),
        "steps": 3,
        "hub_model_id": repo,
        "hf_token": token,
    }
    return server.post("/trainings", {"input": inputs}).json()


@pytest.mark.parametrize(
    "token,repo,says",
    [
        ("hf_not_a_real_token_0000000000", "alice/my-lora", "hf_token"),  # 401
        (READ, "bob/my-lora", "read-only"),
        (OTHER, "acme/my-lora", "hub_model_id"),  # carol is not in acme
    ],
    ids=["bad-token", "read-only-token", "foreign-namespace"],
)
def test_a_credential_that_cannot_publish_fails_the_job_before_any_training(
    hub_train_server, sample_zip, token, repo, says
):
    body = _train(hub_train_server, sample_zip, repo, token)
    assert body["status"] == "failed"
    assert says in body["error"] and "checked before any training" in body["error"]
    assert token not in body["error"] + body["logs"]
    assert "dataset:" not in body["logs"] and "PROGRESS" not in body["logs"]  # nothing staged or loaded


def test_a_finished_job_is_published_and_a_failed_upload_keeps_the_weights(
    hub, hub_train_server, sample_zip, upload_sink, tmp_path, monkeypatch
):
    body = _train(hub_train_server, sample_zip, "acme/team-lora", WRITE)
    assert body["status"] == "succeeded", body.get("error")
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        archived = {n: zf.read(n) for n in zf.namelist()}
    published = hub.files("acme/team-lora")
    assert published["pytorch_lora_weights.safetensors"] == archived["pytorch_lora_weights.safetensors"]
    outcome = json.loads(archived["config.json"])["publish"]
    assert outcome["failed"] is None and set(outcome["published"]) == {"hub", "hub_revision"}
    assert outcome["published"]["hub_revision"] == hub.commits("acme/team-lora")[-1].oid
    assert hub.is_private("acme/team-lora")  # hub_private defaults to true

    # the token and namespace check out before training; the upload is refused after it
    hub.refuse_uploads = True
    try:
        body = _train(hub_train_server, sample_zip, "alice/later-lora", WRITE)
    finally:
        hub.refuse_uploads = False
    assert body["status"] == "succeeded", body.get("error")  # the paid-for weights are not lost
    out = tmp_path / "delivered"
    out.mkdir()
    (out / "output.zip").write_bytes(upload_sink.get(body["output"]))
    with zipfile.ZipFile(out / "output.zip") as zf:
        zf.extractall(out)
        names = {n for n in zf.namelist() if not n.endswith("/")}
    outcome = json.loads((out / "config.json").read_text())["publish"]
    assert outcome["published"] == {} and "403" in outcome["failed"]
    assert [ln for ln in body["logs"].splitlines() if ln.startswith("publish failed: ")]
    assert "pytorch_lora_weights.safetensors" in names
    assert not hub.files("alice/later-lora").get("pytorch_lora_weights.safetensors")

    # ... and the client publishes the delivered outputs from the laptop
    import huggingface_hub.constants

    from client.delivery import publish_delivered
    from train.spec import PublishSpec

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))
    results = publish_delivered(
        out, PublishSpec(hub_model_id="alice/later-lora"), {"HF_TOKEN": WRITE}, log=print
    )
    assert "hub" in results
    assert set(hub.files("alice/later-lora")) >= names  # the archive's files, not output.zip itself
    assert "output.zip" not in hub.files("alice/later-lora")


def _full_sdxl(server, sample_zip, repo: str) -> dict:
    from cogserver import data_uri

    inputs = {
        "dataset": data_uri(sample_zip),
        "spec": tiny_spec("sdxl"),
        "model": "sdxl",
        "mode": "full",
        "steps": 3,
        "learning_rate": 1e-3,
        "hub_model_id": repo,
        "hf_token": WRITE,
    }
    return server.post("/trainings", {"input": inputs}).json()


def _render(server, **extra) -> dict:
    body = {**RENDER_INPUT, "prompt": "sks, a red circle", **extra}
    return server.post("/predictions", {"input": body}).json()


def test_a_full_fine_tune_in_a_private_repo_renders_once_a_prediction_brings_hf_token(
    hub,
    hub_train_server,
    sample_zip,
    upload_sink,
    tmp_path_factory,
    cog_weights,
    jobs_dir,
    tmp_path,
    monkeypatch,
):
    import base64

    import numpy as np
    from PIL import Image

    body = _full_sdxl(hub_train_server, sample_zip, "alice/full-sdxl")
    assert body["status"] == "succeeded", body.get("error")
    archive = tmp_path / "archive"
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        zf.extractall(archive)
    assert not (archive / "model").exists()
    pointer = json.loads((archive / "published_model.json").read_text())
    assert pointer["hub"] == {
        "repo": "alice/full-sdxl",
        "revision": hub.commits("alice/full-sdxl")[-1].oid,
        "private": True,
    }
    published = tmp_path / "published"  # the model folder as the Hub holds it
    for name, content in hub.files("alice/full-sdxl").items():
        if name.startswith("model/"):
            (published / name[len("model/") :]).parent.mkdir(parents=True, exist_ok=True)
            (published / name[len("model/") :]).write_bytes(content)

    gen = cog_server_fixture(
        "run",
        tmp_path_factory,
        cog_weights,
        jobs_dir,
        COG_WEIGHTS=body["output"],
        ADVANCED_TRAINER_LORA_CACHE=str(tmp_path / "cache"),
        **hub.client_env(),
    )
    server = next(gen)  # setup succeeds without a token: the first prediction that has one fetches
    try:
        no_token = _render(server)
        assert no_token["status"] == "failed" and "hf_token" in no_token["error"]
        assert "alice/full-sdxl" in no_token["error"]
        rendered = _render(server, hf_token=WRITE)
        assert rendered["status"] == "succeeded", rendered.get("error")
    finally:
        gen.close()
    png = base64.b64decode(rendered["output"][0].split(",", 1)[1])
    ours = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    stock = stock_sdxl(published)
    assert np.abs(ours - stock).max() <= 2, "the destination does not render the published model"

    # a public repo is fetched at setup, anonymously
    import huggingface_hub.constants

    from train.inference import InferenceSession

    hub._get_repo("alice/full-sdxl", "model").private = False
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    before = len(hub.log)
    session = InferenceSession(str(archive), log=print, cache_dir=tmp_path / "cache-public")
    assert session.trained is not None and session.trained.model_dir is not None
    fetched = {
        p.relative_to(session.trained.model_dir) for p in session.trained.model_dir.rglob("*") if p.is_file()
    }
    assert fetched == {p.relative_to(published) for p in published.rglob("*") if p.is_file()}
    assert all(r.user is None for r in hub.log[before:])  # no token was sent


def test_a_full_fine_tune_whose_upload_fails_keeps_the_model_in_the_archive(
    hub, hub_train_server, sample_zip, upload_sink
):
    hub.refuse_uploads = True
    try:
        body = _full_sdxl(hub_train_server, sample_zip, "alice/full-refused")
    finally:
        hub.refuse_uploads = False
    assert body["status"] == "succeeded", body.get("error")
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        names = set(zf.namelist())
    assert "model/model_index.json" in names and "published_model.json" not in names
    assert "was not published; it goes into output.zip" in body["logs"]
