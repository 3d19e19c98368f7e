"""The Cog package through the real Cog HTTP server (coglet) on loopback.

Train entry (cog_train.py, ``--x-mode train``): trainings train the tiny models and return
output.zip *uploaded* to the server's ``--upload-url``; inputs are validated by cog's schema;
secrets stay secret; cancel is prompt and total; webhooks arrive; setup refuses missing weights.

Run entry (predict.py): what Replicate runs for a training's destination version, COG_WEIGHTS
set to the training's weights: it renders with the trained LoRA, exactly as the stock diffusers
pipeline with ``load_lora_weights`` does; ``lora_weights`` / ``extra_lora`` work on the trainer's
own version; bad inputs get 422 and bad weights fail setup, each naming the culprit.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cogserver import CogServer, FileServer, Receiver, data_uri, wait_until
from conftest import RENDER_INPUT, ROOT, cog_server_fixture, stock_sdxl, tiny_spec

SECRET = "hf_TOPSECRETtoken1234567890"
S3_SECRET = "s3SECRETkey0987654321zyxw"
PROMPT = "sks, a red circle"
# Outputs are 8-bit images. Our renderer and the stock pipeline run the same fp32 ops on the
# CPU, so they agree exactly in practice; 2 levels (of 255) leave room for a rounding step in
# a different BLAS path, while the LoRA itself moves pixels by far more (asserted below).
TOLERANCE = 2


def _unzip(data: bytes, out: Path) -> Path:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(out)
    return out


def _image(value: str) -> np.ndarray:
    assert value.startswith("data:image/"), value[:60]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[1]))).convert("RGB")).astype(
        int
    )


def _stock(family: str, cog_weights: Path, lora_dirs=(), scales=None, seed: int = 3) -> np.ndarray:
    """What a user gets from the stock diffusers pipeline with ``load_lora_weights``."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    if family == "flux":
        pipe, kw = (
            FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev"),
            {"guidance_scale": 3.5, "max_sequence_length": 512},
        )
    else:
        pipe, kw = (
            StableDiffusionXLPipeline.from_pretrained(cog_weights / "tiny-sdxl"),
            {"guidance_scale": 5.0},
        )
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, d in enumerate(lora_dirs):
        pipe.load_lora_weights(d, adapter_name=f"a{i}")
        names.append(f"a{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=scales or [1.0] * len(names))
    img = pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    ).images[0]
    return np.asarray(img.convert("RGB")).astype(int)


def _render(server, **inputs) -> dict:
    body = {**RENDER_INPUT, "prompt": PROMPT, **inputs}
    body = {k: v for k, v in body.items() if v is not None}  # an explicit null is a 422: leave the key out
    r = server.post("/predictions", {"input": body})
    assert r.status_code == 200, r.text
    return r.json()


def _ok(body: dict) -> dict:
    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    return body


# -- trainings: weights uploaded, and the destination version renders with them ----------------------


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_training_uploads_weights_and_the_destination_renders_with_them(
    request, family, upload_sink, run_servers, cog_weights, tmp_path
):
    weights = request.getfixturevalue(f"{family}_weights")
    assert weights.startswith(upload_sink.url + "/files/") and "?" not in weights, (
        weights
    )  # uploaded, not inlined
    assert any(p["url"] == weights and p["prediction_id"] for p in upload_sink.puts)
    out = _unzip(upload_sink.get(weights), tmp_path / "out")
    assert {
        "pytorch_lora_weights.safetensors",
        *(["lora_kohya.safetensors"] if family == "sdxl" else []),  # FLUX.1: on request (export.kohya)
        "config.json",
        "README.md",
        "loss.png",
        "dataset_report.json",
    } <= {p.name for p in out.iterdir()}
    assert list((out / "samples").glob("*.png")) and not (out / ".work").exists()

    body = _ok(_render(run_servers.get(weights)))  # the destination version: COG_WEIGHTS = the weights URL
    assert len(body["output"]) == 1
    ours = _image(body["output"][0])
    stock = _stock(family, cog_weights, [out])
    base = _stock(family, cog_weights)
    assert np.abs(ours - stock).max() <= TOLERANCE, (
        "the run entry does not render as diffusers does with this LoRA"
    )
    assert np.abs(stock - base).max() > 10, "the trained LoRA does not change the image"
    assert "trigger word" not in body["logs"]  # the prompt has it: no hint


