"""Resume and continue through the Replicate fake, with the real Cog train server behind it: a
training canceled mid-way and carried on with `advanced-trainer resume` ends with the weights of an
uninterrupted run, exactly (on the CPU); `continue --steps N` on a succeeded resumable job equals
one longer run. The checkpoint of the canceled job travels through a real S3 server (moto)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from client.cli import EXIT_OK, EXIT_USER, main
from client.config import store_path
from client.store import JobStore
from cogserver import wait_until

FAKE_TOKEN = "r8_" + "F4k3T0k3n" * 4


@pytest.fixture()
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("ADVANCED_TRAINER_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def own_jobs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-jobs")


@pytest.fixture(scope="module")
def resume_train_server(tmp_path_factory, cog_weights, own_jobs, upload_sink):
    """A train-mode Cog server of its own: the test watches its job folder for the first checkpoint."""
    from conftest import cog_server_fixture

    yield from cog_server_fixture(
        "train", tmp_path_factory, cog_weights, own_jobs, args=("--upload-url", upload_sink.upload_url)
    )


@pytest.fixture()
def fake(resume_train_server, monkeypatch, client_home):
    from fake_replicate import FakeReplicate

    with FakeReplicate(None, resume_train_server.url, token=FAKE_TOKEN) as f:
        monkeypatch.setenv("REPLICATE_API_TOKEN", FAKE_TOKEN)
        monkeypatch.setenv("REPLICATE_BASE_URL", f.url)
        monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.1")
        yield f


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _spec(cog_weights: Path, **extra) -> dict:
    return {
        "model": "sdxl",
        "base_weights": str(cog_weights / "tiny-sdxl"),
        "resolutions": "64",
        "learning_rate": 0.01,
        "caption_dropout": 0.1,  # the dropout generator must continue too
        "seed": 11,
        "lora": {"targets": ["to_q", "to_k", "to_v", "to_out.0", "conv_out"], "dropout": 0.1},
        "validation": {"num_inference_steps": 2},
        **extra,
    }


def _local_run(spec: dict, data: Path, out: Path) -> Path:
    """The uninterrupted run, here, with the same spec and dataset."""
    from train.loop import run_training
    from train.spec import parse_spec

    with contextlib.redirect_stdout(io.StringIO()):
        run_training(parse_spec(spec), data, out)
    return out


def _same_weights(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_a_canceled_training_resumed_ends_as_an_uninterrupted_run(
    capsys, fake, s3, own_jobs, cog_weights, sample_dataset, client_home, monkeypatch, tmp_path
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    publish = {"s3_bucket": s3.bucket, "s3_prefix": "resume-test", "s3_endpoint_url": s3.endpoint_url}
    spec = _spec(cog_weights, steps=60, checkpoint_interval=2, publish={**publish, "s3_region": s3.region})
    code, out, err = cli(
        capsys,
        "--json",
        "submit",
        "--spec",
        json.dumps(spec),
        "--dataset",
        str(sample_dataset),
        "--keep-checkpoint",
    )
    assert code == EXIT_OK, err[-3000:]
    first = json.loads(out)["job"]["id"]
    wait_until(lambda: list(own_jobs.glob("job-*/out/checkpoints/step-*")), 120, "a first checkpoint")
    code, _, err = cli(capsys, "cancel", first)
    assert code == EXIT_OK, err
    assert fake.wait_for(first)["status"] == "canceled"
    listed = lambda: s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="resume-test/checkpoints/")  # noqa: E731
    wait_until(
        lambda: any(o["Key"].endswith("training_state.pt") for o in listed().get("Contents", [])),
        60,
        "the canceled job's checkpoint in the bucket",
    )
    delivered = {o["Key"] for o in listed()["Contents"]}
    step = int(next(iter(delivered)).split("/")[2].removeprefix("step-"))
    assert 0 < step < 60, delivered

    code, out, err = cli(capsys, "--json", "resume", first, "--wait")
    assert code == EXIT_OK, err[-3000:]
    done = json.loads(out)
    second = done["job"]["id"]
    assert done["job"]["parent_id"] == first and done["job"]["relation"] == "resume"
    assert f"resume: from step {step}" in fake.job(second)["logs"]
    local = _local_run(spec, sample_dataset, tmp_path / "straight")
    worst = _same_weights(local / "pytorch_lora_weights.safetensors", Path(done["outputs"]["lora"]))
    assert worst == 0.0, f"the resumed job's weights differ from an uninterrupted run's by {worst}"
    # the ledger counts each job once: the canceled one's cost and the resumed one's
    store = JobStore(store_path())
    a, b = store.get(first), store.get(second)
    assert a is not None and b is not None and a["cost_usd"] is not None and b["cost_usd"] is not None
    assert store.spend_between() == pytest.approx(a["cost_usd"] + b["cost_usd"])
    # a succeeded job is continued, not resumed
    code, _, err = cli(capsys, "resume", second)
    assert code == EXIT_USER and f"advanced-trainer continue {second} --steps N" in err


def test_continue_steps_on_a_succeeded_job_equals_one_longer_run(
    capsys, fake, cog_weights, sample_dataset, client_home, tmp_path
):
    spec = _spec(cog_weights, steps=6, resumable=True, validation={"num_inference_steps": 2, "interval": 3})
    code, out, err = cli(
        capsys, "--json", "submit", "--spec", json.dumps(spec), "--dataset", str(sample_dataset), "--wait"
    )
    assert code == EXIT_OK, err[-3000:]
    first = json.loads(out)["job"]
    assert json.loads(out)["outputs"]["kept_steps"].keys() == {"3", "6"}
    code, out, err = cli(capsys, "--json", "continue", first["id"], "--steps", "6", "--wait")
    assert code == EXIT_OK, err[-3000:]
    done = json.loads(out)
    assert done["job"]["parent_id"] == first["id"] and done["job"]["relation"] == "continue"
    assert json.loads(done["job"]["spec_json"])["steps"] == 12
    local = _local_run({**spec, "steps": 12}, sample_dataset, tmp_path / "longer")
    kept = done["outputs"]["kept_steps"]
    assert kept.keys() == {"3", "6", "9", "12"}  # the parent's kept steps came along
    chosen = json.loads((local / "scores.json").read_text())["chosen_step"]
    for step in ("6", "12"):
        mine = "pytorch_lora_weights.safetensors"
        mine = mine if int(step) == chosen else f"steps/step-{step}/{mine}"
        worst = _same_weights(local / mine, Path(kept[step]))
        assert worst == 0.0, f"step {step} differs from one longer run by {worst}"
    # another kept step's files, by download --step
    code, out, err = cli(capsys, "--json", "download", done["job"]["id"], "--step", "9")
    assert code == EXIT_OK, err
    assert json.loads(out)["lora"] == kept["9"] and json.loads(out)["picked_step"] == 9
    code, _, err = cli(capsys, "download", done["job"]["id"], "--step", "5")
    assert code == EXIT_USER and "kept no step 5; kept steps: 3, 6, 9, 12" in err
    # a job without a final checkpoint cannot be continued, and says how to get one
    plain = _spec(cog_weights, steps=2)
    code, out, err = cli(
        capsys, "--json", "submit", "--spec", json.dumps(plain), "--dataset", str(sample_dataset), "--wait"
    )
    assert code == EXIT_OK, err[-3000:]
    code, _, err = cli(capsys, "continue", json.loads(out)["job"]["id"], "--steps", "2")
    assert code == EXIT_USER and "resumable: true" in err
