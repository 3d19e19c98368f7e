"""One training job, top to bottom: stage -> load -> cache -> train -> export.

The unit of work is one optimizer step (``gradient_accumulation_steps`` micro-batches).
Everything else — caching, validation renders, checkpoints, export — is a small named
function called from ``run_training``.
"""

from __future__ import annotations

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
from .data import DataLimits, StagedDataset, dataset_report_lines, stage_dataset
from .spec import TrainingSpec
from .weights import resolve_base_weights


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, an unusable setting for this machine); the message says why."""


@dataclass
class TrainResult:
    out_dir: Path
    lora_file: Path
    kohya_file: Path
    samples: list[Path]
    loss_plot: Path
    config: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
    if spec.mode == "full":
        problems.append("mode: full fine-tuning is not available in this version of the trainer; use lora")
    if problems:
        raise TrainingError("; ".join(problems))


def _precision(spec: TrainingSpec, cuda: bool) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen base weights)."""
    choice = spec.precision
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    return {"bf16": ("bf16", torch.bfloat16), "fp16": ("fp16", torch.float16), "fp32": ("no", torch.float32)}[choice]


def _use_gradient_checkpointing(spec: TrainingSpec, denoiser: torch.nn.Module, cuda: bool) -> tuple[bool, str]:
    if spec.memory_policy == "gradient_checkpointing":
        return True, "memory policy: gradient checkpointing on (asked for in the spec)"
    if spec.memory_policy == "off" or not cuda:
        return False, f"memory policy {spec.memory_policy}: gradient checkpointing off" + ("" if cuda else " (CPU)")
    free, _ = torch.cuda.mem_get_info()
    weight_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    # Activations of a LoRA step at 1024 px are roughly 3-4x the bf16 weights for these models.
    on = free < 4 * weight_bytes
    return on, (f"memory policy auto: {free / 2**30:.1f} GiB free, weights {weight_bytes / 2**30:.1f} GiB -> "
                f"gradient checkpointing {'on' if on else 'off'}")


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


