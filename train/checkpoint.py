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
) -> Path:
    """``train_state`` is ``TrainState.state_dict()`` (train/trainer.py): step, sampler, history, generators."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(folder / TRAINABLE))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "generators": train_state["generators"],
            "torch_rng": torch.get_rng_state(),
        },
        folder / STATE,
    )
    meta = {
        "step": train_state["step"],
        "sampler": train_state["sampler"],
        "history": train_state["history"],
        "spec": json.loads(spec.to_json()),
    }
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
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
        extract_archive(source, folder, DataLimits(max_files=100, max_bytes=200 * 2**30))
    found = sorted(p.parent for p in folder.rglob(META))
    if not found:
        raise CheckpointError(
            f"resume_from: {source} holds no {META}; pass a checkpoint folder or its archive"
        )
    folder = found[-1]  # an archive of the whole checkpoints/ folder: the newest step sorts last
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


def check_compatible(ckpt: Checkpoint, spec: TrainingSpec) -> None:
    now = json.loads(spec.to_json())
    diffs = [
        f"{k}: checkpoint {ckpt.spec.get(k)!r}, spec {now.get(k)!r}"
        for k in MUST_MATCH
        if k in ckpt.spec and ckpt.spec.get(k) != now.get(k)
    ]
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


def restore_training_state(ckpt: Checkpoint, optimizer: Any, lr_scheduler: Any) -> dict[str, Any]:
    """Loads the optimizer, the LR schedule and torch's RNG; returns the ``TrainState`` dict to load."""
    state = torch.load(ckpt.folder / STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return {
        "step": ckpt.step,
        "sampler": ckpt.sampler,
        "history": ckpt.history,
        "generators": state["generators"],
    }
