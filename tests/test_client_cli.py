"""The advanced-trainer command line: token handling, settings, estimates, exit codes, and the
whole flow against the real Cog server (provider cog) ending in a LoRA that changes the image."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from client.cli import EXIT_OK, EXIT_REMOTE, EXIT_USER, build_parser, main

GOOD = "r8_" + "A1b2C3d4" * 5


@pytest.fixture(autouse=True)
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(home))
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    return home


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        import io
        import sys

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in (
        "validate",
        "versions",
        "hardware",
        "billing",
        "estimate",
        "pack",
        "submit",
        "status",
        "logs",
        "cancel",
        "download",
        "jobs",
        "token",
        "serve",
    ):
        assert cmd in text
    sub = {a.dest for a in build_parser()._actions}
    assert "command" in sub


def test_token_set_checks_the_shape_and_never_prints_the_value(capsys, monkeypatch, client_home):
    for bad, why in (
        (GOOD + " \n", "spaces"),
        ("r8_short", "not a complete"),
        ("sk_" + "x" * 40, "does not start with r8_"),
    ):
        code, out, err = run(capsys, "token", "set", "--stdin", stdin=bad + "\n", monkeypatch=monkeypatch)
        assert code == EXIT_USER and why in err
        assert bad.strip() not in out + err
    code, out, err = run(capsys, "token", "set", "--stdin", stdin=GOOD + "\n", monkeypatch=monkeypatch)
    assert code == EXIT_OK and GOOD not in out + err
    secrets = client_home / "secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert json.loads(secrets.read_text())["replicate_api_token"] == GOOD

    # the environment wins, and saving another token while it is set says a restart is needed
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_" + "Z" * 40)
    code, out, err = run(capsys, "token", "set", "--stdin", stdin=GOOD + "\n", monkeypatch=monkeypatch)
    assert code == EXIT_USER and "REPLICATE_API_TOKEN" in err and "restart" in err
    monkeypatch.delenv("REPLICATE_API_TOKEN")
    code, out, err = run(capsys, "token", "delete")
    assert code == EXIT_OK and "deleted" in out
    code, out, err = run(capsys, "validate")
    assert code == EXIT_USER and "no Replicate API token" in err


def test_malformed_environment_token_is_reported_without_its_value(capsys, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", GOOD + "\n")
    code, out, err = run(capsys, "validate")
    assert code == EXIT_USER and "newline" in err and GOOD not in err


def test_estimate_and_billing(capsys):
    code, out, _ = run(
        capsys, "--json", "estimate", "--spec", json.dumps({"model": "flux-dev", "steps": 1000})
    )
    rows = json.loads(out)
    assert code == EXIT_OK and [r["hardware"] for r in rows] == ["gpu-l40s", "gpu-a100-large", "gpu-h100"]
    l40s = rows[0]
    assert 20 * 60 < l40s["seconds"] < 90 * 60 and 1.0 < l40s["usd"] < 6.0  # the "30-60 min, $2-4" ballpark
    code, out, err = run(capsys, "estimate", "--spec", "{}", "--hardware", "gpu-nonexistent")
    assert code == EXIT_USER and "unknown hardware" in err
    code, out, err = run(capsys, "estimate", "--spec", json.dumps({"steps": 0}))
    assert code == EXIT_USER and "steps" in err
    code, out, _ = run(capsys, "billing")
    assert code == EXIT_OK and "balance: unavailable" in out and "spent (local ledger)" in out


def test_config_validates_every_key(capsys, client_home):
    code, _, _ = run(
        capsys,
        "config",
        "set",
        "spend_limit",
        json.dumps({"amount_usd": 5, "period": "daily", "action": "block"}),
    )
    assert code == EXIT_OK
    code, _, _ = run(capsys, "config", "set", "webhook_allowed_ips", '["127.0.0.1/32", "10.0.0.0/8"]')
    assert code == EXIT_OK
    code, _, err = run(capsys, "config", "set", "webhook_allowed_ips", '["not-an-ip"]')
    assert code == EXIT_USER and "not-an-ip" in err
    code, _, err = run(capsys, "config", "set", "colour", "blue")
    assert code == EXIT_USER and "unknown setting" in err
    settings = json.loads((client_home / "settings.json").read_text())
    assert settings["spend_limit"]["amount_usd"] == 5 and settings["webhook_allowed_ips"] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
    ]
    code, out, _ = run(capsys, "billing")
    assert "$5.00 per daily (block)" in out


def test_spend_limit_blocks_before_any_upload(capsys, sample_dataset, client_home):
    run(
        capsys,
        "config",
        "set",
        "spend_limit",
        json.dumps({"amount_usd": 0.01, "period": "daily", "action": "block"}),
    )
    code, out, err = run(
        capsys,
        "submit",
        "--provider",
        "cog",
        "--cog-url",
        "http://127.0.0.1:9",
        "--spec",
        json.dumps({"steps": 5000}),
        "--dataset",
        str(sample_dataset),
    )
    assert code == EXIT_USER and "spend limit exceeded" in err


def test_submit_with_the_cog_provider_end_to_end(
    capsys, train_server, run_servers, sample_dataset, cog_weights, client_home
):
    """pack -> a training on the real Cog server -> follow its webhooks -> download -> the LoRA works;
    then `run` renders with it on a run-mode Cog server (the weights sent as lora_weights)."""
    spec = json.dumps(
        {
            "base_weights": "tiny-flux-dev",
            "resolutions": "64",
            "steps": 8,
            "learning_rate": 0.01,
            "caption_dropout": 0,
            "trigger_word": "sks",
            "validation": {"num_inference_steps": 2},
        }
    )
    code, out, err = run(
        capsys,
        "--json",
        "submit",
        "--provider",
        "cog",
        "--cog-url",
        train_server.url,
        "--spec",
        spec,
        "--dataset",
        str(sample_dataset),
        "--hardware",
        "cpu",
        "--wait",
    )
    assert code == EXIT_OK, err[-3000:]
    result = json.loads(out)
    job, outputs = result["job"], result["outputs"]
    assert (
        job["status"] == "succeeded" and job["kind"] == "training" and job["step"] == 8 and job["total"] == 8
    )
    assert outputs["folder"] == str(client_home / "cloud_outputs" / job["id"])
    assert os.path.isfile(outputs["lora"]) and os.path.isfile(outputs["loss_plot"]) and outputs["samples"]

    from diffusers import FluxPipeline

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(
            pipe(
                "a red circle",
                num_inference_steps=2,
                height=64,
                width=64,
                output_type="np",
                max_sequence_length=32,
                generator=torch.Generator().manual_seed(0),
            ).images[0]
        )

    base = render(FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev"))
    pipe = FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev")
    pipe.load_lora_weights(outputs["folder"])
    assert np.abs(render(pipe) - base).max() > 0.01

    code, out, _ = run(capsys, "jobs")
    assert job["id"] in out and "succeeded" in out
    code, out, _ = run(capsys, "--json", "status", job["id"], "--offline")
    assert json.loads(out)["local_dir"] == outputs["folder"]

    # try it: the job's weights on a run-mode server
    server = run_servers.get(None)
    args = (
        "--prompt",
        "sks, a red circle",
        "--seed",
        "1",
        "--steps",
        "2",
        "--output-format",
        "png",
        "-i",
        "aspect_ratio=custom",
        "-i",
        "width=64",
        "-i",
        "height=64",
    )
    code, out, err = run(
        capsys, "--json", "run", job["id"], "--provider", "cog", "--cog-url", server.url, *args
    )
    assert code == EXIT_OK, err[-2000:]
    tried = json.loads(out)
    assert tried["status"] == "succeeded" and len(tried["images"]) == 1
    assert tried["folder"].startswith(str(client_home / "cloud_outputs" / job["id"] / "tries"))
    from PIL import Image

    with_lora = np.asarray(Image.open(tried["images"][0])).astype(int)
    code, out, err = run(
        capsys,
        "--json",
        "run",
        job["id"],
        "--provider",
        "cog",
        "--cog-url",
        server.url,
        *args,
        "--lora-scale",
        "0",
    )
    assert code == EXIT_OK, err[-2000:]
    without = np.asarray(Image.open(json.loads(out)["images"][0])).astype(int)
    assert np.abs(with_lora - without).max() > 10, "the job's weights do not change the image"
    code, _, err = run(capsys, "run", job["id"], "--prompt", "x")  # no run-mode server given
    assert code == EXIT_USER and "--cog-url" in err


# -- against the Replicate fake (the real `replicate` client underneath) ----------------------------------

FAKE_TOKEN = "r8_" + "CliT0ken" * 5


@pytest.fixture()
def fake(monkeypatch):
    from fake_replicate import FakeReplicate, SyntheticRun

    with FakeReplicate(
        token=FAKE_TOKEN,
        webhook_throttle_s=0.05,
        synthetic=SyntheticRun(duration_s=0.5, steps=5, predict_time=60.0),
    ) as f:
        monkeypatch.setenv("REPLICATE_API_TOKEN", FAKE_TOKEN)
        monkeypatch.setenv("REPLICATE_BASE_URL", f.url)
        monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        monkeypatch.setenv(
            "ADVANCED_TRAINER_STATUS_URL", "http://127.0.0.1:9/status.json"
        )  # no internet in tests
        yield f


def test_validate_versions_hardware_against_the_api(capsys, fake):
    code, out, err = run(capsys, "validate")
    assert code == EXIT_OK and "acme" in out and "environment" in out and FAKE_TOKEN not in out + err
    code, out, _ = run(capsys, "--json", "versions")
    assert json.loads(out)["versions"][0]["id"] == fake.trainer_version
    code, out, _ = run(capsys, "--json", "hardware")
    rows = {r["sku"]: r for r in json.loads(out)}
    assert rows["gpu-l40s"]["listed_by_api"] and rows["gpu-l40s"]["usd_per_hour"] == pytest.approx(3.51)


def test_a_rejected_token_says_so(capsys, monkeypatch):
    from fake_replicate import FakeReplicate

    with FakeReplicate(token=FAKE_TOKEN) as f:
        monkeypatch.setenv("REPLICATE_BASE_URL", f.url)
        monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_" + "Wrong0ne" * 5)
        code, out, err = run(capsys, "validate")
    assert code == EXIT_USER and "401" in err and "token was refused" in err


def test_submit_status_logs_cancel_and_resumed_download(capsys, fake, sample_dataset, client_home):
    from fake_replicate import SyntheticRun

    # a job followed to the end by polling (no public URL), its download interrupted once and resumed
    fake.truncate("/_fake/outputs/*", after_bytes=100)
    code, out, err = run(
        capsys,
        "--json",
        "submit",
        "--spec",
        json.dumps({"steps": 20}),
        "--dataset",
        str(sample_dataset),
        "--wait",
    )
    assert code == EXIT_OK, err
    result = json.loads(out)
    assert result["job"]["status"] == "succeeded" and result["job"]["cost_usd"] == pytest.approx(
        60 * 3.51 / 3600, rel=1e-3
    )
    archive = client_home / "cloud_outputs" / result["job"]["id"] / "output.zip"
    import zipfile

    with zipfile.ZipFile(archive) as zf:
        assert zf.testzip() is None
    downloads = [q for q in fake.requests if q.path.startswith("/_fake/outputs/")]
    assert len(downloads) >= 2  # interrupted, then resumed

    code, out, _ = run(capsys, "logs", result["job"]["id"])
    assert "PROGRESS" in out
    # a long job: submitted without waiting, then canceled
    fake.synthetic = SyntheticRun(duration_s=30, steps=30)
    code, out, _ = run(capsys, "submit", "--spec", "{}", "--dataset", str(sample_dataset))
    job_id = out.strip().splitlines()[-1]
    code, out, _ = run(capsys, "--json", "status", job_id)
    assert json.loads(out)["status"] in ("starting", "processing")
    code, out, _ = run(capsys, "cancel", job_id)
    assert code == EXIT_OK and "canceled" in out
    code, out, err = run(capsys, "download", job_id)
    assert code == EXIT_USER and "canceled" in err


def test_a_download_that_keeps_failing_exits_3_saying_to_download_again(
    capsys, fake, sample_dataset, client_home
):
    """The job succeeded and was paid for; only the transfer failed: exit 3 (try again), the job's
    own ``download`` command in the message, no traceback; then ``download`` fetches it."""
    fake.fail("/_fake/outputs/*", 503, times=None, retry_after="0")
    code, out, err = run(
        capsys, "submit", "--spec", json.dumps({"steps": 20}), "--dataset", str(sample_dataset), "--wait"
    )
    job_id = next(line.split()[2] for line in err.splitlines() if line.startswith("submitted training"))
    assert code == EXIT_REMOTE, (code, err)
    assert f"job {job_id} succeeded; its outputs were not delivered" in err
    assert f"run `advanced-trainer download {job_id}` again" in err and "Traceback" not in err
    fake.clear_faults()
    code, out, err = run(capsys, "download", job_id)
    assert code == EXIT_OK, err
    assert (client_home / "cloud_outputs" / job_id / "pytorch_lora_weights.safetensors").is_file()


def test_a_publish_that_failed_in_the_job_is_shown_and_done_from_here(
    capsys, fake, sample_dataset, client_home, s3, monkeypatch
):
    """The job succeeded with its weights, but its publishing failed: status and jobs say so, and
    ``publish`` sends the delivered outputs (those in output.zip) to the bucket from this machine."""
    from fake_replicate import SyntheticRun

    why = "S3 upload to s3://team-bucket failed: InvalidAccessKeyId — check s3_access_key_id"
    fake.synthetic = SyntheticRun(duration_s=0.3, steps=3, extra_lines=(f"publish failed: {why}",))
    code, out, err = run(
        capsys, "--json", "submit", "--spec", "{}", "--dataset", str(sample_dataset), "--wait"
    )
    assert code == EXIT_OK, err
    job_id = json.loads(out)["job"]["id"]
    code, out, _ = run(capsys, "status", job_id, "--offline")
    assert f"publish failed: {why}" in out and f"advanced-trainer publish {job_id}" in out
    code, out, _ = run(capsys, "--json", "status", job_id, "--offline")
    assert json.loads(out)["publish_failed"] == why
    code, out, _ = run(capsys, "jobs")
    assert "publish failed" in next(line for line in out.splitlines() if line.startswith(job_id))

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    code, out, err = run(
        capsys, "publish", job_id, "--s3", f"s3://{s3.bucket}/from-laptop", "--s3-endpoint-url", s3.endpoint_url,
        "--s3-region", s3.region,
    )  # fmt: skip
    assert code == EXIT_OK, err
    folder = client_home / "cloud_outputs" / job_id
    import zipfile

    with zipfile.ZipFile(folder / "output.zip") as zf:
        packed = {n for n in zf.namelist() if not n.endswith("/")}
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="from-laptop/")["Contents"]
    assert {o["Key"].removeprefix("from-laptop/") for o in listed} == packed  # not output.zip itself
    assert "s3" in json.loads((folder / "config.json").read_text())["publish"]["from_client"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    code, _, err = run(
        capsys, "publish", job_id, "--s3", f"s3://{s3.bucket}/again", "--s3-endpoint-url", s3.endpoint_url,
        "--s3-region", s3.region,
    )  # fmt: skip
    assert code == EXIT_USER and "credentials" in err and "wrong-secret" not in err


def test_submit_trains_into_a_destination_and_run_renders_its_new_version(
    capsys, train_server, run_servers, sample_dataset, client_home, monkeypatch
):
    """Replicate's flow with the real Cog servers behind the fake: the training into a destination
    (derived from the account and the trigger word, created private) makes a new version; `run`
    renders with it (COG_WEIGHTS = the training's weights) and downloads the images."""
    from fake_replicate import FakeReplicate

    with FakeReplicate(None, train_server.url, cog_run_for=run_servers.url_for, token=FAKE_TOKEN) as fake:
        monkeypatch.setenv("REPLICATE_API_TOKEN", FAKE_TOKEN)
        monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)
        monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        from conftest import tiny_spec

        spec = json.dumps({**json.loads(tiny_spec()), "steps": 4, "trigger_word": "sks"})
        code, out, err = run(
            capsys, "--json", "submit", "--spec", spec, "--dataset", str(sample_dataset), "--wait"
        )
        assert code == EXIT_OK, err[-3000:]
        job = json.loads(out)["job"]
        assert (
            job["kind"] == "training"
            and job["destination"] == "acme/sks-flux-dev"
            and job["status"] == "succeeded"
        )
        assert "training into acme/sks-flux-dev (created it, private)" in err
        model = fake.client().models.get("acme/sks-flux-dev")
        assert model.visibility == "private" and model.latest_version is not None
        assert fake.job(job["id"])["output"]["version"] == f"acme/sks-flux-dev:{model.latest_version.id}"

        args = (
            "--prompt",
            "sks, a red circle",
            "--seed",
            "2",
            "--steps",
            "2",
            "--output-format",
            "png",
            "-i",
            "aspect_ratio=custom",
            "-i",
            "width=64",
            "-i",
            "height=64",
        )
        code, out, err = run(capsys, "--json", "run", job["id"], *args)
        assert code == EXIT_OK, err[-2000:]
        tried = json.loads(out)
        assert len(tried["images"]) == 1 and tried["images"][0].endswith(".png")
        assert Path(tried["images"][0]).read_bytes().startswith(b"\x89PNG")
        assert tried["folder"].startswith(str(client_home / "cloud_outputs" / job["id"] / "tries"))
        code, out, err = run(capsys, "--json", "run", "acme/sks-flux-dev", *args)  # the model by name
        assert code == EXIT_OK, err[-2000:]
        assert Path(json.loads(out)["images"][0]).read_bytes() == Path(tried["images"][0]).read_bytes()
        code, out, err = run(capsys, "--json", "run", "simpletuner/advanced-trainer", *args)  # the plain base
        assert code == EXIT_OK, err[-2000:]
        assert Path(json.loads(out)["images"][0]).read_bytes() != Path(tried["images"][0]).read_bytes()
        code, _, err = run(capsys, "run", "acme/sks-flux-dev", "--prompt", "x", "-i", "num_outputs=9")
        assert code == EXIT_USER and "num_outputs" in err


