"""One training job, top to bottom: stage -> load -> cache -> train -> export.

``run_training`` is the recipe: each phase is a small named function, and the optimizer-step
loop itself is ``Trainer.fit`` (train/trainer.py), with validation renders and checkpoints as
step hooks. The unit of work is one optimizer step (``gradient_accumulation_steps``
micro-batches of the global batch).

Data parallel (``accelerate`` DDP, 1-8 processes): every process caches the whole dataset,
draws the same global batch and the same random numbers, and trains on its slice of both;
gradients are averaged by DDP. N processes therefore compute what one process with the
global batch would (up to float summation order). Only the main process writes outputs.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, KwargsHandler, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from transformers.utils import logging as transformers_logging

from . import lycoris, progress
from .autocaption import apply_autocaption
from .cache import LatentCache, build_cache
from .checkpoint import (
    Checkpoint,
    check_compatible,
    load_trainable,
    open_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from .clips import frame_strip, write_clip
from .data import (
    DataLimits,
    StagedDataset,
    add_trigger_word,
    dataset_report_lines,
    stage_dataset,
    swap_trigger_word,
)
from .edit import ValidationControlError, pair_rule, save_sample, side_by_side, validation_control_sets
from .export import (
    CONTACT_SHEET,
    KOHYA_FILE,
    SCORE_PLOT,
    export_weights,
    trainable_state,
    write_config,
    write_contact_sheet,
    write_loss_plot,
    write_model_card,
    write_score_plot,
)
from .families import model_info
from .fp8 import fp8_supported
from .memory import MemoryPlan, choose_memory_plan, enable_checkpointing
from .models import family_for
from .models.base import Family
from .selection import Choice, SelectionError, split_holdout
from .spec import TrainingSpec
from .speed import (
    apply_attention_backend,
    apply_compile,
    apply_structure_levers,
    cache_fits_on_device,
    resident_weight_bytes,
)
from .steps import SCORES_FILE, STEPS_DIR, KeepSteps, isolated_rng
from .trainer import Periodic, RunContext, Trainer, TrainingError, TrainState, log, micro_step
from .weights import resolve_base_weights

RESUME_DIR = "resume"  # the final resumable checkpoint (spec.resumable), inside the output

__all__ = ["TrainResult", "TrainingError", "check_machine", "micro_step", "run_training"]


@dataclass
class TrainResult:
    out_dir: Path
    weights: list[Path]  # the LoRA files, or the model folder of a full fine-tune
    samples: list[Path]
    loss_plot: Path
    config: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    checksum: str = ""  # sha256 of the trained weights (identical on every rank)
    chosen_step: int = 0  # the step whose weights were delivered (train/selection.py)
    scores: Path | None = None  # scores.json

    @property
    def lora_file(self) -> Path:
        return self.weights[0]

    @property
    def kohya_file(self) -> Path | None:
        """The kohya / ComfyUI-named copy; None where the family has no such convention."""
        return next((p for p in self.weights if p.name == KOHYA_FILE), None)


def _quiet_libraries() -> None:
    """Library progress bars and advisories would drown the progress lines in Cog's log."""
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def check_machine(spec: TrainingSpec, cuda: bool) -> None:
    """Settings that the validated spec allows but this machine cannot run; fail before loading."""
    problems = []
    if spec.optimizer == "adamw8bit" and not cuda:
        problems.append("optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU; use adamw or prodigy on a CPU")
    if spec.precision == "fp16" and not cuda:
        # accelerate runs fp16 with autocast and loss scaling on a GPU only: on a CPU it would be
        # fp16 weights without either, a path no GPU run takes (bf16 is the GPU's path here)
        problems.append(
            "precision: fp16 needs a GPU (accelerate has no fp16 autocast on a CPU); use bf16 or fp32"
        )
    if spec.speed.fp8_base == "on" and cuda:
        why = fp8_supported(torch.device("cuda"))
        if why:
            problems.append(f"speed.fp8_base: {why}; set it to off")
        elif _precision(spec, cuda)[1] != torch.bfloat16:  # the row-scaled fp8 kernels write bf16 only
            problems.append(
                f"speed.fp8_base: needs bf16 precision on a GPU (precision is {spec.precision}); "
                "use precision auto or bf16"
            )
    if problems:
        raise TrainingError("; ".join(problems))


