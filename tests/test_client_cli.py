"""The advanced-trainer command line: token handling, settings, estimates, exit codes, and the
whole flow against the real Cog server (provider cog) ending in a LoRA that changes the image."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from client.cli import EXIT_OK, EXIT_USER, build_parser, main

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
    for cmd in ("validate", "versions", "hardware", "billing", "estimate", "pack", "submit", "status", "logs",
                "cancel", "download", "jobs", "token", "serve"):
        assert cmd in text
    sub = {a.dest for a in build_parser()._actions}
    assert "command" in sub


def test_token_set_checks_the_shape_and_never_prints_the_value(capsys, monkeypatch, client_home):
    for bad, why in ((GOOD + " \n", "spaces"), ("r8_short", "not a complete"), ("sk_" + "x" * 40, "does not start with r8_")):
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
    code, out, _ = run(capsys, "--json", "estimate", "--spec", json.dumps({"model": "flux-dev", "steps": 1000}))
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
    code, _, _ = run(capsys, "config", "set", "spend_limit", json.dumps({"amount_usd": 5, "period": "daily",
                                                                       "action": "block"}))
    assert code == EXIT_OK
    code, _, _ = run(capsys, "config", "set", "webhook_allowed_ips", '["127.0.0.1/32", "10.0.0.0/8"]')
    assert code == EXIT_OK
    code, _, err = run(capsys, "config", "set", "webhook_allowed_ips", '["not-an-ip"]')
    assert code == EXIT_USER and "not-an-ip" in err
    code, _, err = run(capsys, "config", "set", "colour", "blue")
    assert code == EXIT_USER and "unknown setting" in err
    settings = json.loads((client_home / "settings.json").read_text())
    assert settings["spend_limit"]["amount_usd"] == 5 and settings["webhook_allowed_ips"] == ["127.0.0.1/32", "10.0.0.0/8"]
    code, out, _ = run(capsys, "billing")
    assert "$5.00 per daily (block)" in out


def test_spend_limit_blocks_before_any_upload(capsys, sample_dataset, client_home):
    run(capsys, "config", "set", "spend_limit", json.dumps({"amount_usd": 0.01, "period": "daily", "action": "block"}))
    code, out, err = run(capsys, "submit", "--provider", "cog", "--cog-url", "http://127.0.0.1:9",
                         "--spec", json.dumps({"steps": 5000}), "--dataset", str(sample_dataset))
    assert code == EXIT_USER and "spend limit exceeded" in err


def test_submit_with_the_cog_provider_end_to_end(capsys, predict_server, sample_dataset, cog_weights, client_home):
    """pack -> submit to the real Cog server -> follow its webhooks -> download -> the LoRA works."""
    spec = json.dumps({"base_weights": "tiny-flux-dev", "resolutions": "64", "steps": 8, "learning_rate": 0.01,
                       "caption_dropout": 0, "validation": {"num_inference_steps": 2}})
    code, out, err = run(capsys, "--json", "submit", "--provider", "cog", "--cog-url", predict_server.url,
                         "--spec", spec, "--dataset", str(sample_dataset), "--hardware", "cpu", "--wait")
    assert code == EXIT_OK, err[-3000:]
    result = json.loads(out)
    job, outputs = result["job"], result["outputs"]
    assert job["status"] == "succeeded" and job["step"] == 8 and job["total"] == 8
    assert outputs["folder"] == str(client_home / "cloud_outputs" / job["id"])
    assert os.path.isfile(outputs["lora"]) and os.path.isfile(outputs["loss_plot"]) and outputs["samples"]

    from diffusers import FluxPipeline

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return np.asarray(pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                               max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0])

    base = render(FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev"))
    pipe = FluxPipeline.from_pretrained(cog_weights / "tiny-flux-dev")
    pipe.load_lora_weights(outputs["folder"])
    assert np.abs(render(pipe) - base).max() > 0.01

    code, out, _ = run(capsys, "jobs")
    assert job["id"] in out and "succeeded" in out
    code, out, _ = run(capsys, "--json", "status", job["id"], "--offline")
    assert json.loads(out)["local_dir"] == outputs["folder"]