def test_failed_job_exits_1_with_the_reason(capsys, fake, sample_dataset):
    from fake_replicate import SyntheticRun

    fake.synthetic = SyntheticRun(duration_s=0.2, steps=2, status="failed", error="CUDA out of memory")
    code, out, err = run(capsys, "submit", "--spec", "{}", "--dataset", str(sample_dataset), "--wait")
    assert code == 1 and "CUDA out of memory" in out


def test_pack_refuses_over_the_limit_before_any_upload(capsys, fake, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (1200, 1200, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    import client.jobs

    monkeypatch.setattr(client.jobs, "UPLOAD_LIMIT", 1_000_000)  # 3 x 4 MB of noise; ~3 x 190 KB at 512 px
    code, out, err = run(
        capsys, "submit", "--spec", json.dumps({"resolutions": "512"}), "--dataset", str(folder)
    )
    assert code == EXIT_USER and "limit" in err and "--fit" in err
    assert not [q for q in fake.requests if q.path.startswith("/v1/files")]
    code, out, err = run(
        capsys, "submit", "--spec", json.dumps({"resolutions": "512"}), "--dataset", str(folder), "--fit"
    )
    assert code == EXIT_OK, err


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    """A loopback stand-in of the Hugging Face Hub (tests/hfserver.py) the client's checks reach."""
    import huggingface_hub.constants

    from hfserver import HubServer

    with HubServer() as server:
        server.add_token("hf_SECRETvalue1234567890abcd", user="alice", role="write", orgs=["acme"])
        server.add_token("hf_READonly1234567890abcdef", user="bob", role="read")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))
        yield server


