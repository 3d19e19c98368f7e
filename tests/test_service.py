"""The job runner behind the Cog adapters, outside the Cog server: cancel mid-run and the
return_checkpoint promise."""

from __future__ import annotations

import ctypes
import json
import threading
import time

import pytest

from conftest import SAMPLE_DATASET
from train.service import JobError, JobRequest, build_spec, pack_outputs, run_job


class Canceled(BaseException):
    """Stands in for cog.CancelationException: a BaseException raised into the job's thread."""


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    # what coglet does on POST /cancel
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))


def test_typed_inputs_override_the_spec_and_bad_fields_are_named():
    spec = build_spec(
        JobRequest(
            SAMPLE_DATASET,
            json.dumps({"steps": 10, "lora": {"rank": 4}}),
            {"steps": 20, "lora.rank": None, "validation.prompts": ["a"], "trigger_word": ""},
        )
    )
    assert spec.steps == 20 and spec.lora.rank == 4 and spec.validation.prompts == ["a"]
    with pytest.raises(JobError, match=r"model: .*\n.*steps: "):
        build_spec(JobRequest(SAMPLE_DATASET, "{}", {"steps": 0, "model": "sd3"}))


def test_cancel_delivers_the_last_checkpoint_to_s3(tiny_weights, tmp_path, s3, monkeypatch):
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(tiny_weights))
    spec = json.dumps(
        {
            "base_weights": "tiny-flux-dev",
            "resolutions": "64",
            "steps": 100000,
            "checkpoint_interval": 2,
            "publish": {
                "s3_bucket": s3.bucket,
                "s3_prefix": "jobs/9",
                "s3_endpoint_url": s3.endpoint_url,
                "s3_region": s3.region,
            },
        }
    )
    req = JobRequest(
        SAMPLE_DATASET,
        spec,
        return_checkpoint=True,
        secrets={"AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": s3.secret_access_key},
    )
    lines: list[str] = []
    outcome: dict = {}

    def job():
        try:
            run_job(req, tmp_path / "job", log=lines.append)
        except BaseException as exc:  # noqa: BLE001 - recording what the adapter would see
            outcome["exc"] = exc

    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 120
    while not any("checkpoint: step 2 saved" in ln for ln in lines):
        assert time.monotonic() < deadline and t.is_alive(), lines[-20:]
        time.sleep(0.1)
    _raise_in(t, Canceled)
    t.join(60)
    assert not t.is_alive()
    assert isinstance(outcome.get("exc"), Canceled)  # the cancel propagates to Cog
    keys = {
        o["Key"]
        for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="jobs/9/checkpoints/")["Contents"]
    }
    assert {"trainer_state.json", "trainable.safetensors", "training_state.pt"} <= {
        k.rsplit("/", 1)[-1] for k in keys
    }
    assert all(k.startswith("jobs/9/checkpoints/step-") for k in keys)
    assert s3.secret_access_key not in "\n".join(lines)


def test_the_archive_holds_checkpoints_only_when_asked(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{}")
    (out / ".work").mkdir()
    (out / ".work" / "scratch").write_text("x")
    (out / "config.json").write_text("{}")
    import zipfile

    with zipfile.ZipFile(pack_outputs(out, tmp_path / "a.zip", include_checkpoints=False)) as zf:
        assert zf.namelist() == ["config.json"]
    with zipfile.ZipFile(pack_outputs(out, tmp_path / "b.zip", include_checkpoints=True)) as zf:
        assert zf.namelist() == ["checkpoints/step-000002/trainer_state.json", "config.json"]