def run_training(spec: TrainingSpec, data: Path, out_dir: Path, keep_work: bool = False) -> TrainResult:
    """Train ``spec`` on ``data`` (archive or folder) and write the output folder ``out_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import _collate_lora_metadata, cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from .cache import BatchSampler, build_cache, collate
    from .export import KOHYA_FILE, export_lora, write_config, write_loss_plot, write_model_card
    from .models import family_for

    _quiet_libraries()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    timings: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    check_machine(spec, cuda)
    mixed, weight_dtype = _precision(spec, cuda)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=spec.gradient_accumulation_steps)
    device = accelerator.device
    set_seed(spec.seed)

    # -- stage -----------------------------------------------------------------------------------
    progress.emit(progress.format_progress("stage", 0, 1))
    with _phase(timings, "stage"):
        limits = DataLimits(spec.dataset.max_files, spec.dataset.max_bytes, spec.dataset.max_image_pixels)
        dataset: StagedDataset = stage_dataset(data, work, limits, spec.trigger_word, spec.dataset.default_caption,
                                               spec.dataset.trigger_word_position)

    # -- load ------------------------------------------------------------------------------------
    progress.emit(progress.format_progress("load", 0, 1))
    with _phase(timings, "load"):
        family = family_for(spec, resolve_base_weights(spec.base_weights))
        family.load(weight_dtype)
        for name in family.frozen_names():
            getattr(family.pipe, name).to(device)

    # -- cache -----------------------------------------------------------------------------------
    from .data import add_trigger_word

    prompts = [add_trigger_word(p, spec.trigger_word, spec.dataset.trigger_word_position)
               for p in spec.validation.prompts] or [dataset.images[0].caption or spec.trigger_word or "a picture"]
    with _phase(timings, "cache"):
        cache = build_cache(family, dataset, spec.resolutions, prompts, device, limits.max_image_pixels,
                            on_item=lambda i, n: progress.emit(progress.format_progress("cache", i, n)))
        for enc in family.text_encoders():
            enc.to("cpu")  # not needed again: every prompt is cached
        family.pipe.vae.to("cpu")  # back only for validation renders
        if cuda:
            torch.cuda.empty_cache()
    buckets = cache.bucket_counts()
    for line in dataset_report_lines(dataset, buckets):
        log(line)
    (out_dir / "dataset_report.json").write_text(json.dumps({**dataset.report(), "buckets": buckets}, indent=2) + "\n")

    # -- model -----------------------------------------------------------------------------------
    model = family.denoiser
    model.to(device)
    lora_config = LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                             init_lora_weights="gaussian", target_modules=spec.lora_target_modules())
    try:
        model.add_adapter(lora_config)
    except ValueError as exc:  # peft: none of the target modules exist in this model
        raise TrainingError(f"lora.targets: {exc}") from None
    cast_training_params(model, dtype=torch.float32)  # LoRA weights train in fp32 under bf16 autocast
    use_ckpt, why = _use_gradient_checkpointing(spec, model, cuda)
    log(why)
    if use_ckpt:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"lora: rank {spec.lora.rank}, alpha {spec.lora.alpha:g}, {sum(p.numel() for p in params) / 1e6:.2f} M "
        f"trainable parameters in {len({n.rsplit('.lora_', 1)[0] for n, p in model.named_parameters() if p.requires_grad})} modules")
    optimizer = _optimizer(spec, params, cuda)
    lr_scheduler = get_scheduler(spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=spec.lr_warmup_steps,
                                 num_training_steps=spec.steps)
    model, optimizer = accelerator.prepare(model, optimizer)

    # -- train -----------------------------------------------------------------------------------
    sampler = BatchSampler(cache, spec.batch_size, spec.seed)
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    drop_gen = torch.Generator().manual_seed(spec.seed + 1)
    text_dtype = weight_dtype
    samples: list[Path] = []
    history: list[tuple[int, float]] = []
    bar = _progress_bar(spec.steps)
    train_start = time.perf_counter()
    last_log_t, last_log_step = train_start, 0
    pending: list[torch.Tensor] = []
    for step in range(1, spec.steps + 1):
        for _ in range(spec.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                indices = next(sampler)
                drop = (torch.rand(len(indices), generator=drop_gen) < spec.caption_dropout).tolist()
                batch = collate(cache, indices, drop, device, text_dtype)
                with accelerator.autocast():
                    loss = family.loss(model, batch, gen)
                accelerator.backward(loss)
                if accelerator.sync_gradients and spec.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
        lr_used = lr_scheduler.get_last_lr()[0]
        lr_scheduler.step()
        if bar is not None:
            bar.update(1)

        if step % spec.log_every == 0 or step == spec.steps:
            step_loss = torch.stack(pending).float().mean().item()  # the only host sync of the step
            pending.clear()
            if not math.isfinite(step_loss):
                raise TrainingError(f"the loss became {step_loss} at step {step}: training diverged. Lower "
                                    f"learning_rate (now {spec.learning_rate:g}) or use precision fp32/bf16.")
            now = time.perf_counter()
            s_per_step = (now - last_log_t) / (step - last_log_step)
            last_log_t, last_log_step = now, step
            history.append((step, step_loss))
            progress.emit(progress.format_progress("train", step, spec.steps, step_loss, lr_used,
                                                   s_per_step, s_per_step * (spec.steps - step)))
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.4f}")
        if spec.validation.interval and step % spec.validation.interval == 0 and step != spec.steps:
            with _phase(timings, "validate"):
                samples += _render_samples(family, accelerator, cache, out_dir, step, device)
        if spec.checkpoint_interval and step % spec.checkpoint_interval == 0 and step != spec.steps:
            _save_checkpoint(out_dir / "checkpoints" / f"step-{step:06d}", step,
                             get_peft_model_state_dict(accelerator.unwrap_model(model)), optimizer, lr_scheduler,
                             sampler, {"noise": gen, "caption_dropout": drop_gen})
    if bar is not None:
        bar.close()
    timings["train"] = time.perf_counter() - train_start - timings.get("validate", 0.0)

    with _phase(timings, "validate"):
        samples += _render_samples(family, accelerator, cache, out_dir, spec.steps, device)

    # -- export ----------------------------------------------------------------------------------
    progress.emit(progress.format_progress("export", 0, 1))
    with _phase(timings, "export"):
        unwrapped = accelerator.unwrap_model(model)
        state = get_peft_model_state_dict(unwrapped)
        meta = _collate_lora_metadata({family.denoiser_name: unwrapped})[f"{family.denoiser_name}_lora_adapter_metadata"]
        files = export_lora(family, state, meta, out_dir, spec.lora.alpha, spec.lora.rank)
        write_loss_plot(history, out_dir / "loss.png")
        ema = None
        for _, v in history:
            ema = v if ema is None else 0.9 * ema + 0.1 * v
        final = [(p, str(s.relative_to(out_dir))) for p, s in zip(prompts, samples[-len(prompts):])]
        write_model_card(out_dir / "README.md", spec, final, ema, len(dataset.images))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    write_config(out_dir / "config.json", spec, dataset.dataset_hash, timings,
                 {"steps_done": spec.steps, "final_loss": history[-1][1] if history else None,
                  "images_used": len(dataset.images), "files": {"lora": files["diffusers"].name, "kohya": KOHYA_FILE}})
    progress.emit(progress.format_progress("done", spec.steps, spec.steps))
    return TrainResult(out_dir, files["diffusers"], files["kohya"], samples, out_dir / "loss.png",
                       out_dir / "config.json", history, timings)


def _progress_bar(total: int):
    """A human progress bar on stderr, only when someone watches a terminal."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _render_samples(family, accelerator, cache, out_dir: Path, step: int, device: torch.device) -> list[Path]:
    spec = family.spec
    v = spec.validation
    progress.emit(progress.format_progress("validate", step, spec.steps))
    model = accelerator.unwrap_model(family.denoiser)
    was_training = model.training
    model.eval()
    family.pipe.vae.to(device)
    out = out_dir / "samples"
    out.mkdir(exist_ok=True)
    paths = []
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
    return paths


def _save_checkpoint(folder: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer, lr_scheduler,
                     sampler, generators: dict[str, torch.Generator]) -> None:
    """Everything needed to continue exactly: adapter, optimizer, schedule, RNG states, data position.

    Only the trainable LoRA weights are saved, never the frozen base (tens of GB for Flux).
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, str(folder / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "generators": {k: g.get_state() for k, g in generators.items()},
                "torch_rng": torch.get_rng_state()}, folder / "training_state.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "sampler": sampler.state()}) + "\n")
    log(f"checkpoint: step {step} saved to {folder}")


def describe(result: TrainResult) -> dict[str, Any]:
    return {"out_dir": str(result.out_dir), "lora": str(result.lora_file), "kohya": str(result.kohya_file),
            "samples": [str(p) for p in result.samples], "loss_plot": str(result.loss_plot),
            "config": str(result.config)}
