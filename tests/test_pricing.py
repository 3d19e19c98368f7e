"""Hardware as Replicate sells it and estimates that hold for data parallel: the SKUs and prices of
Replicate's pricing page, misspelt SKUs refused with the right one named, 8-GPU jobs priced at
(nearly) the one-GPU step time, and the spend limit that blocks what it should."""

from __future__ import annotations

import json

import pytest

from client import pricing
from client.cli import EXIT_OK, EXIT_USER, main
from client.errors import UserError
from client.estimates import parse_duration
from fake_replicate import HARDWARE as FAKE_HARDWARE
from train.spec import parse_spec

# Replicate's pricing page, USD per second
LIST_PRICES = {
    "cpu": 0.0001,
    "gpu-t4": 0.000225,
    "gpu-a40-small": 0.000575,
    "gpu-a40-large": 0.000725,
    "gpu-l40s": 0.000975,
    "gpu-2x-l40s": 0.00195,
    "gpu-4x-l40s": 0.0039,
    "gpu-8x-l40s": 0.0078,
    "gpu-a100-large": 0.0014,
    "gpu-a100-large-2x": 0.0028,
    "gpu-a100-large-4x": 0.0056,
    "gpu-a100-large-8x": 0.0112,
    "gpu-h100": 0.001525,
    "gpu-h100-2x": 0.00305,
    "gpu-h100-4x": 0.0061,
    "gpu-h100-8x": 0.0122,
}


@pytest.fixture(autouse=True)
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(home))
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    return home


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_every_sku_the_client_accepts_is_one_replicate_sells_at_its_list_price():
    replicate_skus = {h["sku"] for h in FAKE_HARDWARE}
    assert set(pricing.SKUS) <= replicate_skus
    assert {k: s.usd_per_s for k, s in pricing.SKUS.items()} == LIST_PRICES
    assert pricing.SKUS["gpu-8x-l40s"].gpus == 8 and pricing.SKUS["gpu-h100-4x"].gpus == 4
    assert set(pricing.TRAINING_SKUS) == {
        k for k in LIST_PRICES if any(c in k for c in ("l40s", "a100", "h100"))
    }


@pytest.mark.parametrize(
    "wrong, right",
    [
        ("gpu-l40s-2x", "gpu-2x-l40s"),
        ("gpu-l40s-8x", "gpu-8x-l40s"),
        ("gpu-2x-h100", "gpu-h100-2x"),
        ("gpu-h10", "gpu-h100"),
    ],
)
def test_a_misspelt_sku_is_refused_with_the_right_one_suggested(capsys, wrong, right):
    with pytest.raises(pricing.UnknownHardware, match=f"did you mean {right}"):
        pricing.check_sku(wrong)
    code, _, err = cli(capsys, "estimate", "--spec", "{}", "--hardware", wrong)
    assert code == EXIT_USER and f"unknown hardware '{wrong}' (did you mean {right}?)" in err
    assert "gpu-h100-8x" in err  # the valid ones are listed
    code, _, err = cli(capsys, "config", "set", "hardware", wrong)
    assert code == EXIT_USER and f"did you mean {right}" in err
    code, _, err = cli(capsys, "config", "set", "profiles", json.dumps({wrong: "me/trainer"}))
    assert code == EXIT_USER and f"profiles.{wrong}" in err and right in err


def test_an_old_sku_kept_in_settings_says_how_to_fix_it(capsys, client_home, sample_dataset):
    client_home.mkdir(parents=True)
    (client_home / "settings.json").write_text(json.dumps({"hardware": "gpu-l40s-4x"}))
    code, _, err = cli(
        capsys,
        "submit",
        "--provider",
        "cog",
        "--cog-url",
        "http://127.0.0.1:9",
        "--dataset",
        str(sample_dataset),
    )
    assert code == EXIT_USER
    assert "did you mean gpu-4x-l40s" in err and "config set hardware gpu-4x-l40s" in err


def test_the_hardware_table_lists_replicates_names_and_each_profile_model(capsys):
    code, out, _ = cli(capsys, "--json", "hardware", "--offline")
    rows = {r["sku"]: r for r in json.loads(out)}
    assert code == EXIT_OK and set(rows) == set(LIST_PRICES)
    assert rows["gpu-8x-l40s"]["usd_per_hour"] == pytest.approx(0.0078 * 3600)
    assert rows["gpu-l40s"]["trainer_model"] == "simpletuner/advanced-trainer"  # the default hardware
    assert rows["gpu-h100-8x"]["trainer_model"] == "simpletuner/advanced-trainer-h100-8x"


