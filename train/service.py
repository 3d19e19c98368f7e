"""Running one training job for the Cog train entry (cog_train.py).

The adapter turns Cog inputs into a ``JobRequest``; ``run_job`` validates the spec, runs the
trainer as a child process (``python -m train``, forked from the warm process ``train/zygote.py``
started in setup, or under torch's launcher when there is more than one GPU), relays every line it prints through ``sys.stdout`` (Cog's logs capture only
Python-level writes, never a child's file descriptors), publishes, and packs the output
archive. A cancel (Cog raises ``CancelationException`` in this thread) stops the whole
process group at once.

This module stays torch-free: the trainer's weight lives in the child process.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .progress import PUBLISH_FAILED
from .redaction import Redactor
from .spec import SpecError, TrainingSpec, parse_spec
from .zygote import Zygote, ZygoteChild

OUTPUT_ARCHIVE = "output.zip"
WARM_READY_TIMEOUT = 600.0  # a job that arrives while the warm process still imports waits for it
# A job's environment may differ from the warm process's only in these: its secrets (read when used:
# huggingface_hub's token, boto3's credentials) and the relay's unbuffered output. Anything else
# could have been read at import time (our weights folder, huggingface_hub's endpoint and cache), so
# a job with another value starts a fresh process.
JOB_ONLY_ENV = frozenset({"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PYTHONUNBUFFERED"})
_STORED = {".safetensors", ".png", ".jpg", ".jpeg", ".webp", ".zip", ".gz", ".pt", ".bin"}  # already dense


class JobError(RuntimeError):
    """The job failed; the message is the reason a user should read."""


@dataclass
class JobRequest:
    dataset: Path
    spec_json: str = "{}"
    overrides: dict[str, Any] = field(default_factory=dict)  # typed inputs; None = not given
    secrets: dict[str, str] = field(default_factory=dict)  # env name -> value, e.g. HF_TOKEN
    resume_from: Path | None = None
    return_checkpoint: bool = False
    num_processes: int = 1


def build_spec(req: JobRequest) -> TrainingSpec:
    """The spec JSON with the typed inputs on top; every bad field reported at once."""
    overrides = {k: v for k, v in req.overrides.items() if v is not None and v != ""}
    try:
        return parse_spec(req.spec_json or "{}", **overrides)
    except SpecError as exc:
        raise JobError(str(exc)) from None


def _signal_group(pid: int, sig: int) -> None:
    """Signal the child's process group; a child forked a moment ago may not lead its group yet."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_group(proc: subprocess.Popen | ZygoteChild, grace: float = 5.0) -> None:
    """SIGTERM the child's whole process group (launcher + workers), then SIGKILL what is left."""
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


_WARM: Zygote | None = None


def prewarm() -> None:
    """Start the warm trainer process (``train/zygote.py``): it imports the trainer now, so that a job's
    ``python -m train`` starts without 6 to 10 s of imports. The Cog train entry calls this in setup;
    ``ADVANCED_TRAINER_WARM=0`` turns it off (every job then starts a fresh process)."""
    global _WARM
    if _WARM is None and os.environ.get("ADVANCED_TRAINER_WARM", "1") != "0":
        _WARM = Zygote()


