"""Kept steps: at every validation step the LoRA is saved under ``steps/step-N/`` and the step is
scored (train/selection.py); at the end the chosen step's files move to the output's top level
(stored once), and the other kept steps keep their diffusers file only.

``KeepSteps`` is a step hook that runs after ``RenderSamples`` (it scores the renders that hook
just wrote). Its records travel inside every checkpoint (``carry/``: the scores so far, the kept
LoRAs and the renders), so a resumed run chooses among all the steps of the job, not only those
after the checkpoint. Scoring draws no number from the training's generators or torch's global
RNG: a run with validation steps trains exactly the weights of one without.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .cache import LatentCache
from .checkpoint import CARRY
from .data import StagedDataset, load_rgb
from .export import export_weights
from .selection import Choice, SelectionError, StepScores, choose_step, resolve_scorer, strip_trigger
from .trainer import Periodic, RunContext, Trainer, TrainingError, log

STEPS_DIR = "steps"
SCORES_FILE = "scores.json"


@contextmanager
def isolated_rng(ctx: RunContext) -> Iterator[None]:
    """Torch's global RNG (LoRA dropout draws from it) as it was before the block."""
    with torch.random.fork_rng(devices=[ctx.device] if ctx.cuda else []):
        yield


def step_folder(out_dir: Path, step: int) -> Path:
    return out_dir / STEPS_DIR / f"step-{step}"