def test_eight_gpus_take_about_the_one_gpu_step_time_for_the_same_steps():
    for body in ({"model": "flux-dev", "steps": 1000}, {"model": "sdxl", "steps": 1000, "batch_size": 2}):
        spec = parse_spec(body)
        for one, eight in (
            ("gpu-h100", "gpu-h100-8x"),
            ("gpu-l40s", "gpu-8x-l40s"),
            ("gpu-a100-large", "gpu-a100-large-8x"),
        ):
            e1, e8 = pricing.estimate(spec, one, 20), pricing.estimate(spec, eight, 20)
            assert e8.steps == 1000 and e8.images_per_step == 8 * e1.images_per_step
            # 1,000 x the one-GPU step time plus start-up, within 15 %
            assert e8.seconds == pytest.approx(e1.startup_s + 1000 * e1.step_s, rel=0.15)
            assert e8.seconds >= e1.seconds  # the all-reduce never makes a step faster
            assert e8.usd == pytest.approx(8 * e1.usd, rel=0.15)  # eight GPUs billed for about as long
            assert e8.source == "table" and "table" in e8.describe()


def test_same_images_in_fewer_steps_is_shown_and_only_applied_when_asked(capsys):
    spec = json.dumps({"model": "flux-dev", "steps": 1000})
    code, out, _ = cli(capsys, "--json", "estimate", "--spec", spec, "--hardware", "gpu-h100-8x")
    row = json.loads(out)[0]
    assert code == EXIT_OK and row["steps"] == 1000 and not row["steps_scaled_to_gpus"]
    alt = row["same_images_fewer_steps"]
    assert alt["steps"] == 125 and alt["flag"] == "--scale-steps-to-gpus" and alt["usd"] < row["usd"] / 3
    code, out, _ = cli(
        capsys, "--json", "estimate", "--spec", spec, "--hardware", "gpu-h100-8x", "--scale-steps-to-gpus"
    )
    scaled = json.loads(out)[0]
    assert (
        scaled["steps"] == 125
        and scaled["steps_scaled_to_gpus"]
        and scaled["usd"] == pytest.approx(alt["usd"])
    )
    code, out, _ = cli(capsys, "estimate", "--spec", spec, "--hardware", "gpu-h100-8x")
    assert "same images in fewer steps (--scale-steps-to-gpus): 125 steps" in out
    code, out, _ = cli(capsys, "--json", "estimate", "--spec", spec, "--hardware", "gpu-h100")
    assert json.loads(out)[0]["same_images_fewer_steps"] is None  # one GPU: nothing to scale


def test_a_weekly_limit_a_one_gpu_job_fits_blocks_the_eight_gpu_job(capsys, sample_dataset):
    body = {"model": "flux-dev", "steps": 1000}
    one = pricing.estimate(parse_spec(body), "gpu-h100", n_images=8)  # the sample set has 8 images
    eight = pricing.estimate(parse_spec(body), "gpu-h100-8x", n_images=8)
    limit = 2 * one.usd  # with the old N^0.9 speed-up the 8-GPU quote (~1.2x) fitted too
    assert one.usd < limit < eight.usd
    code, _, _ = cli(
        capsys,
        "config",
        "set",
        "spend_limit",
        json.dumps({"amount_usd": limit, "period": "weekly", "action": "block"}),
    )
    assert code == EXIT_OK
    args = ("submit", "--provider", "cog", "--cog-url", "http://127.0.0.1:9", "--spec", json.dumps(body))
    code, _, err = cli(capsys, *args, "--dataset", str(sample_dataset), "--hardware", "gpu-h100-8x")
    assert code == EXIT_USER and "spend limit exceeded" in err
    code, _, err = cli(capsys, *args, "--dataset", str(sample_dataset), "--hardware", "gpu-h100")
    assert code == EXIT_OK and "spend limit exceeded" not in err and "submitted training" in err


def test_cheapest_within_a_deadline(capsys):
    spec = json.dumps({"model": "flux-dev", "steps": 1000})
    code, out, _ = cli(capsys, "--json", "estimate", "--spec", spec, "--cheapest", "--deadline", "30m")
    rows = json.loads(out)
    assert code == EXIT_OK and {r["hardware"] for r in rows} == set(pricing.TRAINING_SKUS)
    fits = [r for r in rows if r["within_deadline"]]
    assert fits and all(r["seconds"] <= 1800 for r in fits) and rows[: len(fits)] == fits
    assert rows[0]["usd"] == min(r["usd"] for r in fits) and rows[0]["hardware"] == "gpu-h100"
    # too tight for the steps as given on any machine; the same images on 8 GPUs in fewer steps fit
    code, out, _ = cli(capsys, "estimate", "--spec", spec, "--cheapest", "--deadline", "10m")
    assert "nothing finishes within 10 min" in out and "--scale-steps-to-gpus" in out
    code, out, _ = cli(
        capsys,
        "--json",
        "estimate",
        "--spec",
        spec,
        "--cheapest",
        "--deadline",
        "10m",
        "--scale-steps-to-gpus",
    )
    best = json.loads(out)[0]
    assert best["within_deadline"] and best["steps"] < 1000 and pricing.SKUS[best["hardware"]].gpus > 1
    code, _, err = cli(capsys, "estimate", "--spec", spec, "--cheapest", "--deadline", "soon")
    assert code == EXIT_USER and "--deadline" in err