def test_a_bad_spec_fails_the_training_naming_every_field(train_server, sample_zip):
    r = train_server.post(
        "/trainings",
        {
            "input": {
                "dataset": data_uri(sample_zip),
                "spec": json.dumps({"lora": {"rank": 0}, "optimizer": "sgd"}),
            }
        },
    )
    body = r.json()
    assert body["status"] == "failed"
    assert "lora.rank" in body["error"] and "optimizer" in body["error"]


def test_training_inputs_get_422_naming_the_field(train_server):
    for field, value in (("steps", -5), ("model", "sd15"), ("resolutions", "512;768"), ("lora_rank", 5000)):
        r = train_server.post("/trainings", {"input": {"dataset": "data:,x", field: value}})
        assert r.status_code == 422, r.text
        assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text


def test_training_from_a_loopback_url(train_server, sample_zip, upload_sink):
    files = FileServer(sample_zip.parent)
    try:
        body = train_server.post(
            "/trainings",
            {
                "input": {
                    "dataset": f"{files.url}/{sample_zip.name}",
                    "spec": tiny_spec(),
                    "steps": 2,
                    "lora_type": "loha",
                }
            },
        ).json()
    finally:
        files.close()
    assert body["status"] == "succeeded", body.get("error")
    assert 'PROGRESS {"phase": "train", "step": 2, "total": 2' in body["logs"]
    assert "dataset: 8 images used" in body["logs"]
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        spec = json.loads(zf.read("config.json"))["spec"]
        assert spec["steps"] == 2 and spec["lora"]["type"] == "loha"  # the typed inputs won
        with zf.open("pytorch_lora_weights.safetensors") as f:
            assert b".hada_w1_a" in f.read(200_000)  # the LoHa the input asked for


# -- the run entry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_outputs", 5),
        ("aspect_ratio", "7:3"),
        ("output_format", "gif"),
        ("lora_scale", 9),
        ("width", 8),
        ("output_quality", 101),
        ("seed", -1),
    ],
)
def test_run_inputs_get_422_naming_the_field(run_servers, field, value):
    r = run_servers.get(None).post("/predictions", {"input": {"prompt": "x", field: value}})
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text


