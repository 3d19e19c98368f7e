"""The Cog package through the real Cog HTTP server (coglet) on loopback: predictions and
trainings train the tiny models, inputs are validated by the committed schema, secrets stay
secret, cancel is prompt and total, webhooks arrive, and setup refuses missing weights."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cogserver import CogServer, FileServer, Receiver, data_uri, decode_output
from conftest import ROOT, cog_server_fixture

SECRET = "hf_TOPSECRETtoken1234567890"
S3_SECRET = "s3SECRETkey0987654321zyxw"


def tiny_spec(model: str = "flux-dev", **extra) -> str:
    base = {"flux-dev": "tiny-flux-dev", "sdxl": "tiny-sdxl"}[model]
    return json.dumps({"base_weights": base, "resolutions": "64", "learning_rate": 0.01, "caption_dropout": 0,
                       "validation": {"num_inference_steps": 2}, **extra})


def _lora_changes_image(archive: bytes, family: str, cog_weights: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    out = tmp_path / "unpacked"
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        names = zf.namelist()
        zf.extractall(out)
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "config.json", "README.md",
            "loss.png", "dataset_report.json"} <= set(names), names
    assert any(n.startswith("samples/") for n in names)
    assert not any(n.startswith(".work") for n in names)
    cls, base = (FluxPipeline, "tiny-flux-dev") if family == "flux" else (StableDiffusionXLPipeline, "tiny-sdxl")
    kw = {"max_sequence_length": 32} if family == "flux" else {}

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(pipe("sks, a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                               generator=torch.Generator().manual_seed(0), **kw).images[0])

    plain = render(cls.from_pretrained(cog_weights / base))
    pipe = cls.from_pretrained(cog_weights / base)
    pipe.load_lora_weights(out)
    assert np.abs(render(pipe) - plain).max() > 0.01, "the returned LoRA does not change the image"


# -- predictions and trainings -------------------------------------------------------------------

def test_prediction_flux_from_a_data_uri(predict_server, sample_zip, cog_weights, tmp_path):
    r = predict_server.post("/predictions", {"input": {
        "dataset": data_uri(sample_zip), "spec": tiny_spec(), "model": "flux-dev", "steps": 8,
        "trigger_word": "sks", "validation_prompts": "a red circle\na blue square"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs", "")[-2000:]
    assert 'PROGRESS {"phase": "train", "step": 8, "total": 8' in body["logs"]
    assert "dataset: 8 images used" in body["logs"]
    archive = decode_output(body["output"])
    _lora_changes_image(archive, "flux", cog_weights, tmp_path)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        config = json.loads(zf.read("config.json"))
        assert len([n for n in zf.namelist() if n.startswith("samples/")]) == 2
    assert config["spec"]["steps"] == 8 and config["spec"]["trigger_word"] == "sks"  # typed inputs won


def test_prediction_sdxl_from_a_loopback_url(predict_server, sample_zip, cog_weights, tmp_path):
    files = FileServer(sample_zip.parent)
    try:
        r = predict_server.post("/predictions", {"input": {
            "dataset": f"{files.url}/{sample_zip.name}", "model": "sdxl", "steps": 6, "lora_rank": 8,
            "spec": tiny_spec("sdxl", lora={"targets": ["to_q", "to_k", "to_v", "to_out.0", "conv_out"]})}})
    finally:
        files.close()
    body = r.json()
    assert body["status"] == "succeeded", body.get("error")
    _lora_changes_image(decode_output(body["output"]), "sdxl", cog_weights, tmp_path)


@pytest.mark.parametrize("model,family", [("flux-dev", "flux"), ("sdxl", "sdxl")])
def test_training_returns_weights(train_server, sample_zip, cog_weights, tmp_path, model, family):
    spec = tiny_spec(model, **({"lora": {"targets": ["to_q", "to_k", "to_v", "conv_out"]}} if family == "sdxl" else {}))
    r = train_server.post("/trainings", {"input": {"dataset": data_uri(sample_zip), "spec": spec, "model": model,
                                                   "steps": 6}})
    body = r.json()
    assert body["status"] == "succeeded", body.get("error")
    assert set(body["output"]) == {"weights"}
    _lora_changes_image(decode_output(body["output"]["weights"]), family, cog_weights, tmp_path)


def test_bad_spec_fails_naming_every_field(predict_server, sample_zip):
    r = predict_server.post("/predictions", {"input": {
        "dataset": data_uri(sample_zip), "spec": json.dumps({"lora": {"rank": 0}, "optimizer": "sgd"})}})
    body = r.json()
    assert body["status"] == "failed"
    assert "lora.rank" in body["error"] and "optimizer" in body["error"]


# -- schema and validation -------------------------------------------------------------------------

def test_schema_is_current_and_served(predict_server):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/cog_schema.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    served = predict_server.client.get("/openapi.json").json()
    assert served == json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert served["components"]["schemas"]["TrainingInput"]["properties"]["hf_token"]["x-cog-secret"] is True


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 0, "minimum"),
    ("lora_rank", 5000, "maximum"),
    ("model", "sd15", "is not one of"),
    ("mode", "half", "is not one of"),
    ("resolutions", "512;768", "pattern"),
])
def test_bad_inputs_get_422_naming_the_field(predict_server, sample_zip, field, value, needle):
    r = predict_server.post("/predictions", {"input": {"dataset": "data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==",
                                                       field: value}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field for d in detail), detail
    assert needle in json.dumps(detail) or field in json.dumps(detail)


def test_training_inputs_are_validated_too(train_server):
    r = train_server.post("/trainings", {"input": {"dataset": "data:,x", "steps": -5}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "steps"


# -- webhooks and secrets --------------------------------------------------------------------------

def test_webhooks_carry_progress_and_secrets_never_leak(predict_server, sample_zip, tmp_path):
    hooks = Receiver()
    try:
        r = predict_server.post("/predictions", {
            "input": {"dataset": data_uri(sample_zip), "spec": tiny_spec(), "steps": 6, "hf_token": SECRET,
                      "s3_access_key_id": "AKIA" + S3_SECRET[:8], "s3_secret_access_key": S3_SECRET},
            "webhook": hooks.url, "webhook_events_filter": ["start", "logs", "output", "completed"]},
            headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        final = hooks.wait_terminal()
    finally:
        hooks.close()
    assert final["status"] == "succeeded", final.get("error")
    statuses = [p["status"] for p in hooks.payloads]
    assert "processing" in statuses  # start / logs events before completion
    progress_hooks = [p for p in hooks.payloads if p["status"] == "processing" and '"phase": "train"' in (p.get("logs") or "")]
    assert progress_hooks, "no webhook carried a progress line"
    assert 'PROGRESS {"phase": "done"' in final["logs"]

    # the secret appears nowhere: webhook payloads, logs, the output archive (config.json included)
    everything = json.dumps(hooks.payloads)
    archive = decode_output(final["output"])
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        for name in zf.namelist():
            everything += zf.read(name).decode("latin-1")
    everything += predict_server.log_path.read_text(errors="replace")
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
    gen = cog_server_fixture("predict", tmp_path_factory, cog_weights, jobs, ADVANCED_TRAINER_NUM_PROCESSES="2")
    server = next(gen)
    hooks = Receiver()
    try:
        r = server.post("/predictions", {"id": "pred_cancel_me", "input": {
            "dataset": data_uri(sample_zip), "spec": tiny_spec(), "steps": 100000},
            "webhook": hooks.url}, headers={"Prefer": "respond-async"})
        assert r.status_code == 202
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until both workers train
            logs = "".join(p.get("logs") or "" for p in hooks.payloads)
            if '"phase": "train"' in logs and "process 1 of 2" in logs:
                break
            time.sleep(0.2)
        else:
            pytest.fail("training did not start")
        assert len(_processes_mentioning(str(jobs))) >= 3  # launcher + 2 workers
        started = time.monotonic()
        assert server.client.post("/predictions/pred_cancel_me/cancel").status_code == 200
        final = hooks.wait_terminal(timeout=30)
        elapsed = time.monotonic() - started
        assert final["status"] == "canceled"
        assert elapsed < 10, f"cancel took {elapsed:.1f}s"
        deadline = time.monotonic() + 10
        while _processes_mentioning(str(jobs)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(str(jobs)) == [], "trainer processes outlived the cancel"
    finally:
        hooks.close()
        gen.close()


# -- setup -------------------------------------------------------------------------------------------

def test_missing_base_weights_fail_setup_saying_what_to_provide(tmp_path_factory, tmp_path, cog_weights):
    import shutil

    weights = tmp_path / "weights"
    shutil.copytree(cog_weights, weights)
    shutil.rmtree(weights / "tiny-sdxl")  # listed in the manifest, gone from the disk
    server = CogServer("predict", tmp_path, {"ADVANCED_TRAINER_WEIGHTS": str(weights), "HF_HUB_OFFLINE": "1"})
    try:
        health = server.wait(statuses=("SETUP_FAILED",), timeout=60)
    finally:
        server.stop()
    logs = json.dumps(health.get("setup", {})) + server.log_path.read_text(errors="replace")
    assert "tiny-sdxl" in logs
    assert "COG_WEIGHTS" in logs  # one of the ways to provide them


# -- publishing ------------------------------------------------------------------------------------

def test_s3_publishing_puts_the_outputs_under_the_prefix(predict_server, sample_zip, s3):
    inputs = {"dataset": data_uri(sample_zip), "spec": tiny_spec(), "steps": 4, "s3_bucket": s3.bucket,
              "s3_prefix": "runs/job-7", "s3_endpoint_url": s3.endpoint_url, "s3_region": s3.region,
              "s3_access_key_id": s3.access_key_id, "s3_secret_access_key": s3.secret_access_key}
    body = predict_server.post("/predictions", {"input": inputs}).json()
    assert body["status"] == "succeeded", body.get("error")
    with zipfile.ZipFile(io.BytesIO(decode_output(body["output"]))) as zf:
        archived = {n: zf.read(n) for n in zf.namelist()}
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="runs/job-7/")["Contents"]
    keys = {o["Key"].removeprefix("runs/job-7/") for o in listed}
    assert keys == set(archived)
    got = s3.client().get_object(Bucket=s3.bucket, Key="runs/job-7/pytorch_lora_weights.safetensors")["Body"].read()
    assert got == archived["pytorch_lora_weights.safetensors"]
    assert "publish:" in body["logs"] and s3.secret_access_key not in body["logs"]

    bad = {**inputs, "s3_prefix": "runs/job-8", "s3_secret_access_key": "wrong-secret-value-123"}
    body = predict_server.post("/predictions", {"input": bad}).json()
    assert body["status"] == "failed"
    assert "credentials" in body["error"] and "wrong-secret-value-123" not in body["error"]