def _start_trainer(
    args: list[str], env: dict[str, str], log: Callable[[str], None], num_processes: int
) -> tuple[subprocess.Popen | ZygoteChild, int]:
    """The trainer process and the descriptor its output comes from: forked from the warm process when
    there is one (one process a job), else ``python -m train`` in a new process."""
    warm = _WARM
    changed = sorted(k for k in set(env) | set(warm.env) if env.get(k) != warm.env.get(k)) if warm else []
    if warm is not None and num_processes == 1 and set(changed) - JOB_ONLY_ENV:
        what = ", ".join(k for k in changed if k not in JOB_ONLY_ENV)
        log(f"trainer: the environment changed since setup ({what}); starting a fresh process")
    elif num_processes == 1 and warm is not None and not warm.busy and warm.wait_ready(WARM_READY_TIMEOUT):
        read_fd, write_fd = os.pipe()
        try:
            child = warm.start(args, env, write_fd)
        except OSError as exc:
            os.close(read_fd)
            log(f"trainer: the warm process is gone ({exc}); starting a fresh one")
        else:
            warm.busy = True
            log("trainer: forked from the warm process (its imports were done in setup)")
            return child, read_fd
        finally:
            os.close(write_fd)
    cmd = [sys.executable, "-m", "train", *args]
    if num_processes > 1:
        cmd += ["--num-processes", str(num_processes)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.fileno()


def run_trainer(
    args: list[str],
    env: dict[str, str],
    log: Callable[[str], None],
    redact: Callable[[str], str],
    num_processes: int = 1,
) -> tuple[int, list[str]]:
    """Run ``python -m train ARGS`` in its own process group, relaying its output line by line.

    Returns (exit code, the last lines). Reading polls every 0.1 s so that a cancel raised in
    this thread lands promptly even while the child is quiet.
    """
    proc, fd = _start_trainer(args, env, log, num_processes)
    tail: list[str] = []
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = redact(raw.decode("utf-8", "replace").rstrip("\r"))
                log(line)
                tail = (tail + [line])[-40:]
        if buf:
            line = redact(buf.decode("utf-8", "replace"))
            log(line)
            tail.append(line)
        return proc.wait(), tail
    finally:
        _kill_group(proc)  # a cancel or any error here: leave nothing running
        if isinstance(proc, ZygoteChild):
            os.close(fd)
            if _WARM is not None:
                _WARM.busy = False


def pack_outputs(
    out_dir: Path, archive: Path, include_checkpoints: bool, leave_out: tuple[str, ...] = ()
) -> Path:
    """A zip of the output folder (scratch never included; checkpoints only when asked for; the
    top-level folders in ``leave_out`` neither)."""
    skip = {".work", *leave_out, *(() if include_checkpoints else ("checkpoints",))}
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    with zipfile.ZipFile(archive, "w") as zf:
        for path in files:
            rel = path.relative_to(out_dir)
            if rel.parts[0] in skip:
                continue
            kind = zipfile.ZIP_STORED if path.suffix.lower() in _STORED else zipfile.ZIP_DEFLATED
            zf.write(path, rel.as_posix(), compress_type=kind)
    return archive


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def _error_reason(tail: list[str], rc: int) -> str:
    for line in reversed(tail):
        if line.startswith("error: "):
            return line[len("error: ") :]
        if line.startswith("invalid training spec"):
            return "\n".join(tail[tail.index(line) :])
    last = next((ln for ln in reversed(tail) if ln.strip()), "")
    return f"the trainer exited with code {rc}" + (f": {last}" if last else "")


def run_job(req: JobRequest, workdir: Path, log: Callable[[str], None] = print) -> Path:
    """Train, publish, and pack; returns the output archive. Raises JobError with the reason when
    the training fails; a publish that fails after it is reported, not raised (the weights are
    paid for: they go back in the archive)."""
    spec = build_spec(req)
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / "out"
    spec_file = workdir / "spec.json"
    spec_file.write_text(spec.to_json())
    redact = Redactor(req.secrets.values())  # the values given, and anything shaped like a token
    env = {**os.environ, **{k: v for k, v in req.secrets.items() if v}, "PYTHONUNBUFFERED": "1"}
    args = ["--spec", str(spec_file), "--data", str(req.dataset), "--out", str(out_dir)]
    if req.resume_from is not None:
        args += ["--resume-from", str(req.resume_from)]
    log(
        f"job: {spec.model} {spec.mode}, {spec.steps} steps at {','.join(map(str, spec.resolutions))} px, "
        f"{req.num_processes} process(es)"
    )
    secrets_for_publish = {
        "hf_token": req.secrets.get("HF_TOKEN"),
        "s3_access_key_id": req.secrets.get("AWS_ACCESS_KEY_ID"),
        "s3_secret_access_key": req.secrets.get("AWS_SECRET_ACCESS_KEY"),
    }
    from .publish import full_fine_tune_target_problem

    problem = full_fine_tune_target_problem(spec)
    if problem:
        raise JobError(problem)
    if spec.mode == "full" and not spec.publish.hub_model_id and not spec.publish.s3_public_base_url:
        log(
            "publish: note: the fine-tuned model goes to a bucket without s3_public_base_url; a trained "
            "version reads it only with S3 credentials in its own environment (not on Replicate)"
        )
    check_publish_targets(spec, secrets_for_publish, log, redact)
    completed = False
    try:
        rc, tail = run_trainer(args, env, log, redact, req.num_processes)
        if rc != 0:
            raise JobError(_error_reason(tail, rc))
        completed = True
    finally:
        if not completed and req.return_checkpoint:
            _deliver_checkpoint_elsewhere(spec, out_dir, secrets_for_publish, log)
    outcome = publish_outputs(out_dir, spec, secrets_for_publish, log, redact)
    leave_out = _point_to_published_model(out_dir, spec, outcome, log)
    archive = pack_outputs(out_dir, workdir / OUTPUT_ARCHIVE, req.return_checkpoint, leave_out)
    log(f"output: {archive.name}, {archive.stat().st_size / 2**20:.1f} MiB")
    return archive


def check_publish_targets(
    spec: TrainingSpec,
    secrets: dict[str, str | None],
    log: Callable[[str], None],
    redact: Callable[[str], str],
) -> None:
    """Every publish target accepts this job's credentials, checked before the dataset is staged or a
    model loaded: a bad or read-only credential fails the job in seconds, naming the input, instead
    of after the training it would have cost."""
    from .publish import PublishError, check_targets

    if not (spec.publish.hub_model_id or spec.publish.s3_bucket):
        return
    start = time.monotonic()
    try:
        done = check_targets(spec.publish, **secrets)
    except PublishError as exc:
        took = time.monotonic() - start
        raise JobError(f"{redact(str(exc))} (checked before any training, in {took:.1f} s)") from None
    log(f"publish: targets checked in {time.monotonic() - start:.1f} s: {'; '.join(done)}")


def publish_outputs(
    out_dir: Path,
    spec: TrainingSpec,
    secrets: dict[str, str | None],
    log: Callable[[str], None],
    redact: Callable[[str], str],
) -> dict[str, Any]:
    """Publish the finished outputs to the spec's targets. A failure does not fail the job: the
    log says what failed and why, and the trained weights still go back in output.zip. The outcome
    (``published``: the targets that took the files; ``failed``: the reason, or None) is written
    into config.json's ``publish`` block and returned."""
    from .publish import PublishError, publish

    if not (spec.publish.hub_model_id or spec.publish.s3_bucket):
        return {}
    done: dict[str, Any] = {}
    try:
        done.update(publish(out_dir, spec.publish, log=log, **secrets))
        outcome: dict[str, Any] = {"published": done, "failed": None}
    except PublishError as exc:
        why = redact(str(exc))
        log(f"{PUBLISH_FAILED}{why}")
        log(
            "publish: the trained weights are in output.zip all the same; publish them from your machine "
            "with `advanced-trainer publish JOB --hub owner/name` or `--s3 s3://bucket/prefix`"
        )
        outcome = {"published": done, "failed": why}
    config = out_dir / "config.json"
    if config.is_file():
        doc = json.loads(config.read_text())
        doc["publish"] = outcome
        config.write_text(json.dumps(doc, indent=2) + "\n")
    return outcome


def _point_to_published_model(
    out_dir: Path, spec: TrainingSpec, outcome: dict[str, Any], log: Callable[[str], None]
) -> tuple[str, ...]:
    """A published full fine-tune: output.zip carries ``published_model.json`` instead of ``model/``
    (returns the folders to leave out). When publishing failed the model stays in the archive: Cog's
    upload may not carry it, but it is the only copy left."""
    from .published import MODEL_DIR, describe, read_pointer, write_pointer

    if spec.mode != "full" or not (out_dir / MODEL_DIR).is_dir():
        return ()
    pointer = write_pointer(out_dir, spec.publish, outcome.get("published") or {}) if outcome else None
    if pointer is None:
        size = sum(p.stat().st_size for p in (out_dir / MODEL_DIR).rglob("*") if p.is_file())
        log(
            f"publish: the fine-tuned model ({size / 2**30:.2f} GiB) was not published; it goes into "
            f"output.zip, which Cog may fail to upload at this size"
        )
        return ()
    log(f"output: model/ left out of output.zip; {pointer.name} points to {describe(read_pointer(pointer))}")
    return (MODEL_DIR,)


def _deliver_checkpoint_elsewhere(
    spec: TrainingSpec, out_dir: Path, secrets: dict, log: Callable[[str], None]
) -> None:
    """On failure or cancel Cog discards outputs; a configured Hub/S3 target still gets the checkpoint."""
    ckpt = latest_checkpoint(out_dir) if out_dir.exists() else None
    if ckpt is None:
        log("return_checkpoint: no checkpoint was written before the job stopped")
        return
    if not (spec.publish.s3_bucket or spec.publish.hub_model_id):
        log(
            f"return_checkpoint: {ckpt.name} exists, but Cog delivers no output for a failed or canceled "
            f"job; set an S3 bucket or hub_model_id to receive it"
        )
        return
    from .publish import PublishError, publish

    prefix = "/".join(p for p in (spec.publish.s3_prefix, "checkpoints", ckpt.name) if p)
    sub = spec.publish.model_copy(update={"s3_prefix": prefix})
    try:
        publish(ckpt, sub, log=log, **secrets)
    except PublishError as exc:
        log(f"return_checkpoint: could not deliver {ckpt.name}: {exc}")


class JobFolders:
    """One scratch folder per job under ADVANCED_TRAINER_JOBS_DIR (default: the temp dir); the
    previous job's is removed when the next starts (Cog reads the returned archive after the
    entry returns, so it cannot go at the end of the job itself)."""

    def __init__(self) -> None:
        import tempfile

        self.root = Path(os.environ.get("ADVANCED_TRAINER_JOBS_DIR") or tempfile.gettempdir())
        self.current: Path | None = None

    def new(self) -> Path:
        import shutil
        import tempfile

        if self.current is not None:
            shutil.rmtree(self.current, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.current = Path(tempfile.mkdtemp(prefix="job-", dir=self.root))
        return self.current


def processes_for(gpus: list) -> int:
    """One trainer process per GPU; ADVANCED_TRAINER_NUM_PROCESSES overrides (e.g. gloo processes on a
    CPU)."""
    forced = os.environ.get("ADVANCED_TRAINER_NUM_PROCESSES")
    return int(forced) if forced else max(1, len(gpus))


def detect_gpus() -> list[dict[str, Any]]:
    """The visible CUDA devices (name, memory); empty on a CPU machine."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return out
