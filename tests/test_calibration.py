"""Estimates calibrated from the user's own finished jobs: a store of synthetic jobs with known
per-step times and noise predicts a held-back job within 10 %; without history the table is used
and the estimate says so."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from client import pricing
from client.calibration import Calibration, calibrated_estimate
from client.cli import EXIT_OK, main
from client.config import store_path
from client.store import JobStore
from train.spec import parse_spec

TRUE_STARTUP_S = 260.0
TRUE_STEP_S = {"gpu-h100": 1.3, "gpu-h100-8x": 1.38}  # flux-dev LoRA at 1024 px, batch 1


@pytest.fixture(autouse=True)
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(home))
    return home


def record_job(store: JobStore, spec: dict, hardware: str, predict_time: float, local_dir=None) -> str:
    """A succeeded training as the store keeps one after its last webhook."""
    key, job_id = uuid.uuid4().hex, uuid.uuid4().hex[:26]
    store.reserve(
        key,
        {
            "hardware": hardware,
            "spec_json": parse_spec(spec).to_json(),
            "price_per_s": pricing.price_per_second(hardware),
            "estimate_usd": 1.0,
        },
    )
    store.bind(key, job_id, {"id": job_id, "status": "starting"})
    store.apply_remote(
        job_id, {"id": job_id, "status": "succeeded", "metrics": {"predict_time": predict_time}}, "poll"
    )
    if local_dir is not None:
        store.update(job_id, local_dir=str(local_dir), delivered=True)
    return job_id


def synthetic_history(store: JobStore, hardware: str, steps_list, noise=0.04, seed=0) -> None:
    rng = random.Random(seed)
    for steps in steps_list:
        true = TRUE_STARTUP_S + TRUE_STEP_S[hardware] * steps
        record_job(
            store, {"model": "flux-dev", "steps": steps}, hardware, true * (1 + rng.uniform(-noise, noise))
        )


def test_no_history_uses_the_table_and_says_so(capsys):
    spec = parse_spec({"model": "flux-dev", "steps": 1000})
    est = calibrated_estimate(spec, "gpu-h100", 20, Calibration.from_store(JobStore(store_path())))
    assert est.source == "table" and est.expected_error == pricing.TABLE_ERROR
    code = main(["--json", "estimate", "--spec", spec.to_json(), "--hardware", "gpu-h100"])
    out = json.loads(capsys.readouterr().out)[0]
    assert code == EXIT_OK and out["source"] == "table" and out["expected_error"] == pytest.approx(0.4)


def test_a_held_back_job_is_predicted_within_ten_percent(capsys):
    store = JobStore(store_path())
    synthetic_history(store, "gpu-h100", [300, 500, 800, 1200, 1500, 2000, 2500])
    held_back = parse_spec({"model": "flux-dev", "steps": 1800})
    truth = TRUE_STARTUP_S + TRUE_STEP_S["gpu-h100"] * 1800
    est = calibrated_estimate(held_back, "gpu-h100", 20, Calibration.from_store(store))
    assert est.source == "calibrated from 7 jobs"
    assert est.seconds == pytest.approx(truth, rel=0.10)
    assert est.startup_s == pytest.approx(TRUE_STARTUP_S, rel=0.5)
    assert est.step_s == pytest.approx(TRUE_STEP_S["gpu-h100"], rel=0.05)
    assert 0.04 <= est.expected_error <= 0.10  # about the noise put in
    table = pricing.estimate(held_back, "gpu-h100", 20)
    assert abs(table.seconds - truth) / truth > 0.15  # the table alone would have been off
    # the CLI says which it used
    code = main(["estimate", "--spec", held_back.to_json(), "--hardware", "gpu-h100"])
    out = capsys.readouterr().out
    assert code == EXIT_OK and "calibrated from 7 jobs" in out and "±" in out


def test_each_gpu_count_has_its_own_fit_and_the_spend_check_uses_it():
    store = JobStore(store_path())
    synthetic_history(store, "gpu-h100", [400, 900, 1600, 2400], seed=1)
    synthetic_history(store, "gpu-h100-8x", [500, 1000, 2000], seed=2)
    spec = parse_spec({"model": "flux-dev", "steps": 1500})
    cal = Calibration.from_store(store)
    one = calibrated_estimate(spec, "gpu-h100", 20, cal)
    eight = calibrated_estimate(spec, "gpu-h100-8x", 20, cal)
    assert one.source == "calibrated from 4 jobs" and eight.source == "calibrated from 3 jobs"
    assert eight.seconds == pytest.approx(TRUE_STARTUP_S + TRUE_STEP_S["gpu-h100-8x"] * 1500, rel=0.10)
    assert eight.usd == pytest.approx(eight.seconds * 0.0122)
    # 4 GPUs: no job of its own; the H100 jobs are brought over through the all-reduce term
    four = calibrated_estimate(spec, "gpu-h100-4x", 20, cal)
    assert four.source.startswith("calibrated") and four.expected_error > one.expected_error
    assert one.seconds * 0.95 < four.seconds < eight.seconds * 1.05
    # another card has no history: the table
    assert calibrated_estimate(spec, "gpu-l40s", 20, cal).source == "table"


def test_phase_timings_from_a_delivered_config_json_separate_start_up_exactly(tmp_path):
    store = JobStore(store_path())
    for i, steps in enumerate(
        [1000, 1000, 1000]
    ):  # same steps: predict_time alone cannot tell start-up apart
        folder = tmp_path / f"job{i}"
        folder.mkdir()
        train_s = 1.3 * steps
        config = {
            "timings_s": {"stage": 5, "load": 60, "cache": 40, "train": train_s, "export": 15},
            "steps_done": steps,
        }
        (folder / "config.json").write_text(json.dumps(config))
        record_job(store, {"model": "flux-dev", "steps": steps}, "gpu-h100", 400 + train_s, local_dir=folder)
    est = calibrated_estimate(
        parse_spec({"model": "flux-dev", "steps": 3000}), "gpu-h100", 20, Calibration.from_store(store)
    )
    assert est.startup_s == pytest.approx(400) and est.step_s == pytest.approx(1.3)
    assert est.seconds == pytest.approx(400 + 1.3 * 3000)


def test_other_resolutions_and_batch_sizes_scale_from_the_fit():
    store = JobStore(store_path())
    synthetic_history(store, "gpu-h100", [400, 900, 1600, 2400], noise=0.0)
    cal = Calibration.from_store(store)
    big = calibrated_estimate(
        parse_spec({"model": "flux-dev", "steps": 1000, "batch_size": 2}), "gpu-h100", 20, cal
    )
    assert big.step_s == pytest.approx(2 * TRUE_STEP_S["gpu-h100"], rel=0.02)
    small = calibrated_estimate(
        parse_spec({"model": "flux-dev", "steps": 1000, "resolutions": "512"}), "gpu-h100", 20, cal
    )
    assert small.step_s == pytest.approx(TRUE_STEP_S["gpu-h100"] / 4, rel=0.02)
    assert small.expected_error > big.expected_error  # fitted at another resolution


def test_jobs_recorded_under_a_misspelt_sku_still_count():
    store = JobStore(store_path())
    for steps in (500, 1500):
        key, job_id = uuid.uuid4().hex, uuid.uuid4().hex[:26]
        store.reserve(
            key,
            {
                "hardware": "gpu-l40s-2x",
                "spec_json": parse_spec({"steps": steps}).to_json(),
                "price_per_s": 0.00195,
            },
        )
        store.bind(key, job_id, {"id": job_id, "status": "starting"})
        store.apply_remote(
            job_id,
            {"id": job_id, "status": "succeeded", "metrics": {"predict_time": 200 + 2.5 * steps}},
            "poll",
        )
    est = calibrated_estimate(parse_spec({"steps": 1000}), "gpu-2x-l40s", 20, Calibration.from_store(store))
    assert est.source == "calibrated from 2 jobs" and est.seconds == pytest.approx(200 + 2.5 * 1000, rel=0.01)