def test_run_needs_a_prompt(run_servers):
    r = run_servers.get(None).post("/predictions", {"input": {"num_outputs": 1}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prompt", r.text


def test_lora_weights_and_extra_lora_on_the_trainers_own_version(
    run_servers, flux_weights, sdxl_weights, upload_sink, cog_weights, tmp_path
):
    own = run_servers.get(None)  # no COG_WEIGHTS: the trainer's own version, base tiny-flux-dev
    out = _unzip(upload_sink.get(flux_weights), tmp_path / "flux")
    plain = _image(_ok(_render(own))["output"][0])
    assert np.abs(plain - _stock("flux", cog_weights)).max() <= TOLERANCE

    first = _ok(_render(own, lora_weights=flux_weights))
    assert np.abs(_image(first["output"][0]) - _stock("flux", cog_weights, [out])).max() <= TOLERANCE
    again = _ok(_render(own, lora_weights=flux_weights, seed=4))
    assert "render: loaded" not in again["logs"], "a second prediction with the same LoRA loaded something"

    # a bare .safetensors by URL, stacked at half strength: only that adapter loads
    bare = upload_sink.put("my_lora.safetensors", (out / "pytorch_lora_weights.safetensors").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "pytorch_lora_weights.safetensors", other / "pytorch_lora_weights.safetensors")
    stacked = _ok(_render(own, lora_weights=flux_weights, extra_lora=bare, extra_lora_scale=0.5))
    assert "render: loaded LoRA my_lora.safetensors" in stacked["logs"]
    assert "render: loaded flux-dev" not in stacked["logs"]
    expected = _stock("flux", cog_weights, [out, other], [1.0, 0.5])
    assert np.abs(_image(stacked["output"][0]) - expected).max() <= TOLERANCE
    assert np.abs(_image(stacked["output"][0]) - _image(first["output"][0])).max() > 2

    # the trained LoRAs stay loaded; rendering the plain base again loads nothing
    assert np.abs(_image(_ok(_render(own))["output"][0]) - plain).max() <= TOLERANCE

    wrong = _render(own, lora_weights=flux_weights, extra_lora=sdxl_weights)
    assert wrong["status"] == "failed" and "extra_lora" in wrong["error"] and "sdxl" in wrong["error"]
    missing = _render(own, lora_weights=upload_sink.url + "/files/nope/lora.zip")
    assert missing["status"] == "failed" and "lora_weights" in missing["error"] and "404" in missing["error"]
    hub = _render(own, lora_weights="someone/some-lora")  # the Hub is unreachable here
    assert (
        hub["status"] == "failed" and "lora_weights" in hub["error"] and "someone/some-lora" in hub["error"]
    )
    local = _render(own, lora_weights="/etc/passwd")
    assert local["status"] == "failed" and "lora_weights" in local["error"]


def test_an_sdxl_lora_switches_the_base_and_several_outputs_use_consecutive_seeds(run_servers, sdxl_weights):
    own = run_servers.get(None)
    body = _ok(_render(own, lora_weights=sdxl_weights, num_outputs=2, output_format="jpg", output_quality=80))
    assert "switching the base model to sdxl" in body["logs"]
    assert [o.split(";")[0] for o in body["output"]] == ["data:image/jpeg"] * 2
    single = _ok(_render(own, lora_weights=sdxl_weights, seed=4, output_format="jpg", output_quality=80))
    assert np.abs(_image(body["output"][1]) - _image(single["output"][0])).max() <= TOLERANCE
    webp = _ok(
        _render(
            own,
            lora_weights=sdxl_weights,
            aspect_ratio="1:1",
            width=None,
            height=None,
            num_inference_steps=1,
            output_format="webp",
        )
    )
    img = Image.open(io.BytesIO(base64.b64decode(webp["output"][0].split(",", 1)[1])))
    assert img.format == "WEBP" and img.size == (1024, 1024)


def test_bad_cog_weights_fail_setup_naming_them(tmp_path, upload_sink, cog_weights):
    corrupt = upload_sink.put("output.zip", b"PK\x03\x04 this is not a zip archive at all")
    cases = {
        upload_sink.url + "/files/gone/output.zip?token=s3cr3t": "HTTP 404",
        corrupt: "cannot unpack",
        str(tmp_path / "missing.zip"): "does not exist",
    }
    for weights, why in cases.items():
        server = CogServer(
            "run",
            tmp_path,
            {
                "ADVANCED_TRAINER_WEIGHTS": str(cog_weights),
                "COG_WEIGHTS": weights,
                "ADVANCED_TRAINER_LORA_CACHE": str(tmp_path / "cache"),
                "HF_HUB_OFFLINE": "1",
            },
        )
        try:
            health = server.wait(statuses=("SETUP_FAILED",), timeout=90)
        finally:
            server.stop()
        logs = json.dumps(health.get("setup", {})) + server.log_path.read_text(errors="replace")
        assert "COG_WEIGHTS" in logs and why in logs, logs[-2000:]
        assert "s3cr3t" not in logs  # a signed URL's query string is never shown


def test_the_served_schema_is_the_committed_one(run_servers, train_server):
    committed = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert run_servers.get(None).client.get("/openapi.json").json() == committed
    assert train_server.client.get("/openapi.json").json() == committed
    assert (
        committed["components"]["schemas"]["TrainingInput"]["properties"]["hf_token"]["x-cog-secret"] is True
    )


# -- webhooks and secrets --------------------------------------------------------------------------


def test_webhooks_carry_progress_and_secrets_never_leak(train_server, sample_zip, upload_sink):
    hooks = Receiver()
    try:
        r = train_server.post(
            "/trainings",
            {
                "input": {
                    "dataset": data_uri(sample_zip),
                    "spec": tiny_spec(),
                    "steps": 6,
                    "hf_token": SECRET,
                    "s3_access_key_id": "AKIA" + S3_SECRET[:8],
                    "s3_secret_access_key": S3_SECRET,
                },
                "webhook": hooks.url,
                "webhook_events_filter": ["start", "logs", "output", "completed"],
            },
            headers={"Prefer": "respond-async"},
        )
        assert r.status_code == 202, r.text
        final = hooks.wait_terminal()
    finally:
        hooks.close()
    assert final["status"] == "succeeded", final.get("error")
    statuses = [p["status"] for p in hooks.payloads]
    assert "processing" in statuses  # start / logs events before completion
    progress_hooks = [
        p
        for p in hooks.payloads
        if p["status"] == "processing" and '"phase": "train"' in (p.get("logs") or "")
    ]
    assert progress_hooks, "no webhook carried a progress line"
    assert 'PROGRESS {"phase": "done"' in final["logs"]

    # the secret appears nowhere: webhook payloads, logs, the output archive (config.json included)
    everything = json.dumps(hooks.payloads)
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(final["output"]))) as zf:
        for name in zf.namelist():
            everything += zf.read(name).decode("latin-1")
    everything += train_server.log_path.read_text(errors="replace")
    for secret in (SECRET, S3_SECRET):
        assert secret not in everything


