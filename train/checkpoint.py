"""Resumable checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint folder holds

    trainable.safetensors   the LoRA weights (lora) or the whole denoiser (full)
    training_state.pt       optimizer, LR schedule, generator and torch RNG states
    trainer_state.json      step, data-order position, loss history, the spec it was made with

Never the frozen base weights. ``resume_from`` accepts the folder or an archive of it (zip /
tar / tar.gz, e.g. one handed back by a previous Replicate job); archives are unpacked with
the same safety checks as datasets.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .data import DataLimits, extract_archive
from .spec import TrainingSpec

TRAINABLE = "trainable.safetensors"
STATE = "training_state.pt"
META = "trainer_state.json"
CARRY = "carry"  # the kept steps and scores a checkpoint carries (train/steps.py)
# Fields a resumed run must share with the run that made the checkpoint: they decide what
# the weights mean, which order the data comes in, and what the random draws are.
MUST_MATCH = (
    "model",
    "mode",
    "lora",
    "batch_size",
    "gradient_accumulation_steps",
    "resolutions",
    "seed",
    "caption_dropout",
    "trigger_word",
    "optimizer",
    "validation.holdout",  # which images train
    "ema",  # the average's decay and start (resume stays exact)
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why."""


@dataclass
class Checkpoint:
    folder: Path
    step: int
    sampler: dict[str, int]
    history: list[tuple[int, float]]
    spec: dict[str, Any]