def _precision(spec: TrainingSpec, cuda: bool) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen base weights)."""
    choice = spec.precision
    if choice == "auto":
        choice = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    return {"bf16": ("bf16", torch.bfloat16), "fp16": ("fp16", torch.float16), "fp32": ("no", torch.float32)}[
        choice
    ]


def build_optimizer(
    spec: TrainingSpec, params: list[torch.nn.Parameter], cuda: bool
) -> torch.optim.Optimizer:
    lr = spec.learning_rate
    assert lr is not None, "the spec resolves the learning rate's default"
    if spec.optimizer == "adamw8bit":
        try:  # the GPU extra; absent on a CPU machine, where check_machine refuses adamw8bit anyway
            import bitsandbytes as bnb  # pyright: ignore[reportMissingImports]
        except ImportError:
            raise TrainingError(
                "optimizer: adamw8bit needs bitsandbytes (pip install 'advanced-trainer[gpu]')"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=spec.weight_decay)
    if spec.optimizer == "prodigy":
        from prodigyopt import Prodigy  # imported only when chosen

        return Prodigy(
            params,
            lr=lr,
            weight_decay=spec.weight_decay,  # pyright: ignore[reportArgumentType]  # typed int, takes a float
            safeguard_warmup=True,
            use_bias_correction=True,
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay, fused=cuda)


def make_trainable(spec: TrainingSpec, model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """LoRA (or LoKr / LoHa): peft adapters in fp32 on the frozen base. Full: every denoiser weight."""
    if spec.mode == "lora":
        alpha = spec.lora.alpha
        assert alpha is not None, "the spec resolves lora.alpha's default"
        if spec.lora.type in lycoris.KINDS:  # LoKr / LoHa: peft's own LyCORIS layers (train/lycoris.py)
            config = lycoris.training_config(
                spec.lora.type, spec.lora.rank, alpha, spec.lora.factor, spec.lora_target_modules()
            )
        else:
            config = LoraConfig(
                r=spec.lora.rank,
                lora_alpha=alpha,  # pyright: ignore[reportArgumentType]  # peft types it int; a float alpha is valid
                lora_dropout=spec.lora.dropout,
                init_lora_weights="gaussian",
                target_modules=spec.lora_target_modules(),
            )
        try:
            cast(Any, model).add_adapter(config)  # diffusers' PeftAdapterMixin
        except ValueError as exc:  # peft: none of the target modules exist in this model
            raise TrainingError(f"lora.targets: {exc}") from None
        if spec.lora.type in lycoris.KINDS:
            n = lycoris.factored_forward(model)
            log(f"{spec.lora.type}: {n} linear layers multiply through the factors (train/lycoris.py)")
        if spec.lora.type == "lokr" and (odd := lycoris.lopsided(model, spec.lora.factor)):
            log(
                f"warning: lora.factor {spec.lora.factor} is more than the square root of {len(odd)} layer "
                f"side(s) (e.g. {odd[0]}): their first LoKr factor is the larger one, which ComfyUI and "
                "Forge load but LyCORIS's own reader refuses; a smaller factor (or -1) avoids it"
            )
        cast_training_params(model, dtype=torch.float32)  # LoRA weights train in fp32 under bf16 autocast
    else:
        # Full fine-tune: weights train in the base dtype (fp32 on a CPU; bf16 on a GPU, where fp32
        # master weights of Flux would not fit beside AdamW's moments).
        model.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _load_trainable(spec: TrainingSpec, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if spec.mode == "lora":
        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainingError(
                f"resume_from: the checkpoint's LoRA does not fit this model ({unexpected[:3]})"
            )
    else:
        model.load_state_dict(state)


def weights_checksum(params: list[torch.nn.Parameter]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_training(
    spec: TrainingSpec, data: Path, out_dir: Path, keep_work: bool = False, resume_from: Path | None = None
) -> TrainResult | None:
    """Train ``spec`` on ``data`` (archive or folder) and write the output folder ``out_dir``.

    Returns the result on the main process (None on the other data-parallel processes).
    """
    _quiet_libraries()
    ctx = open_run(spec, Path(out_dir))
    ckpt = open_resume(ctx, resume_from)
    dataset, held = split_holdout_images(ctx, apply_autocaption(ctx, stage(ctx, Path(data))))
    family = load_family(ctx)
    prompts = validation_prompts(spec, dataset)
    cache, holdout = cache_dataset(ctx, family, dataset, prompts, held)
    load_denoiser(ctx, family)
    renders = RenderSamples(spec.validation.interval, spec.steps)
    keeper = KeepSteps(ctx, dataset, holdout)
    hooks: list = [renders, keeper, SaveCheckpoint(spec.checkpoint_interval, spec.steps, keeper)]
    trainer = build_trainer(ctx, family, cache, hooks)
    if ckpt is not None:
        resume(trainer, ckpt)
        if ctx.main:
            renders.paths = keeper.restore(ckpt.folder, ckpt.step)

    trainer.fit()

    checksum = weights_checksum(trainer.params)
    if ctx.world > 1:
        log(f"data parallel: process {ctx.rank} final weights sha256 {checksum}")
    renders(trainer, spec.steps)  # the final samples, on every run
    keeper(trainer, spec.steps)  # the final step is always kept and scored
    if trainer.ema is not None and ctx.main:  # the last step's own weights, to compare with the average
        export_weights(
            spec, trainer.family, trainer.unwrapped, ctx.out_dir / STEPS_DIR / f"raw-step-{spec.steps}"
        )
    if spec.resumable:  # a checkpoint of the final step, in the output: the job can be continued
        save_resumable(trainer, ctx.out_dir / RESUME_DIR, None)
    ctx.accelerator.wait_for_everyone()
    if not ctx.main:
        return None
    return finish(ctx, trainer, dataset, prompts, renders.paths, checksum, ckpt, keep_work, keeper)


def split_holdout_images(
    ctx: RunContext, dataset: StagedDataset
) -> tuple[StagedDataset, StagedDataset | None]:
    """(training images, held-out images or None): ``validation.holdout`` images never train."""
    spec = ctx.spec
    try:
        train_names, held_names = split_holdout(
            [r.name for r in dataset.images], spec.validation.holdout, spec.seed
        )
    except SelectionError as exc:
        raise TrainingError(str(exc)) from None
    if not held_names:
        return dataset, None
    held = set(held_names)
    log(f"selection: {len(held)} image(s) held out for the validation loss: {', '.join(held_names)}")
    train = replace(dataset, images=[r for r in dataset.images if r.name not in held])
    return train, replace(dataset, images=[r for r in dataset.images if r.name in held], skipped=[])


def _fresh_accelerator_state(mixed: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second precision in it, so a
    second run in one process (the Python API, the tests) with another precision would fail at
    start. The state is started afresh then; the process group (its PartialState) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def open_run(spec: TrainingSpec, out_dir: Path) -> RunContext:
    """Checks the machine, picks the precision and the attention backend, starts accelerate."""
    cuda = torch.cuda.is_available()
    check_machine(spec, cuda)
    mixed, weight_dtype = _precision(spec, cuda)
    attention_note = apply_attention_backend(spec.speed.attention, cuda)
    _fresh_accelerator_state(mixed)
    # two experts (Wan 2.2 A14B): a step whose items are all one expert's leaves the other's LoRA
    # without a gradient, which DDP must be told to expect
    handlers: list[KwargsHandler] = (
        [DistributedDataParallelKwargs(find_unused_parameters=True)]
        if model_info(spec.model).experts > 1
        else []
    )
    accelerator = Accelerator(
        mixed_precision=mixed,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        cpu=not cuda,
        kwargs_handlers=handlers,
    )
    ctx = RunContext(spec, accelerator, out_dir, cuda, weight_dtype, attention_note)
    if ctx.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.world > 1:
        log(f"data parallel: process {ctx.rank} of {ctx.world} on {ctx.device}")
    if ctx.main and not cuda and mixed == "bf16":
        log(
            "precision: bf16 on a CPU: the GPU's dtype path (frozen weights in bf16, a LoRA in fp32 under "
            "bf16 autocast), slower than fp32 here"
        )
    return ctx


def open_resume(ctx: RunContext, resume_from: Path | None) -> Checkpoint | None:
    if resume_from is None:
        return None
    ckpt = open_checkpoint(Path(resume_from), ctx.work / f"rank{ctx.rank}")
    check_compatible(ckpt, ctx.spec)
    log(f"resume: from step {ckpt.step} ({ckpt.folder})")
    return ckpt


def stage(ctx: RunContext, data: Path) -> StagedDataset:
    """Unpacks and checks the dataset on the main process; the others read what it unpacked."""
    spec = ctx.spec
    ctx.announce("stage")
    with ctx.phase("stage"):
        d = spec.dataset
        limits = DataLimits(d.max_files, d.max_bytes, d.max_image_pixels, d.max_clip_frames)
        args = (limits, spec.trigger_word, d.default_caption, d.trigger_word_position)
        rules = {"pairs": pair_rule(spec), "video": spec.video_rule()}
        dataset = stage_dataset(data, ctx.work, *args, **rules) if ctx.main else None
        ctx.accelerator.wait_for_everyone()
        if dataset is None:
            folder = data if data.is_dir() else ctx.work / "dataset"
            dataset = stage_dataset(folder, ctx.work, *args, **rules)
    return dataset


def load_family(ctx: RunContext) -> Family:
    """The family's text encoders and VAE in the base dtype, on the device; the denoiser loads
    after caching (``load_denoiser``), so the two are never on the device together."""
    ctx.announce("load")
    base = ctx.spec.base_weights
    assert base is not None, "the spec resolves base_weights' default"
    with ctx.phase("base_weights"):  # the cache, or a fetch (a per-base archive, the Hub): cold boots
        folder = resolve_base_weights(base)
    with ctx.phase("load"):
        family = family_for(ctx.spec, folder)
        family.check_base()
        family.load_encoders(ctx.weight_dtype)
        for name in family.frozen_names():
            getattr(family.pipe, name).to(ctx.device)
    return family


def load_denoiser(ctx: RunContext, family: Family) -> None:
    """The denoiser, once the text encoders are gone (its weights stay on the CPU until the
    trainer is built: the speed levers convert it there)."""
    with ctx.phase("load"):
        family.load_denoiser(ctx.weight_dtype)


def validation_prompts(spec: TrainingSpec, dataset: StagedDataset) -> list[str]:
    prompts = [
        add_trigger_word(p, spec.trigger_word, spec.dataset.trigger_word_position)
        for p in spec.validation.prompts
    ]
    return prompts or [dataset.images[0].caption or spec.trigger_word or "a picture"]


def cache_dataset(
    ctx: RunContext, family: Family, dataset: StagedDataset, prompts: list[str], held: StagedDataset | None
) -> tuple[LatentCache, LatentCache | None]:
    """Latents and text embeddings, once (and of the held-out images, apart); the encoders leave the
    device afterwards."""
    spec, device, cuda = ctx.spec, ctx.device, ctx.cuda
    with ctx.phase("cache"):
        on_item = (lambda i, n: progress.emit(progress.format_progress("cache", i, n))) if ctx.main else None
        args = (spec.resolutions, prompts, device, spec.dataset.max_image_pixels)
        kw: dict[str, Any] = {"video": spec.video_rule(), "seed": spec.seed}
        if spec.preservation.on:  # each caption's preservation prompt, embedded beside it
            kw["preserve"] = partial(
                swap_trigger_word, trigger=spec.trigger_word, replacement=spec.preservation.class_word.strip()
            )
        try:
            controls = validation_control_sets(spec, dataset, held)
        except ValidationControlError as exc:
            raise TrainingError(str(exc)) from None
        cache = build_cache(family, dataset, *args, on_item, controls, **kw)
        holdout = (
            build_cache(family, held, *args, video=kw["video"], seed=spec.seed) if held is not None else None
        )
        family.release_text_encoders()  # not needed again: every prompt is cached
        family.pipe.vae.to("cpu")  # back only for validation renders
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if cache_fits_on_device(
        spec.speed.cache_on_device, cache.nbytes(), torch.cuda.mem_get_info(device)[0] if cuda else None
    ):
        cache.to(device, ctx.weight_dtype)
        log(f"cache: {cache.nbytes() / 2**20:.1f} MiB of latents and text embeddings kept on {device}")
    buckets = cache.bucket_counts()
    if ctx.main:
        for line in dataset_report_lines(dataset, buckets):
            log(line)
        report = {**dataset.report(), "buckets": buckets}
        if held is not None:
            report["held_out"] = [r.name for r in held.images]
        (ctx.out_dir / "dataset_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return cache, holdout


def build_trainer(ctx: RunContext, family: Family, cache: LatentCache, hooks: list) -> Trainer:
    """The denoiser made trainable, the speed levers and the memory plan applied, the optimizer."""
    spec, cuda = ctx.spec, ctx.cuda
    model = family.denoiser
    model.to(ctx.device)
    set_seed(spec.seed)  # LoRA initialisation (and dropout) draw from the global generators
    params = make_trainable(spec, model)
    lever_lines = apply_structure_levers(spec, model, cuda)  # fp8 changes what the weights take
    plan = _memory_plan(ctx, model, sum(p.numel() for p in params), cache)
    for line in [ctx.attention_note, *lever_lines, *apply_compile(spec, model, cuda)]:
        log(line)
    model.train()
    _log_trainable(spec, params, model)
    optimizer = build_optimizer(spec, params, cuda)
    lr_scheduler = get_scheduler(
        spec.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=spec.lr_warmup_steps,
        num_training_steps=spec.steps,
    )
    model, optimizer = ctx.accelerator.prepare(model, optimizer)
    state = TrainState.fresh(cache, spec.batch_size * ctx.world, spec.seed, ctx.device)
    trainer = Trainer(ctx, family, cache, model, params, optimizer, lr_scheduler, plan, state, hooks)
    if spec.ema.on:  # in fp32 beside the fp32 LoRA weights: a few MB
        trainer.ema = EMAModel(
            params, decay=spec.ema.decay, update_after_step=spec.ema.start_step, foreach=True
        )
        log(
            f"ema: the delivered weights are a moving average (decay {spec.ema.decay:g} from step {spec.ema.start_step})"
        )
    return trainer


def _memory_plan(ctx: RunContext, model: torch.nn.Module, n_trainable: int, cache: LatentCache) -> MemoryPlan:
    spec = ctx.spec
    if ctx.cuda:
        torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(ctx.device)[0] if ctx.cuda else None
    plan = choose_memory_plan(
        spec.memory_policy,
        free,
        model=spec.model,
        weight_bytes=resident_weight_bytes(model),
        trainable_params=n_trainable,
        optimizer=spec.optimizer,
        resolution=max(spec.resolutions),
        batch_size=spec.batch_size,
        text_tokens=getattr(spec.model_options, "max_sequence_length", None),
        controls=max((len(it.controls) for it in cache.items), default=0),  # each as long as the target
        frames=max((it.frames for it in cache.items), default=0) or None,  # a video model's longest sample
        adapter=spec.lora.type if spec.mode == "lora" else "lora",
    )
    log(plan.reason)
    if plan.gradient_checkpointing:
        log(enable_checkpointing(model, plan.checkpoint_fraction))
    return plan


def _log_trainable(spec: TrainingSpec, params: list[torch.nn.Parameter], model: torch.nn.Module) -> None:
    """What trains, in which dtype, on a base in which dtype (the GPU path: fp32 LoRA on a bf16 base)."""
    n = sum(p.numel() for p in params)
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params}))
    if spec.mode == "lora":
        frozen = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad}
        log(
            f"lora: rank {spec.lora.rank}, alpha {spec.lora.alpha:g}, {n / 1e6:.2f} M trainable parameters "
            f"in {dtypes} on a {'/'.join(sorted(frozen))} base"
        )
    else:
        log(f"full fine-tune: {n / 1e6:.2f} M trainable parameters in {dtypes}")


def resume(trainer: Trainer, ckpt: Checkpoint) -> None:
    """Weights, optimizer, schedule, data order and random generators as the checkpoint left them."""
    _load_trainable(trainer.spec, trainer.unwrapped, load_trainable(ckpt))
    state = restore_training_state(ckpt, trainer.optimizer, trainer.lr_scheduler, trainer.ema)
    trainer.state.load_state_dict(state)


class RenderSamples(Periodic):
    """Step hook: validation images every ``validation.interval`` steps (and at the end)."""

    def __init__(self, interval: int, last: int):
        super().__init__(interval, last)
        self.paths: list[Path] = []

    def __call__(self, trainer: Trainer, step: int) -> None:
        with trainer.ctx.phase("validate"), isolated_rng(trainer.ctx), trainer.delivered():
            self.paths = [p for p in self.paths if not p.name.startswith(f"step-{step:06d}-")]
            self.paths += render_samples(trainer, step)


class SaveCheckpoint(Periodic):
    """Step hook: a resumable checkpoint every ``checkpoint_interval`` steps, carrying the kept steps."""

    def __init__(self, interval: int, last: int, keeper: KeepSteps):
        super().__init__(interval, last)
        self.keeper = keeper

    def __call__(self, trainer: Trainer, step: int) -> None:
        save_resumable(trainer, trainer.ctx.out_dir / "checkpoints" / f"step-{step:06d}", self.keeper)


def save_resumable(trainer: Trainer, folder: Path, keeper: KeepSteps | None) -> None:
    """A checkpoint of the current step into ``folder`` (main process; the others wait)."""
    ctx, spec = trainer.ctx, trainer.spec
    if ctx.main:  # DDP keeps every process's state identical: one copy is enough
        save_checkpoint(
            folder,
            spec,
            trainable_state(spec, trainer.unwrapped),
            trainer.optimizer,
            trainer.lr_scheduler,
            trainer.state.state_dict(),
            keeper.write_carry if keeper is not None else None,
            trainer.ema.state_dict() if trainer.ema is not None else None,
        )
        log(f"checkpoint: step {trainer.state.step} saved to {folder}")
    ctx.accelerator.wait_for_everyone()


def render_samples(trainer: Trainer, step: int) -> list[Path]:
    """Validation images from the main process; the others wait for it."""
    ctx, family = trainer.ctx, trainer.family
    paths: list[Path] = []
    if ctx.main:
        v = ctx.spec.validation
        assert (
            v.resolution and v.num_inference_steps and v.guidance_scale is not None and v.seed is not None
        ), "the spec resolves the validation defaults"
        progress.emit(progress.format_progress("validate", step, ctx.spec.steps))
        model = trainer.unwrapped
        was_training = model.training
        model.eval()
        family.pipe.vae.to(ctx.device)
        out = ctx.out_dir / "samples"
        out.mkdir(exist_ok=True)
        try:
            sets = trainer.cache.validation_controls
            for k, (_, text) in enumerate(trainer.cache.validation):
                controls = list(sets[k].images) if sets else None
                with ctx.accelerator.autocast():
                    img = family.render(
                        text,
                        v.resolution,
                        v.num_inference_steps,
                        v.guidance_scale,
                        v.seed + k,
                        ctx.device,
                        controls=controls,
                    )
                if controls and not isinstance(img, list):  # an edit: control(s) | result
                    img = side_by_side([*controls, img])
                path = out / f"step-{step:06d}-{k}.png"
                if isinstance(img, list):  # a video model's frames: the .mp4, and a strip of them
                    assert ctx.spec.video.fps is not None, "the spec resolves video.fps for a video model"
                    write_clip(path.with_suffix(".mp4"), img, ctx.spec.video.fps)
                    img = frame_strip(img)
                save_sample(img, path)
                paths.append(path)
        finally:
            family.pipe.vae.to("cpu")
            model.train(was_training)
        what = "video(s)" if model_info(ctx.spec.model).video else "image(s)"
        log(f"validation: {len(paths)} {what} at step {step} in {out}")
    ctx.accelerator.wait_for_everyone()
    return paths


def finish(
    ctx: RunContext,
    trainer: Trainer,
    dataset: StagedDataset,
    prompts: list[str],
    samples: list[Path],
    checksum: str,
    ckpt: Checkpoint | None,
    keep_work: bool,
    keeper: KeepSteps,
) -> TrainResult:
    """Choose the step, export its weights, the reports and config.json (main process only)."""
    spec, out_dir, history = ctx.spec, ctx.out_dir, trainer.state.history
    progress.emit(progress.format_progress("export", 0, 1))
    with ctx.phase("export"):
        choice = keeper.choose()
        log(f"selection: step {choice.step} delivered: {choice.reason}")
        if spec.mode == "full":
            weights = export_weights(spec, trainer.family, trainer.unwrapped, out_dir)
        else:
            weights = keeper.deliver(choice)
        _write_reports(spec, dataset, history, prompts, out_dir, keeper, choice)
    if not keep_work:
        shutil.rmtree(ctx.work, ignore_errors=True)
    timings = ctx.timings
    timings["total"] = sum(
        v for k, v in timings.items() if k not in ("total", "first_step")
    )  # first_step: in train
    write_config(
        out_dir / "config.json",
        spec,
        dataset.dataset_hash,
        timings,
        {
            "steps_done": spec.steps,
            "resumed_from_step": ckpt.step if ckpt else None,
            "final_loss": history[-1][1] if history else None,
            "images_used": len(dataset.images),
            "processes": ctx.world,
            "memory_plan": _plan_facts(ctx, trainer.plan),
            "weights_sha256_16": checksum,
            "files": [str(p.relative_to(out_dir)) for p in weights],
            "chosen_step": choice.step,
            "selection": choice.to_json(),
            "kept_steps": sorted(r.step for r in keeper.records if r.lora),
            "resumable": RESUME_DIR if spec.resumable else None,
        },
    )
    progress.emit(progress.format_progress("done", spec.steps, spec.steps))
    return TrainResult(
        out_dir,
        weights,
        samples,
        out_dir / "loss.png",
        out_dir / "config.json",
        list(history),
        timings,
        checksum,
        choice.step,
        out_dir / SCORES_FILE,
    )


def _plan_facts(ctx: RunContext, plan: MemoryPlan) -> dict[str, Any]:
    peak = round(torch.cuda.max_memory_allocated(ctx.device) / 2**30, 2) if ctx.cuda else None
    estimate = None if plan.estimate_bytes is None else round(plan.estimate_bytes / 2**30, 2)
    return {
        "gradient_checkpointing": plan.gradient_checkpointing,
        "checkpoint_fraction": plan.checkpoint_fraction,
        "reason": plan.reason,
        "estimate_gib": estimate,
        "peak_allocated_gib": peak,
    }


def _write_reports(
    spec: TrainingSpec,
    dataset: StagedDataset,
    history: list[tuple[int, float]],
    prompts: list[str],
    out_dir: Path,
    keeper: KeepSteps,
    choice: Choice,
) -> None:
    write_loss_plot(history, out_dir / "loss.png")
    (out_dir / SCORES_FILE).write_text(json.dumps(keeper.scores_json(choice), indent=1) + "\n")
    records = sorted(keeper.records, key=lambda r: r.step)
    write_score_plot(records, choice.step, out_dir / SCORE_PLOT)
    if any(r.renders for r in records):
        write_contact_sheet(records, prompts, choice.step, out_dir, out_dir / CONTACT_SHEET)
    ema = None
    for _, v in history:
        ema = v if ema is None else 0.9 * ema + 0.1 * v
    chosen = next(r for r in records if r.step == choice.step)
    shown = list(zip(prompts, chosen.renders, strict=False))
    write_model_card(out_dir / "README.md", spec, shown, ema, len(dataset.images), choice)