# -- cancel ----------------------------------------------------------------------------------------


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def test_cancel_stops_every_process_promptly(tmp_path_factory, cog_weights, sample_zip):
    """Two data-parallel trainer processes (gloo on the CPU), canceled mid-training."""
    jobs = tmp_path_factory.mktemp("cancel-jobs")
    gen = cog_server_fixture("train", tmp_path_factory, cog_weights, jobs, ADVANCED_TRAINER_NUM_PROCESSES="2")
    server = next(gen)
    hooks = Receiver()
    try:
        r = server.post(
            "/trainings",
            {
                "id": "pred_cancel_me",
                "input": {"dataset": data_uri(sample_zip), "spec": tiny_spec(), "steps": 100000},
                "webhook": hooks.url,
            },
            headers={"Prefer": "respond-async"},
        )
        assert r.status_code == 202

        def both_train(payloads: list[dict]) -> bool:
            logs = "".join(p.get("logs") or "" for p in payloads)
            return '"phase": "train"' in logs and "process 1 of 2" in logs

        hooks.wait(both_train, 120, "both data-parallel workers logging training steps")
        assert len(_processes_mentioning(str(jobs))) >= 3  # launcher + 2 workers
        started = time.monotonic()
        assert server.client.post("/trainings/pred_cancel_me/cancel").status_code == 200
        final = hooks.wait_terminal(timeout=30)
        elapsed = time.monotonic() - started
        assert final["status"] == "canceled"
        assert elapsed < 10, f"cancel took {elapsed:.1f}s"
        wait_until(
            lambda: not _processes_mentioning(str(jobs)),
            10,
            "trainer processes outlived the cancel: they did not all exit",
            interval=0.2,
        )
    finally:
        hooks.close()
        gen.close()


# -- setup -------------------------------------------------------------------------------------------


def test_missing_base_weights_fail_setup_saying_what_to_provide(tmp_path_factory, tmp_path, cog_weights):
    weights = tmp_path / "weights"
    shutil.copytree(cog_weights, weights)
    shutil.rmtree(weights / "tiny-sdxl")  # listed in the manifest, gone from the disk
    server = CogServer("train", tmp_path, {"ADVANCED_TRAINER_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1"})
    try:
        health = server.wait(statuses=("SETUP_FAILED",), timeout=60)
    finally:
        server.stop()
    logs = json.dumps(health.get("setup", {})) + server.log_path.read_text(errors="replace")
    assert "tiny-sdxl" in logs
    assert "ADVANCED_TRAINER_BASE_WEIGHTS" in logs  # one of the ways to provide them


# -- publishing ------------------------------------------------------------------------------------


