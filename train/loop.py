"""One training job, top to bottom: stage -> load -> cache -> train -> export.

The unit of work is one optimizer step (``gradient_accumulation_steps`` micro-batches of
the global batch). Everything else — caching, validation renders, checkpoints, export — is
a small named function called from ``run_training``.

Data parallel (``accelerate`` DDP, 1-8 processes): every process caches the whole dataset,
draws the same global batch and the same random numbers, and trains on its slice of both;
gradients are averaged by DDP. N processes therefore compute what one process with the
global batch would (up to float summation order). Only the main process writes outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import progress
from .data import DataLimits, StagedDataset, add_trigger_word, dataset_report_lines, stage_dataset
from .spec import TrainingSpec
from .weights import resolve_base_weights


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, an unusable setting for this machine); the message says why."""


@dataclass
class TrainResult:
    out_dir: Path
    weights: list[Path]          # the LoRA files, or the model folder of a full fine-tune
    samples: list[Path]
    loss_plot: Path
    config: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    checksum: str = ""           # sha256 of the trained weights (identical on every rank)

    @property
    def lora_file(self) -> Path:
        return self.weights[0]

    @property
    def kohya_file(self) -> Path:
        return self.weights[1]


def log(msg: str) -> None:
    progress.emit(msg)


@contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _quiet_libraries() -> None:
    """Library progress bars and advisories would drown the progress lines in Cog's log."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_machine(spec: TrainingSpec, cuda: bool) -> None:
    """Settings that the validated spec allows but this machine cannot run; fail before loading."""
    problems = []
    if spec.optimizer == "adamw8bit" and not cuda:
        problems.append("optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU; use adamw or prodigy on a CPU")
    if spec.precision in ("bf16", "fp16") and not cuda:
        problems.append(f"precision: {spec.precision} needs a GPU here; use auto or fp32 on a CPU")
    if spec.speed.fp8_base == "on" and cuda:
        from .fp8 import fp8_supported

        why = fp8_supported(torch.device("cuda"))
        if why:
            problems.append(f"speed.fp8_base: {why}; set it to off")
        elif _precision(spec, cuda)[1] != torch.bfloat16:  # the row-scaled fp8 kernels write bf16 only
            problems.append(f"speed.fp8_base: needs bf16 precision on a GPU (precision is {spec.precision}); "
                            "use precision auto or bf16")
    if problems:
        raise TrainingError("; ".join(problems))


def _precision(spec: TrainingSpec, cuda: bool) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen base weights)."""
    choice = spec.precision
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    return {"bf16": ("bf16", torch.bfloat16), "fp16": ("fp16", torch.float16), "fp32": ("no", torch.float32)}[choice]


def _optimizer(spec: TrainingSpec, params: list[torch.nn.Parameter], cuda: bool) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("optimizer: adamw8bit needs bitsandbytes (pip install 'advanced-trainer[gpu]')") from None
        return bnb.optim.AdamW8bit(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    if spec.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, safeguard_warmup=True,
                       use_bias_correction=True)
    return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=cuda)