def test_publish_credentials_go_to_the_api_but_not_the_store(
    capsys, fake, sample_dataset, client_home, monkeypatch, hub, s3
):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETvalue1234567890abcd")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    spec = {
        "publish": {
            "hub_model_id": "acme/my-lora",
            "s3_bucket": s3.bucket,
            "s3_endpoint_url": s3.endpoint_url,
            "s3_region": s3.region,
        }
    }
    code, out, err = run(
        capsys, "--json", "submit", "--spec", json.dumps(spec), "--dataset", str(sample_dataset)
    )
    assert code == EXIT_OK, err
    assert "publish: hub: alice may create acme/my-lora" in err and f"s3: may write s3://{s3.bucket}" in err
    job_id = json.loads(out)["job"]["id"]
    sent = fake.job(job_id)["input"]
    assert (
        sent["hf_token"] == "hf_SECRETvalue1234567890abcd"
        and sent["s3_secret_access_key"] == s3.secret_access_key
    )
    db = (client_home / "jobs.sqlite3").read_bytes()
    for secret in ("hf_SECRETvalue1234567890abcd", s3.secret_access_key, FAKE_TOKEN):
        assert secret.encode() not in db
    assert "hf_SECRET" not in out + err


@pytest.mark.parametrize(
    "token,repo,says",
    [
        ("hf_READonly1234567890abcdef", "bob/my-lora", "read-only"),
        ("hf_SECRETvalue1234567890abcd", "someone-else/my-lora", "hub_model_id"),
        ("hf_unknown1234567890abcdefgh", "alice/my-lora", "hf_token"),
    ],
)
def test_a_token_that_cannot_publish_is_refused_before_anything_is_uploaded(
    capsys, fake, sample_dataset, monkeypatch, hub, token, repo, says
):
    monkeypatch.setenv("HF_TOKEN", token)
    spec = {"publish": {"hub_model_id": repo}}
    code, _, err = run(capsys, "submit", "--spec", json.dumps(spec), "--dataset", str(sample_dataset))
    assert code == EXIT_USER and says in err and "nothing was uploaded" in err and token not in err
    assert not [q for q in fake.requests if q.path.startswith(("/v1/files", "/v1/trainings"))]