def test_s3_publishing_puts_the_outputs_under_the_prefix(train_server, sample_zip, s3, upload_sink):
    inputs = {
        "dataset": data_uri(sample_zip),
        "spec": tiny_spec(),
        "steps": 4,
        "s3_bucket": s3.bucket,
        "s3_prefix": "runs/job-7",
        "s3_endpoint_url": s3.endpoint_url,
        "s3_region": s3.region,
        "s3_access_key_id": s3.access_key_id,
        "s3_secret_access_key": s3.secret_access_key,
    }
    body = train_server.post("/trainings", {"input": inputs}).json()
    assert body["status"] == "succeeded", body.get("error")
    with zipfile.ZipFile(io.BytesIO(upload_sink.get(body["output"]))) as zf:
        archived = {n: zf.read(n) for n in zf.namelist()}
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/job-7/")["Contents"]
    keys = {o["Key"].removeprefix("runs/job-7/") for o in listed}
    assert keys == set(archived)
    got = (
        s3.client()
        .get_object(Bucket=s3.bucket, Key="runs/job-7/pytorch_lora_weights.safetensors")["Body"]
        .read()
    )
    assert got == archived["pytorch_lora_weights.safetensors"]
    assert "publish:" in body["logs"] and s3.secret_access_key not in body["logs"]

    assert json.loads(archived["config.json"])["publish"]["failed"] is None

    # a bad key fails the job before anything is staged or loaded, naming the input (a publish that
    # fails after training keeps the weights: tests/test_hub_publish.py)
    bad = {**inputs, "s3_prefix": "runs/job-8", "s3_secret_access_key": "wrong-secret-value-123"}
    body = train_server.post("/trainings", {"input": bad}).json()
    assert body["status"] == "failed"
    assert "s3_secret_access_key" in body["error"] and "checked before any training" in body["error"]
    assert "wrong-secret-value-123" not in body["error"] + body["logs"]
    assert "dataset:" not in body["logs"] and "PROGRESS" not in body["logs"]  # nothing staged or loaded
    denied = {
        **inputs,
        "s3_access_key_id": s3.denied_access_key_id,
        "s3_secret_access_key": s3.denied_secret_access_key,
    }
    body = train_server.post("/trainings", {"input": denied}).json()
    assert body["status"] == "failed" and "access to bucket" in body["error"] and "denied" in body["error"]


def test_a_full_fine_tune_travels_through_s3_and_the_destination_loads_it_from_there(
    train_server, run_servers, sample_zip, s3, upload_sink, cog_weights, tmp_path
):
    import s3server

    # without a publish target the job is refused before anything is staged or loaded
    refused = {
        "dataset": data_uri(sample_zip),
        "spec": tiny_spec("sdxl"),
        "model": "sdxl",
        "mode": "full",
        "steps": 2,
    }
    body = train_server.post("/trainings", {"input": refused}).json()
    assert body["status"] == "failed" and "full fine-tune needs a publish target" in body["error"]
    assert "hub_model_id" in body["error"] and "s3_bucket" in body["error"]
    assert "dataset:" not in body["logs"] and "PROGRESS" not in body["logs"]

    gateway = s3server.PublicGateway(s3)  # the bucket's public domain (a CDN, R2's public URL)
    try:
        inputs = {
            **refused,
            "steps": 4,
            "learning_rate": 1e-3,
            "s3_bucket": s3.bucket,
            "s3_prefix": "runs/full-1",
            "s3_endpoint_url": s3.endpoint_url,
            "s3_region": s3.region,
            "s3_access_key_id": s3.access_key_id,
            "s3_secret_access_key": s3.secret_access_key,
            "s3_public_base_url": gateway.url,
        }
        body = _ok(train_server.post("/trainings", {"input": inputs}).json())
        data = upload_sink.get(body["output"])
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = set(zf.namelist())
            pointer = json.loads(zf.read("published_model.json"))
        assert not any(n.startswith("model/") for n in names), "the model travelled through Cog's upload"
        assert {"config.json", "README.md"} <= names and any(n.startswith("samples/") for n in names)
        assert pointer["s3"]["public_url"] == f"{gateway.url}/runs/full-1/model"
        assert "model/ left out of output.zip" in body["logs"]

        published = tmp_path / "published"  # what the user finds in the bucket
        client = s3.client()
        for obj in client.list_objects_v2(Bucket=s3.bucket, Prefix="runs/full-1/model/")["Contents"]:
            dest = published / obj["Key"].removeprefix("runs/full-1/model/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3.bucket, obj["Key"], str(dest))
        assert len(data) < len(b"".join(p.read_bytes() for p in published.rglob("*") if p.is_file()))

        render = _ok(_render(run_servers.get(body["output"])))  # the destination version
        assert any(k.startswith("runs/full-1/model/") for k in gateway.gets), (
            "not fetched from the public URL"
        )
    finally:
        gateway.close()
    ours, stock = _image(render["output"][0]), stock_sdxl(published, PROMPT)
    assert np.abs(ours - stock).max() <= TOLERANCE, "the destination does not render the published model"
    assert np.abs(stock - _stock("sdxl", cog_weights)).max() > 10, "the fine-tune does not change the image"