def _make_trainable(spec: TrainingSpec, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """LoRA: peft adapters in fp32 on the frozen base. Full: every denoiser weight."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if spec.mode == "lora":
        config = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                            init_lora_weights="gaussian", target_modules=spec.lora_target_modules())
        try:
            model.add_adapter(config)
        except ValueError as exc:  # peft: none of the target modules exist in this model
            raise TrainingError(f"lora.targets: {exc}") from None
        cast_training_params(model, dtype=torch.float32)  # LoRA weights train in fp32 under bf16 autocast
    else:
        # Full fine-tune: weights train in the base dtype (fp32 on a CPU; bf16 on a GPU, where fp32
        # master weights of Flux would not fit beside AdamW's moments).
        model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(spec: TrainingSpec, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model) if spec.mode == "lora" else model.state_dict()


def _load_trainable(spec: TrainingSpec, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if spec.mode == "lora":
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainingError(f"resume_from: the checkpoint's LoRA does not fit this model ({unexpected[:3]})")
    else:
        model.load_state_dict(state)


def weights_checksum(params: list[torch.nn.Parameter]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_training(spec: TrainingSpec, data: Path, out_dir: Path, keep_work: bool = False,
                 resume_from: Path | None = None) -> TrainResult | None:
    """Train ``spec`` on ``data`` (archive or folder) and write the output folder ``out_dir``.

    Returns the result on the main process (None on the other data-parallel processes).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from .cache import BatchSampler, build_cache, collate
    from .checkpoint import check_compatible, load_trainable, open_checkpoint, restore_training_state
    from .memory import choose_memory_plan
    from .models import family_for
    from .models.base import BatchRandom

    _quiet_libraries()
    out_dir = Path(out_dir)
    work = out_dir / ".work"
    timings: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    check_machine(spec, cuda)
    mixed, weight_dtype = _precision(spec, cuda)
    from .speed import (apply_attention_backend, apply_compile, apply_structure_levers, cache_fits_on_device,
                        resident_weight_bytes)

    attention_note = apply_attention_backend(spec.speed.attention, cuda)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=spec.gradient_accumulation_steps,
                              cpu=not cuda)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        log(f"data parallel: process {rank} of {world} on {device}")

    ckpt = None
    if resume_from is not None:
        ckpt = open_checkpoint(Path(resume_from), work / f"rank{rank}")
        check_compatible(ckpt, spec)
        log(f"resume: from step {ckpt.step} ({ckpt.folder})")

    # -- stage -----------------------------------------------------------------------------------
    if main:
        progress.emit(progress.format_progress("stage", 0, 1))
    with _phase(timings, "stage"):
        limits = DataLimits(spec.dataset.max_files, spec.dataset.max_bytes, spec.dataset.max_image_pixels)
        stage_args = (limits, spec.trigger_word, spec.dataset.default_caption, spec.dataset.trigger_word_position)
        dataset: StagedDataset | None = stage_dataset(data, work, *stage_args) if main else None
        accelerator.wait_for_everyone()  # the other processes read what the main one unpacked
        if not main:
            dataset = stage_dataset(Path(data) if Path(data).is_dir() else work / "dataset", work, *stage_args)
    assert dataset is not None

    # -- load ------------------------------------------------------------------------------------
    if main:
        progress.emit(progress.format_progress("load", 0, 1))
    with _phase(timings, "load"):
        family = family_for(spec, resolve_base_weights(spec.base_weights))
        family.load(weight_dtype)
        for name in family.frozen_names():
            getattr(family.pipe, name).to(device)

    # -- cache -----------------------------------------------------------------------------------
    prompts = [add_trigger_word(p, spec.trigger_word, spec.dataset.trigger_word_position)
               for p in spec.validation.prompts] or [dataset.images[0].caption or spec.trigger_word or "a picture"]
    with _phase(timings, "cache"):
        on_item = (lambda i, n: progress.emit(progress.format_progress("cache", i, n))) if main else None
        cache = build_cache(family, dataset, spec.resolutions, prompts, device, limits.max_image_pixels, on_item)
        for enc in family.text_encoders():
            enc.to("cpu")  # not needed again: every prompt is cached
        family.pipe.vae.to("cpu")  # back only for validation renders
        if cuda:
            torch.cuda.empty_cache()
    if cache_fits_on_device(spec.speed.cache_on_device, cache.nbytes(),
                            torch.cuda.mem_get_info(device)[0] if cuda else None):
        cache.to(device, weight_dtype)
        log(f"cache: {cache.nbytes() / 2**20:.1f} MiB of latents and text embeddings kept on {device}")
    buckets = cache.bucket_counts()
    if main:
        for line in dataset_report_lines(dataset, buckets):
            log(line)
        (out_dir / "dataset_report.json").write_text(json.dumps({**dataset.report(), "buckets": buckets}, indent=2) + "\n")

    # -- model -----------------------------------------------------------------------------------
    model = family.denoiser
    model.to(device)
    set_seed(spec.seed)  # LoRA initialisation (and dropout) draw from the global generators
    params = _make_trainable(spec, model)
    n_trainable = sum(p.numel() for p in params)
    lever_lines = apply_structure_levers(spec, model, cuda)  # fp8 changes what the weights take
    if cuda:
        torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0] if cuda else None
    plan = choose_memory_plan(spec.memory_policy, free, family=spec.family, weight_bytes=resident_weight_bytes(model),
                              trainable_params=n_trainable, optimizer=spec.optimizer,
                              resolution=max(spec.resolutions), batch_size=spec.batch_size,
                              text_tokens=spec.flux.max_sequence_length or 0)
    log(plan.reason)
    if plan.gradient_checkpointing:
        from .memory import enable_checkpointing

        log(enable_checkpointing(model, plan.checkpoint_fraction))
    log(attention_note)
    for line in lever_lines + apply_compile(spec, model, cuda):
        log(line)
    model.train()
    if spec.mode == "lora":
        log(f"lora: rank {spec.lora.rank}, alpha {spec.lora.alpha:g}, {n_trainable / 1e6:.2f} M trainable parameters")
    else:
        log(f"full fine-tune: {n_trainable / 1e6:.2f} M trainable parameters in {params[0].dtype}")
    optimizer = _optimizer(spec, params, cuda)
    lr_scheduler = get_scheduler(spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=spec.lr_warmup_steps,
                                 num_training_steps=spec.steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # -- train -----------------------------------------------------------------------------------
    sampler = BatchSampler(cache, spec.batch_size * world, spec.seed)
    generators = {"noise": torch.Generator(device=device).manual_seed(spec.seed),
                  "caption_dropout": torch.Generator().manual_seed(spec.seed + 1)}
    history: list[tuple[int, float]] = []
    start_step = 1
    if ckpt is not None:
        _load_trainable(spec, accelerator.unwrap_model(model), load_trainable(ckpt))
        restore_training_state(ckpt, optimizer, lr_scheduler, generators)
        sampler.load_state(ckpt.sampler)
        history = list(ckpt.history)
        start_step = ckpt.step + 1
    lo, hi = rank * spec.batch_size, (rank + 1) * spec.batch_size  # this process's slice of the global batch
    samples: list[Path] = []
    bar = _progress_bar(spec.steps, start_step - 1) if main else None
    train_start = time.perf_counter()
    losses: list[torch.Tensor] = []  # this process's micro-batch losses since the last progress line
    reporter = _LossReporter(spec, accelerator, history, bar, start_step - 1, train_start, cuda)
    # memory policy auto on one process: an out-of-memory step is redone with more checkpointing
    fallback = spec.memory_policy == "auto" and world == 1
    for step in range(start_step, spec.steps + 1):
        snapshot = _StepSnapshot(sampler, generators, accelerator) if fallback else None
        while True:
            try:
                step_losses = []
                for _ in range(spec.gradient_accumulation_steps):
                    indices = next(sampler)
                    drop = (torch.rand(len(indices), generator=generators["caption_dropout"])
                            < spec.caption_dropout).tolist()
                    rng = BatchRandom(generators["noise"], len(indices), lo, hi, device)
                    batch = collate(cache, indices[lo:hi], drop[lo:hi], device, weight_dtype, rng)
                    step_losses.append(micro_step(family, model, batch, accelerator, optimizer, params,
                                                  spec.max_grad_norm))
                break
            except torch.cuda.OutOfMemoryError:  # in a forward or backward (micro_step re-raises the rest)
                if snapshot is None:
                    raise
                batch = step_losses = None  # type: ignore[assignment]
                for p in params:  # not optimizer.zero_grad: accelerate's skips it mid-accumulation
                    p.grad = None
                snapshot.restore()
                plan = _more_checkpointing(plan, accelerator.unwrap_model(model), step)
            if cuda:
                torch.cuda.empty_cache()  # out of the except block: its traceback held the step's tensors
        losses += step_losses
        if step == start_step:  # the first step pays for compilation and warm-up: reported on its own
            if cuda:
                torch.cuda.synchronize(device)
            timings["first_step"] = time.perf_counter() - train_start
        # the line of the previous logged step: its loss has reached the host while this step was queued
        reporter.finish()
        lr_used = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        if bar is not None:
            bar.update(1)
        if step % spec.log_every == 0 or step == spec.steps:
            reporter.start(step, losses, lr_used)
            losses = []
        if step == spec.steps or (spec.validation.interval and step % spec.validation.interval == 0) or (
                spec.checkpoint_interval and step % spec.checkpoint_interval == 0):
            reporter.finish()  # a render or a checkpoint must not run on a diverged state
        if spec.validation.interval and step % spec.validation.interval == 0 and step != spec.steps:
            with _phase(timings, "validate"):
                samples += _render_samples(family, accelerator, cache, out_dir, step, device)
        if spec.checkpoint_interval and step % spec.checkpoint_interval == 0 and step != spec.steps:
            _checkpoint(spec, accelerator, model, optimizer, lr_scheduler, sampler, generators, history, out_dir, step)
    if bar is not None:
        bar.close()
    timings["train"] = time.perf_counter() - train_start - timings.get("validate", 0.0)
    checksum = weights_checksum(params)
    if world > 1:
        log(f"data parallel: process {rank} final weights sha256 {checksum}")

    with _phase(timings, "validate"):
        samples += _render_samples(family, accelerator, cache, out_dir, spec.steps, device)

    # -- export ----------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if not main:
        return None
    progress.emit(progress.format_progress("export", 0, 1))
    with _phase(timings, "export"):
        weights = _export(spec, family, accelerator.unwrap_model(model), out_dir)
        _write_reports(spec, dataset, history, samples, prompts, out_dir)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = sum(v for k, v in timings.items() if k not in ("total", "first_step"))  # first_step is part of train
    from .export import write_config

    write_config(out_dir / "config.json", spec, dataset.dataset_hash, timings, {
        "steps_done": spec.steps, "resumed_from_step": ckpt.step if ckpt else None,
        "final_loss": history[-1][1] if history else None, "images_used": len(dataset.images),
        "processes": world, "memory_plan": {"gradient_checkpointing": plan.gradient_checkpointing,
                                            "checkpoint_fraction": plan.checkpoint_fraction,
                                            "reason": plan.reason,
                                            "estimate_gib": None if plan.estimate_bytes is None
                                            else round(plan.estimate_bytes / 2**30, 2),
                                            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                                            if cuda else None},
        "weights_sha256_16": checksum, "files": [str(p.relative_to(out_dir)) for p in weights]})
    progress.emit(progress.format_progress("done", spec.steps, spec.steps))
    return TrainResult(out_dir, weights, samples, out_dir / "loss.png", out_dir / "config.json", history, timings,
                       checksum)


class _StepSnapshot:
    """What a step draws from (batch order, random generators, accumulation counter), to redo it."""

    def __init__(self, sampler, generators: dict[str, torch.Generator], accelerator):
        self.sampler, self.generators, self.accelerator = sampler, generators, accelerator
        self.sampler_state = sampler.state()
        self.rng_states = {k: g.get_state() for k, g in generators.items()}
        self.accumulation_step = accelerator.step

    def restore(self) -> None:
        self.sampler.load_state(self.sampler_state)
        for k, g in self.generators.items():
            g.set_state(self.rng_states[k])
        self.accelerator.step = self.accumulation_step


def _more_checkpointing(plan, model: torch.nn.Module, step: int):
    """The next rung of the memory ladder after an out-of-memory step (memory policy auto)."""
    from dataclasses import replace

    from .memory import CHECKPOINT_LADDER, enable_checkpointing

    current = plan.checkpoint_fraction if plan.gradient_checkpointing else 0.0
    higher = [f for f in CHECKPOINT_LADDER if f > current]
    if not higher:
        raise TrainingError(f"out of GPU memory at step {step} with gradient checkpointing on every block: lower "
                            "batch_size or the largest resolution, or use optimizer adamw8bit")
    fraction = higher[0]
    note = enable_checkpointing(model, fraction)
    log(f"memory: out of GPU memory at step {step}; the step is redone with {note} (nothing is lost)")
    return replace(plan, gradient_checkpointing=True, checkpoint_fraction=fraction,
                   reason=f"{plan.reason}; raised to {fraction:.0%} after running out of memory at step {step}")


class _LossReporter:
    """Progress lines without a host sync per step.

    On a logged step the mean loss since the last line (over all processes) starts its copy to
    the host; the line is written one step later, once the GPU has the next step queued, so
    reading the value never leaves the GPU idle. A non-finite loss stops the run at that point
    (before any render or checkpoint of the diverged state).
    """

    def __init__(self, spec: TrainingSpec, accelerator, history: list[tuple[int, float]], bar, last_step: int,
                 last_time: float, cuda: bool):
        self.spec, self.accelerator, self.history, self.bar, self.cuda = spec, accelerator, history, bar, cuda
        self.last_step, self.last_time = last_step, last_time
        self.pending: tuple[int, torch.Tensor, Any, float] | None = None

    def start(self, step: int, losses: list[torch.Tensor], lr: float) -> None:
        mean = self.accelerator.reduce(torch.stack(losses).float().mean(), "mean")
        event = None
        if self.cuda:
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(mean, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            mean = host
        self.pending = (step, mean, event, lr)

    def finish(self) -> None:
        if self.pending is None:
            return
        step, value, event, lr = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        loss = float(value)
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {step}: training diverged. Lower "
                                f"learning_rate (now {self.spec.learning_rate:g}) or use precision fp32/bf16.")
        now = time.perf_counter()
        s_per_step = (now - self.last_time) / (step - self.last_step)
        self.last_time, self.last_step = now, step
        self.history.append((step, loss))
        if self.accelerator.is_main_process:
            progress.emit(progress.format_progress("train", step, self.spec.steps, loss, lr, s_per_step,
                                                   s_per_step * (self.spec.steps - step)))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")


def micro_step(family, model: torch.nn.Module, batch, accelerator, optimizer, params: list[torch.nn.Parameter],
               max_grad_norm: float) -> torch.Tensor:
    """One micro-batch: forward, backward, and — on the last micro-batch of a step — clip and update.

    Returns the loss without reading it back to the host. ``bench/`` times exactly this.
    """
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = family.loss(model, batch)
        accelerator.backward(loss)
        try:
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()  # a no-op until the last micro-batch (accelerate's wrapper)
        except torch.cuda.OutOfMemoryError as exc:
            # not retried: a half-initialised optimizer state or an unscaled fp16 gradient cannot be
            # replayed, and more checkpointing would not shrink the optimizer's memory anyway
            raise TrainingError("out of GPU memory in the optimizer step (its state is allocated on the first "
                                "step): use optimizer adamw8bit, fewer LoRA targets or a lower lora.rank") from exc
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _export(spec: TrainingSpec, family, model: torch.nn.Module, out_dir: Path) -> list[Path]:
    from .export import export_full_model, export_lora

    if spec.mode == "full":
        return [export_full_model(family, model, out_dir / "model")]
    from diffusers.training_utils import _collate_lora_metadata

    meta = _collate_lora_metadata({family.denoiser_name: model})[f"{family.denoiser_name}_lora_adapter_metadata"]
    files = export_lora(family, trainable_state(spec, model), meta, out_dir, spec.lora.alpha, spec.lora.rank)
    return [files["diffusers"], files["kohya"]]


def _write_reports(spec, dataset, history, samples, prompts, out_dir: Path) -> None:
    from .export import write_loss_plot, write_model_card

    write_loss_plot(history, out_dir / "loss.png")
    ema = None
    for _, v in history:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
    final = [(p, str(s.relative_to(out_dir))) for p, s in zip(prompts, samples[-len(prompts):])]
    write_model_card(out_dir / "README.md", spec, final, ema, len(dataset.images))


def _progress_bar(total: int, done: int):
    """A human progress bar on stderr, only when someone watches a terminal."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _render_samples(family, accelerator, cache, out_dir: Path, step: int, device: torch.device) -> list[Path]:
    """Validation images from the main process; the others wait for it."""
    paths: list[Path] = []
    if accelerator.is_main_process:
        spec = family.spec
        v = spec.validation
        progress.emit(progress.format_progress("validate", step, spec.steps))
        model = accelerator.unwrap_model(family.denoiser)
        was_training = model.training
        model.eval()
        family.pipe.vae.to(device)
        out = out_dir / "samples"
        out.mkdir(exist_ok=True)
        try:
            for k, (_, text) in enumerate(cache.validation):
                with accelerator.autocast():
                    img = family.render(text, v.resolution, v.num_inference_steps, v.guidance_scale, v.seed + k, device)
                path = out / f"step-{step:06d}-{k}.png"
                img.save(path)
                paths.append(path)
        finally:
            family.pipe.vae.to("cpu")
            model.train(was_training)
        log(f"validation: {len(paths)} image(s) at step {step} in {out}")
    accelerator.wait_for_everyone()
    return paths


def _checkpoint(spec, accelerator, model, optimizer, lr_scheduler, sampler, generators, history, out_dir: Path,
                step: int) -> None:
    from .checkpoint import save_checkpoint

    if accelerator.is_main_process:  # DDP keeps every process's state identical: one copy is enough
        folder = save_checkpoint(out_dir / "checkpoints" / f"step-{step:06d}", step, spec,
                                 trainable_state(spec, accelerator.unwrap_model(model)), optimizer, lr_scheduler,
                                 sampler.state(), generators, history)
        log(f"checkpoint: step {step} saved to {folder}")
    accelerator.wait_for_everyone()


def describe(result: TrainResult) -> dict[str, Any]:
    return {"out_dir": str(result.out_dir), "weights": [str(p) for p in result.weights],
            "samples": [str(p) for p in result.samples], "loss_plot": str(result.loss_plot),
            "config": str(result.config)}