class KeepSteps(Periodic):
    """Step hook: keep the step's LoRA and score it (main process; the others wait)."""

    def __init__(
        self,
        ctx: RunContext,
        dataset: StagedDataset,
        holdout: LatentCache | None,
    ):
        spec = ctx.spec
        super().__init__(spec.validation.interval, spec.steps)
        self.ctx, self.holdout = ctx, holdout
        self.records: list[StepScores] = []
        self.scorer: Any = None
        self.reference: torch.Tensor | None = None
        if spec.validation.scorer and ctx.main:
            self._load_scorer(spec.validation.scorer, dataset)

    def _load_scorer(self, ref: str, dataset: StagedDataset) -> None:
        from .scoring import ClipScorer

        try:
            folder = resolve_scorer(ref)
        except SelectionError as exc:
            raise TrainingError(str(exc)) from None
        try:
            self.scorer = ClipScorer(folder, self.ctx.device)
        except Exception as exc:  # not a CLIP model folder, a damaged file
            why = " ".join(str(exc).split())[:300]
            raise TrainingError(
                f"validation.scorer: cannot load {folder} as a CLIP model ({type(exc).__name__}: {why})"
            ) from None
        limit = self.ctx.spec.dataset.max_image_pixels
        images = [load_rgb(rec.path, limit) for rec in dataset.images]
        self.reference = torch.cat(
            [self.scorer.images(images[i : i + 16]) for i in range(0, len(images), 16)]
        )
        self.scorer.offload()
        log(f"selection: scorer {ref} ({folder}), {len(images)} training image(s) embedded")

    def __call__(self, trainer: Trainer, step: int) -> None:
        ctx = self.ctx
        if ctx.main:
            with ctx.phase("validate"), isolated_rng(ctx), trainer.delivered():
                self.records = [r for r in self.records if r.step != step]
                self.records.append(self._score(trainer, step))
        ctx.accelerator.wait_for_everyone()

    def _score(self, trainer: Trainer, step: int) -> StepScores:
        ctx, spec = self.ctx, self.ctx.spec
        out = ctx.out_dir
        lora: list[str] = []
        if spec.mode == "lora":  # a full fine-tune keeps only its final weights (gigabytes a step)
            files = export_weights(spec, trainer.family, trainer.unwrapped, step_folder(out, step))
            lora = [str(p.relative_to(out)) for p in files]
        renders = sorted((out / "samples").glob(f"step-{step:06d}-*.png"), key=lambda p: _index(p))
        record = StepScores(step, {}, [str(p.relative_to(out)) for p in renders], lora)
        if self.holdout is not None:
            from .scoring import heldout_losses

            record.samples["val_loss"] = heldout_losses(
                trainer.family,
                trainer.unwrapped,
                self.holdout,
                ctx.device,
                ctx.weight_dtype,
                spec.seed,
                ctx.accelerator.autocast,
            )
        if self.scorer is not None and self.reference is not None and renders:
            from PIL import Image

            from .edit import result_panel
            from .scoring import render_scores

            images = [result_panel(Image.open(p)) for p in renders]  # an edit's result, not its control
            # one text per render: an edit model renders each prompt on each validation control set
            texts = [strip_trigger(p, spec.trigger_word) for p, _ in trainer.cache.validation]
            record.samples.update(render_scores(self.scorer, images, texts[: len(images)], self.reference))
            self.scorer.offload()
        log("selection: step " + str(step) + ": " + _summary(record))
        return record

    # -- choosing and delivering ---------------------------------------------------------------
    def choose(self) -> Choice:
        spec = self.ctx.spec
        if spec.mode == "full":
            last = max(r.step for r in self.records)
            return Choice(last, spec.selection, "a full fine-tune keeps only its final step", fallback=True)
        return choose_step(self.records, spec.selection)

    def deliver(self, choice: Choice) -> list[Path]:
        """The chosen step's LoRA files moved to the output's top level (byte for byte: stored once);
        the other kept steps keep their diffusers file only (what the run entry and ``download
        --step`` load), so the archive carries one kohya/ComfyUI file, the chosen step's."""
        out = self.ctx.out_dir
        paths = []
        for record in self.records:
            if record.step == choice.step:
                for rel in record.lora:
                    target = out / Path(rel).name
                    os.replace(out / rel, target)
                    paths.append(target)
                shutil.rmtree(step_folder(out, record.step), ignore_errors=True)
                record.lora = [p.name for p in paths]
                continue
            # [diffusers, its companions, kohya...]: the kohya copies of a step not delivered go
            keep = [rel for rel in record.lora if "kohya" not in Path(rel).name]
            for rel in record.lora:
                if rel not in keep:
                    (out / rel).unlink(missing_ok=True)
            record.lora = keep
        return paths

    def scores_json(self, choice: Choice) -> dict[str, Any]:
        spec = self.ctx.spec
        return {
            **choice.to_json(),
            "holdout": spec.validation.holdout,
            "scorer": spec.validation.scorer,
            "steps": [r.to_json() for r in sorted(self.records, key=lambda r: r.step)],
        }

    # -- checkpoints -----------------------------------------------------------------------------
    def write_carry(self, folder: Path) -> None:
        """The scores, kept LoRAs and renders so far, into a checkpoint folder."""
        out, carry = self.ctx.out_dir, folder / CARRY
        shutil.rmtree(carry, ignore_errors=True)
        carry.mkdir(parents=True)
        for name in (STEPS_DIR, "samples"):
            if (out / name).is_dir():
                shutil.copytree(out / name, carry / name)
        doc = {"steps": [r.to_json() for r in self.records]}
        (carry / SCORES_FILE).write_text(json.dumps(doc) + "\n")

    def restore(self, ckpt_folder: Path, ckpt_step: int) -> list[Path]:
        """The records of the steps before a checkpoint, and their files, into this run's output.
        Returns the restored renders. The carry is in the checkpoint (``carry/``), or, for the final
        checkpoint of a finished job (``resume/``), the job's output around it."""
        carry = ckpt_folder / CARRY
        if not (carry / SCORES_FILE).is_file():
            carry = ckpt_folder.parent
        if not (carry / SCORES_FILE).is_file():
            log("selection: the checkpoint carries no earlier scores; only the steps from here on are scored")
            return []
        out = self.ctx.out_dir
        docs = json.loads((carry / SCORES_FILE).read_text())["steps"]
        self.records = [StepScores.from_json(d) for d in docs if int(d["step"]) <= ckpt_step]
        for name in (STEPS_DIR, "samples"):
            if (carry / name).is_dir() and (carry / name).resolve() != (out / name).resolve():
                shutil.copytree(carry / name, out / name, dirs_exist_ok=True)
        for record in self.records:  # a finished job delivered its chosen step at the top level
            if any("/" not in rel for rel in record.lora):
                folder = step_folder(out, record.step)
                folder.mkdir(parents=True, exist_ok=True)
                for rel in record.lora:
                    shutil.copyfile(carry / rel, folder / Path(rel).name)
                record.lora = [str((folder / Path(rel).name).relative_to(out)) for rel in record.lora]
        kept = {rel for r in self.records for rel in r.renders}
        log(f"selection: {len(self.records)} earlier step(s) restored from the checkpoint")
        return sorted(out / rel for rel in kept if (out / rel).is_file())


def _index(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])


def _summary(record: StepScores) -> str:
    parts = [f"{m} {v:.4f}" for m in record.samples if (v := record.mean(m)) is not None]
    return ", ".join(parts) or "nothing scored (no validation.holdout or validation.scorer)"