def test_a_full_fine_tune_without_a_publish_target_is_refused_before_anything_is_uploaded(
    capsys, fake, sample_dataset
):
    spec = {"model": "sdxl", "mode": "full"}
    code, _, err = run(capsys, "submit", "--spec", json.dumps(spec), "--dataset", str(sample_dataset))
    assert (
        code == EXIT_USER and "full fine-tune needs a publish target" in err and "nothing was uploaded" in err
    )
    assert not [q for q in fake.requests if q.path.startswith(("/v1/files", "/v1/trainings"))]


def test_status_page_is_shown_and_unreachable_means_unknown(capsys, fake, monkeypatch):
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with socket.socket() as s:  # a closed port: unreachable
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("ADVANCED_TRAINER_STATUS_URL", f"http://127.0.0.1:{closed}/api/v2/status.json")
    code, out, _ = run(capsys, "validate")
    assert code == EXIT_OK and "Replicate status: unknown" in out

    class Status(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(
                {"status": {"indicator": "minor", "description": "Degraded predictions"}}
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ADVANCED_TRAINER_STATUS_URL", f"http://127.0.0.1:{srv.server_address[1]}/s.json")
        code, out, _ = run(capsys, "validate")
        assert "Replicate status: minor (Degraded predictions)" in out
    finally:
        srv.shutdown()


def test_readme_documents_every_command_and_route():
    from client.server import State, create_app
    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    commands = [a for a in build_parser()._subparsers._group_actions[0].choices]
    assert all(f"`{c}" in readme for c in commands), [c for c in commands if f"`{c}" not in readme]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(State(root=Path(tmp)))
    # the OpenAPI document lists every API route (app.routes nests the routers' own lists)
    routes = {p for p in app.openapi()["paths"] if p.startswith("/api/")} - {"/api/webhooks/cog/{key}"}
    missing = [
        r
        for r in routes
        if r.replace("{job_id}", "{id}").replace("{name}", "{path}") not in readme and r not in readme
    ]
    assert not missing, missing


def test_reconcile_settles_submissions_interrupted_before_the_answer(
    capsys, fake, sample_dataset, monkeypatch
):
    """A submit killed after the create (its job exists, the store never heard) and one killed before
    anything was sent: both keep counting until `jobs --reconcile` binds the first and releases the second."""
    from client.cli import _store
    from client.store import JobStore
    from fake_replicate import SyntheticRun

    fake.synthetic = SyntheticRun(duration_s=30, steps=30)
    real_bind = JobStore.bind

    def killed(self, *args, **kwargs):
        raise SystemExit("killed")  # the process dies right after the create request returned

    monkeypatch.setattr(JobStore, "bind", killed)
    with pytest.raises(SystemExit):
        main(["submit", "--spec", "{}", "--dataset", str(sample_dataset)])
    monkeypatch.setattr(JobStore, "bind", real_bind)
    capsys.readouterr()
    store = _store()
    store.reserve("never-sent", {"kind": "prediction", "estimate_usd": 1.5})
    stale = store.stale_reservations(0)
    assert len(stale) == 2 and all(r["status"] == "submitting" for r in stale)
    sent = next(r for r in stale if r["request_key"] != "never-sent")
    assert json.loads(sent["input_json"])["dataset"].startswith(fake.url)
    counted = store.spend_between()
    assert counted == pytest.approx(sent["estimate_usd"] + 1.5)

    # a blocked submit says why the limit is reached and what settles it
    monkeypatch.setattr("client.jobs.STALE_AFTER_S", 0)
    run(
        capsys,
        "config",
        "set",
        "spend_limit",
        json.dumps({"amount_usd": 1.0, "period": "weekly", "action": "block"}),
    )
    code, _, err = run(capsys, "submit", "--spec", "{}", "--dataset", str(sample_dataset))
    assert code == EXIT_USER and "2 submission(s) interrupted" in err and "jobs --reconcile" in err
    run(capsys, "config", "set", "spend_limit", "null")

    code, out, err = run(capsys, "--json", "jobs", "--reconcile", "--older-than", "0")
    assert code == EXIT_OK
    assert "never-sent: released (the job was never sent)" in err
    bound_line = next(ln for ln in err.splitlines() if ln.startswith(sent["request_key"]))
    job_id = bound_line.split("is job ")[1].split()[0]
    assert job_id in fake._jobs  # the job the interrupted submit created
    rows = {r["id"]: r for r in json.loads(out)}
    assert rows[job_id]["status"] in ("starting", "processing") and rows["never-sent"]["status"] == "failed"
    assert store.spend_between() == pytest.approx(sent["estimate_usd"])  # only the real job still counts
    assert store.stale_reservations(0) == []
    code, out, _ = run(capsys, "--json", "status", job_id)  # followed like any other job
    assert code == EXIT_OK and json.loads(out)["id"] == job_id


# -- global flags, --set items, one table of error kinds --------------------------------------------------


def test_json_is_accepted_before_and_after_the_command(capsys, fake):
    spec = json.dumps({"steps": 500})
    code, before, _ = run(capsys, "--json", "estimate", "--spec", spec)
    code2, after, _ = run(capsys, "estimate", "--spec", spec, "--json")
    assert code == code2 == EXIT_OK and json.loads(before) == json.loads(after)
    code, out, _ = run(capsys, "validate", "--json")
    assert code == EXIT_OK and json.loads(out)["account"]["username"] == "acme"
    code, out, _ = run(capsys, "jobs", "--json")
    assert code == EXIT_OK and json.loads(out) == []
    code, out, _ = run(capsys, "jobs")  # and without it, words
    assert code == EXIT_OK and out.strip() == "no jobs yet"


def test_a_set_item_without_a_value_names_the_item(capsys):
    code, _, err = run(capsys, "estimate", "--set", "steps=100", "--set", "lora.rank")
    assert code == EXIT_USER and "--set 'lora.rank': expected FIELD=VALUE" in err


def test_billing_refused_upstream_is_a_problem_the_user_fixes(capsys, fake, sample_dataset):
    fake.fail("/v1/models/*/versions/*/trainings", 402, method="POST")
    code, _, err = run(capsys, "submit", "--spec", "{}", "--dataset", str(sample_dataset))
    assert code == EXIT_USER and "402" in err and "billing" in err


@pytest.mark.parametrize(
    "status,exit_code,http",
    [
        (401, 2, 401),
        (402, 2, 402),
        (403, 2, 403),
        (404, 2, 404),
        (413, 2, 413),
        (422, 2, 422),
        (429, 3, 502),
        (500, 3, 502),
        (503, 3, 502),
        (None, 3, 502),
    ],
)
def test_one_table_decides_the_exit_code_and_the_http_status(status, exit_code, http):
    from client import errors

    exc = errors.remote_error("x", status)
    assert errors.exit_code(exc) == exit_code and errors.http_status(exc) == http
    assert errors.is_retryable(status) == (exit_code == 3)


def test_a_store_from_a_newer_client_is_a_clear_error_not_a_traceback(capsys, client_home):
    import sqlite3

    client_home.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(client_home / "jobs.sqlite3") as con:
        con.execute("PRAGMA user_version = 99")
    code, _, err = run(capsys, "jobs")
    assert code == EXIT_USER and "schema version 99" in err and "upgrade advanced-trainer" in err
