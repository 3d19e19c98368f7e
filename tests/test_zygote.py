"""The warm trainer process (train/zygote.py): a job's ``python -m train`` forked from a process that
imported the trainer in setup. It must behave as a fresh process would: the job's environment, its exit
code, a cancel that leaves nothing running, CUDA untouched before the fork, and a fresh process when the
warm one is gone or the environment its imports read has changed. (Every training through the Cog train entry in the suite runs this way.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import SAMPLE_DATASET
from train import service
from train.service import JobRequest, run_job, run_trainer
from train.zygote import Zygote


@pytest.fixture
def warm(tiny_weights, monkeypatch):
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(tiny_weights))  # read at import: set before
    zygote = Zygote(_steady(os.environ))
    monkeypatch.setattr(service, "_WARM", zygote)
    assert zygote.wait_ready(180)
    yield zygote
    zygote.close()


def _steady(env) -> dict[str, str]:
    """The environment without pytest's per-phase variable: a Cog worker's does not change between its
    setup and its jobs, this process's changes with every test phase."""
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


BAD_SPEC = ["--spec", '{"steps": 0}', "--data", str(SAMPLE_DATASET), "--out", "unused"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_the_warm_process_asks_torch_for_no_gpu_before_it_forks():
    """A CUDA driver initialised before fork() is unusable in the child: the preload must not query it."""
    script = textwrap.dedent(
        """
        import torch, torch.cuda as c
        asked = []
        for name in ("is_available", "device_count", "_lazy_init", "current_device", "get_device_properties",
                     "is_bf16_supported", "mem_get_info", "get_device_name", "get_device_capability"):
            real = getattr(c, name)
            setattr(c, name, lambda *a, _n=name, _r=real, **k: (asked.append(_n), _r(*a, **k))[1])
        import importlib
        from train.zygote import PRELOAD
        for m in PRELOAD:
            importlib.import_module(m)
        print(asked, torch.cuda.is_initialized())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[] False"


def test_a_forked_job_runs_with_its_secrets_and_reports_as_python_m_train(warm, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # see _steady
    spec = json.dumps({"base_weights": "tiny-flux-dev", "resolutions": "64", "steps": 2})
    lines: list[str] = []
    request = JobRequest(SAMPLE_DATASET, spec, secrets={"HF_TOKEN": "hf_only_this_job"})
    archive = run_job(request, tmp_path / "job", log=lines.append)
    assert any("forked from the warm process" in ln for ln in lines), lines[:5]
    assert (tmp_path / "job" / "out" / "pytorch_lora_weights.safetensors").is_file() and archive.is_file()

    rc, tail = run_trainer(BAD_SPEC, dict(os.environ), lines.append, lambda s: s)
    assert rc == 2 and any("steps" in ln for ln in tail), tail  # the spec error, as the CLI prints it
    rc, tail = run_trainer(["--spec", "{}"], dict(os.environ), lines.append, lambda s: s)
    assert rc == 2 and any("arguments are required: --data" in ln for ln in tail), tail  # argparse exits


def test_an_environment_changed_since_setup_means_a_fresh_process(warm, monkeypatch, tmp_path):
    """Anything but a secret may have been read at import time (the weights folder, the Hub's
    endpoint): a job whose environment differs there is not forked from the warm process."""
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # see _steady
    monkeypatch.setenv("ADVANCED_TRAINER_WEIGHTS", str(tmp_path / "elsewhere"))
    lines: list[str] = []
    rc, tail = run_trainer(BAD_SPEC, dict(os.environ), lines.append, lambda s: s)
    assert rc == 2, tail
    assert any("environment changed since setup (ADVANCED_TRAINER_WEIGHTS)" in ln for ln in lines), lines
    assert not any("forked" in ln for ln in lines)


def test_a_canceled_forked_trainer_leaves_nothing_running(warm, tmp_path, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # see _steady
    children = []
    start = warm.start
    monkeypatch.setattr(warm, "start", lambda *a: children.append(start(*a)) or children[-1])
    spec = json.dumps({"base_weights": "tiny-flux-dev", "resolutions": "64", "steps": 100000})
    lines: list[str] = []

    class Canceled(BaseException):
        pass

    def log(line: str) -> None:
        lines.append(line)
        if '"phase": "train"' in line:
            raise Canceled  # what Cog's cancel raises in the job's thread

    with pytest.raises(Canceled):
        run_job(JobRequest(SAMPLE_DATASET, spec), tmp_path / "job", log=log)
    (child,) = children
    deadline = time.monotonic() + 10
    while _alive(child.pid):
        assert time.monotonic() < deadline, "the forked trainer outlived the cancel"
        time.sleep(0.1)
    assert not warm.busy and warm.process.poll() is None  # the warm process serves the next job

    rc, tail = run_trainer(BAD_SPEC, dict(os.environ), lines.append, lambda s: s)
    assert rc == 2, tail


def test_a_gone_warm_process_means_a_fresh_one(warm, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # see _steady
    warm.process.kill()
    warm.process.wait()
    lines: list[str] = []
    rc, tail = run_trainer(BAD_SPEC, dict(os.environ), lines.append, lambda s: s)
    assert rc == 2 and any("steps" in ln for ln in tail), tail
    assert any("the warm process is gone" in ln for ln in lines), lines
    assert not any("forked from the warm process" in ln for ln in lines)