def test_durations():
    assert parse_duration("d", "30m") == 1800 and parse_duration("d", "1h30m") == 5400
    assert parse_duration("d", "90s") == 90 and parse_duration("d", "45") == 2700
    for bad in ("", "0m", "m", "30 minutes"):
        with pytest.raises(UserError, match="d:"):
            parse_duration("d", bad)


def test_every_model_is_priced_from_the_registry_and_a_missing_card_is_scaled_and_said(monkeypatch):
    from dataclasses import replace

    from train import families
    from train.models.flux import FLUX_DEV
    from train.models.sdxl import SDXL

    for model in families.MODEL_IDS:  # every registered model has figures for the cards it trains on
        spec = parse_spec({"model": model})
        for sku in ("gpu-l40s", "gpu-a100-large", "gpu-h100"):
            est = pricing.estimate(spec, sku)
            step_notes = [n for n in est.notes if "step-time" in n or "scaled from" in n]
            assert est.step_s > 0 and not step_notes, (model, sku, est.notes)
    spec = parse_spec({"model": "sdxl"})
    h100 = pricing.estimate(spec, "gpu-h100").step_s
    no_l40s = {k: v for k, v in SDXL.step_s.items() if k != "l40s"}
    monkeypatch.setitem(families.MODELS, "sdxl", replace(SDXL, step_s=no_l40s))
    scaled = pricing.estimate(spec, "gpu-l40s")
    ratio = FLUX_DEV.step_s["l40s"] / FLUX_DEV.step_s["h100"]
    assert scaled.step_s == pytest.approx(h100 * ratio)
    assert any("scaled from its H100 figure" in n for n in scaled.notes)


def test_an_estimate_says_when_the_card_needs_fp8_or_is_too_small(monkeypatch):
    from dataclasses import replace

    from train import families
    from train.models.flux import FLUX_DEV

    spec = parse_spec({"model": "flux-dev", "resolutions": 1024})
    assert [n for n in pricing.estimate(spec, "gpu-h100").notes if "start-up" not in n] == []  # fits in bf16
    # a model twice Flux.1's size: bf16 does not fit 48 GB, fp8 does -> the note says what to set
    big = replace(FLUX_DEV, denoiser_params_b=20.0)
    monkeypatch.setitem(families.MODELS, "flux-dev", big)
    note = " ".join(pricing.estimate(spec, "gpu-l40s").notes)
    assert "speed.fp8_base: on" in note, note
    fp8 = pricing.estimate(parse_spec({"model": "flux-dev", "speed": {"fp8_base": "on"}}), "gpu-l40s")
    assert [n for n in fp8.notes if "start-up" not in n] == []
    assert "start-up ~3 min is a guess" in " ".join(fp8.notes)  # no jobs to calibrate it from
    monkeypatch.setitem(families.MODELS, "flux-dev", replace(big, denoiser_params_b=60.0))
    assert "does not fit" in " ".join(pricing.estimate(spec, "gpu-l40s").notes)


def test_the_estimate_sizes_the_output_and_the_resumable_checkpoint():
    from client.estimates import output_sizes

    plain = output_sizes(parse_spec({"model": "flux-dev"}))
    assert plain["resumable_checkpoint_mb"] is None
    # rank 16 on Flux.1-dev: 65.4 M parameters -> ~125 MiB in bf16, the diffusers file only
    assert 120 < plain["weights_mb"] < 130 and plain["kept_steps_mb"] == 0, plain
    kept = output_sizes(parse_spec({"model": "flux-dev", "validation": {"interval": 250}, "steps": 1000}))
    assert kept["kept_steps_mb"] == pytest.approx(
        3 * plain["weights_mb"], rel=1e-3
    )  # steps 250, 500, 750 (1000 is the last; the chosen step is stored once, at the top)
    fp32 = output_sizes(parse_spec({"model": "flux-dev", "export": {"dtype": "fp32"}}))
    assert fp32["weights_mb"] == pytest.approx(2 * plain["weights_mb"], rel=1e-3)
    resumable = output_sizes(parse_spec({"model": "flux-dev", "resumable": True}))
    assert resumable["resumable_checkpoint_mb"] == pytest.approx(
        6 * plain["weights_mb"], rel=0.01
    )  # fp32 weights and two moments: 3x an fp32 file