def save_checkpoint(
    folder: Path,
    spec: TrainingSpec,
    trainable: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
    train_state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    ema_state: dict[str, Any] | None = None,
) -> Path:
    """``train_state`` is ``TrainState.state_dict()`` (train/trainer.py): step, sampler, history, generators.

    Written beside ``folder`` and renamed into place, so a job killed mid-save (a cancel) never
    leaves a half-written checkpoint behind; ``extra(partial_folder)`` adds files before the rename."""
    partial = folder.with_name(f".partial-{folder.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(partial / TRAINABLE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "generators": train_state["generators"],
            "torch_rng": torch.get_rng_state(),
            **({"ema": ema_state} if ema_state is not None else {}),
        },
        partial / STATE,
    )
    meta = {
        "step": train_state["step"],
        "sampler": train_state["sampler"],
        "history": train_state["history"],
        "spec": json.loads(spec.to_json()),
    }
    (partial / META).write_text(json.dumps(meta, indent=1) + "\n")
    if extra is not None:
        extra(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def open_checkpoint(source: Path, work: Path) -> Checkpoint:
    """A checkpoint from a folder or an archive of one (unpacked under ``work``)."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"resume_from: {source} does not exist")
    folder = source
    if source.is_file():
        folder = work / "resume"
        if folder.exists():
            shutil.rmtree(folder)
        # a checkpoint, the whole checkpoints/ folder, or a job's output.zip (with resume/ inside)
        extract_archive(source, folder, DataLimits(max_files=200_000, max_bytes=200 * 2**30))
    found = [p.parent for p in folder.rglob(META) if CARRY not in p.relative_to(folder).parts]
    if not found:
        raise CheckpointError(
            f"resume_from: {source} holds no {META}; pass a checkpoint folder or its archive"
        )
    folder = max(found, key=_step_of)  # several checkpoints: the newest step
    for name in (TRAINABLE, STATE):
        if not (folder / name).is_file():
            raise CheckpointError(f"resume_from: {folder} lacks {name}; the checkpoint is incomplete")
    meta = json.loads((folder / META).read_text())
    return Checkpoint(
        folder,
        int(meta["step"]),
        meta["sampler"],
        [tuple(x) for x in meta.get("history", [])],
        meta.get("spec", {}),
    )


def _step_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


_ABSENT = object()


def _field(d: dict[str, Any], dotted: str, default: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def check_compatible(ckpt: Checkpoint, spec: TrainingSpec) -> None:
    now = json.loads(spec.to_json())
    defaults = json.loads(TrainingSpec().to_json())  # a checkpoint older than a field had its default
    diffs = []
    for k in MUST_MATCH:
        then = _field(ckpt.spec, k, _field(defaults, k, _ABSENT))
        if k.split(".")[0] in ckpt.spec and then != _field(now, k, _ABSENT):
            diffs.append(f"{k}: checkpoint {then!r}, spec {_field(now, k, None)!r}")
    if spec.mode == "full":
        diffs = [d for d in diffs if not d.startswith("lora:")]
    if diffs:
        raise CheckpointError(
            "resume_from: the checkpoint was made with different settings — " + "; ".join(diffs)
        )
    if ckpt.step >= spec.steps:
        raise CheckpointError(
            f"resume_from: the checkpoint is at step {ckpt.step}, and steps is {spec.steps}; "
            f"raise steps to train further"
        )


def load_trainable(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.folder / TRAINABLE))


def restore_training_state(
    ckpt: Checkpoint, optimizer: Any, lr_scheduler: Any, ema: Any = None
) -> dict[str, Any]:
    """Loads the optimizer, the LR schedule, torch's RNG and the moving average (``ema``: diffusers'
    EMAModel, when on); returns the ``TrainState`` dict to load."""
    state = torch.load(ckpt.folder / STATE, map_location="cpu", weights_only=False)
    if ema is not None:
        if "ema" not in state:
            raise CheckpointError(
                f"resume_from: {ckpt.folder} holds no moving average (it was made with ema off)"
            )
        device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
        ema.load_state_dict(state["ema"])
        ema.to(device)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return {
        "step": ckpt.step,
        "sampler": ckpt.sampler,
        "history": ckpt.history,
        "generators": state["generators"],
    }


def fetch_checkpoint(uri: str, dest: Path, publish: Any, secrets: dict[str, str]) -> Path:
    """A checkpoint a failed job delivered to its publish target, downloaded into ``dest``:
    ``s3://bucket/prefix`` (every object under the prefix; endpoint and region from ``publish``,
    a ``PublishSpec``) or ``hf://owner/name`` (the repo's files). ``secrets`` holds the job's
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``HF_TOKEN``."""
    dest.mkdir(parents=True, exist_ok=True)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        return _fetch_s3(bucket, prefix.strip("/"), dest, publish, secrets)
    if uri.startswith("hf://"):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(uri[len("hf://") :], token=secrets.get("HF_TOKEN"), local_dir=dest))
        except Exception as exc:  # offline, no such repo, no token for a private one
            raise CheckpointError(
                f"resume_checkpoint: cannot get {uri}: {type(exc).__name__}: {exc}"
            ) from None
    raise CheckpointError(f"resume_checkpoint: {uri!r} is neither s3://bucket/prefix nor hf://owner/name")


def _fetch_s3(bucket: str, prefix: str, dest: Path, publish: Any, secrets: dict[str, str]) -> Path:
    from .publish import _s3_client

    uri = f"s3://{bucket}/{prefix}"
    try:
        client = _s3_client(
            publish.s3_endpoint_url,
            publish.s3_region,
            secrets.get("AWS_ACCESS_KEY_ID"),
            secrets.get("AWS_SECRET_ACCESS_KEY"),
        )
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        for key in keys:
            target = dest / key[len(prefix) + 1 :]
            if ".." in Path(key).parts:
                raise CheckpointError(f"resume_checkpoint: unsafe key {key!r} under {uri}")
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except CheckpointError:
        raise
    except Exception as exc:  # credentials, endpoint, no such bucket
        raise CheckpointError(f"resume_checkpoint: cannot read {uri}: {type(exc).__name__}: {exc}") from None
    if not keys:
        raise CheckpointError(
            f"resume_checkpoint: nothing under {uri}; the job delivered no checkpoint there"
        )
    return dest
