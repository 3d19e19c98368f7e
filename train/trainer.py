"""The optimizer-step loop: a ``Trainer`` over a typed ``TrainState``, with hooks after each step.

    for step in steps:
        batch -> train_step (forward, backward, update; an out-of-memory step is redone)
        after_step: progress line, then every hook that is due (renders, checkpoints, ...)

``TrainState`` is everything that decides what the next step draws (step, data-order position,
random generators) and what was learnt so far (loss history). It has ``state_dict`` /
``load_state_dict``: checkpoints save it, resume loads it, and the out-of-memory retry snapshots
it before each step so a redone step draws exactly what the failed one drew.

With ``ema`` on, each step also updates a moving average of the trained weights (diffusers'
``EMAModel``); ``Trainer.delivered()`` puts the average in place for renders and exports.

What happens after a step is a list of ``StepHook``s (``due(step)`` and a call), so new per-step
work (scoring a step, keeping its LoRA) is a new hook, not an edit in the middle of the loop. The
per-family maths stays behind ``Family`` (train/models/base.py); the recipe that builds a
``Trainer`` is train/loop.py.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from . import progress
from .cache import BatchSampler, LatentCache, collate
from .memory import CHECKPOINT_LADDER, MemoryPlan, enable_checkpointing
from .models.base import BatchRandom, Family
from .spec import TrainingSpec


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, an unusable setting for this machine); the message says why."""


def log(msg: str) -> None:
    progress.emit(msg)


@dataclass
class RunContext:
    """What every phase of one run shares: the spec, the processes, the output folder, timings."""

    spec: TrainingSpec
    accelerator: Any  # accelerate.Accelerator
    out_dir: Path
    cuda: bool
    weight_dtype: torch.dtype  # of the frozen base weights
    attention_note: str = ""  # what the attention backend switch did (logged with the other levers)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.out_dir / ".work"

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the time spent in the block to ``timings[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def announce(self, phase: str) -> None:
        if self.main:
            progress.emit(progress.format_progress(phase, 0, 1))


@dataclass
class TrainState:
    """The step, the data order, the random generators and the loss history of a run."""

    sampler: BatchSampler
    generators: dict[str, torch.Generator]
    step: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    @classmethod
    def fresh(cls, cache: LatentCache, global_batch: int, seed: int, device: torch.device) -> TrainState:
        generators = {
            "noise": torch.Generator(device=device).manual_seed(seed),
            "caption_dropout": torch.Generator().manual_seed(seed + 1),
        }
        return cls(BatchSampler(cache, global_batch, seed), generators)

    def state_dict(self) -> dict[str, Any]:
        """Host-side copies (a few hundred bytes): cheap enough to take before every step."""
        return {
            "step": self.step,
            "sampler": self.sampler.state(),
            "history": list(self.history),
            "generators": {name: g.get_state() for name, g in self.generators.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.sampler.load_state(state["sampler"])
        self.history = [(int(s), float(v)) for s, v in state["history"]]
        for name, g in self.generators.items():
            g.set_state(state["generators"][name])


@dataclass
class StepResult:
    losses: list[torch.Tensor]  # this process's micro-batch losses, still on the device
    lr: float  # the learning rate the step used


class StepHook(Protocol):
    """Work after an optimizer step. ``due`` is asked first: the loss of the step is checked
    (a diverged run stops) before any due hook runs."""

    def due(self, step: int) -> bool: ...

    def __call__(self, trainer: Trainer, step: int) -> None: ...


class Periodic:
    """Base of a step hook due every ``interval`` steps (0: never), not on the last step: the end
    of the run has its own final work."""

    def __init__(self, interval: int, last: int):
        self.interval, self.last = interval, last

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0 and step != self.last


class Trainer:
    """Runs optimizer steps from ``state.step + 1`` to ``spec.steps`` and calls the hooks."""

    def __init__(
        self,
        ctx: RunContext,
        family: Family,
        cache: LatentCache,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        optimizer: Any,
        lr_scheduler: Any,
        plan: MemoryPlan,
        state: TrainState,
        hooks: list[StepHook],
    ):
        self.ctx, self.spec, self.family, self.cache = ctx, ctx.spec, family, cache
        self.model, self.params, self.optimizer, self.lr_scheduler = model, params, optimizer, lr_scheduler
        self.plan, self.state, self.hooks = plan, state, hooks
        self.ema: Any = None  # diffusers' EMAModel over ``params`` when ema.decay > 0 (train/loop.py)
        spec = ctx.spec
        self.slice = (ctx.rank * spec.batch_size, (ctx.rank + 1) * spec.batch_size)  # this process's rows
        # memory policy auto on one process: an out-of-memory step is redone with more checkpointing
        self.retry_out_of_memory = spec.memory_policy == "auto" and ctx.world == 1

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.ctx.accelerator.unwrap_model(self.model)

    def fit(self) -> None:
        ctx, spec = self.ctx, self.spec
        first = self.state.step + 1
        bar = progress_bar(spec.steps, first - 1) if ctx.main else None
        start = time.perf_counter()
        reporter = LossReporter(ctx, self.state, bar, first - 1, start)
        losses: list[torch.Tensor] = []  # micro-batch losses since the last progress line
        for step in range(first, spec.steps + 1):
            result = self.train_step(step)
            self.state.step = step
            losses += result.losses
            if step == first:  # the first step pays for compilation and warm-up: reported on its own
                if ctx.cuda:
                    torch.cuda.synchronize(ctx.device)
                ctx.timings["first_step"] = time.perf_counter() - start
            reporter.finish()  # the previous logged step: its loss reached the host while this step ran
            if bar is not None:
                bar.update(1)
            if step % spec.log_every == 0 or step == spec.steps:
                reporter.start(step, losses, result.lr)
                losses = []
            due = [hook for hook in self.hooks if hook.due(step)]
            if due or step == spec.steps:
                reporter.finish()  # a render or a checkpoint must not run on a diverged state
            for hook in due:
                hook(self, step)
        if bar is not None:
            bar.close()
        ctx.timings["train"] = time.perf_counter() - start - ctx.timings.get("validate", 0.0)

    def train_step(self, step: int) -> StepResult:
        """One optimizer step of ``gradient_accumulation_steps`` micro-batches."""
        snapshot = self._snapshot() if self.retry_out_of_memory else None
        while True:
            try:
                losses = [self._micro_batch() for _ in range(self.spec.gradient_accumulation_steps)]
                break
            except torch.cuda.OutOfMemoryError:  # in a forward or backward (micro_step re-raises the rest)
                if snapshot is None:
                    raise
                self._restore(snapshot)
                self.plan = more_checkpointing(self.plan, self.unwrapped, step)
            if self.ctx.cuda:
                torch.cuda.empty_cache()  # out of the except block: its traceback held the step's tensors
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.params)
        return StepResult(losses, lr)

    @contextmanager
    def delivered(self) -> Iterator[None]:
        """The weights a user gets in the block: the moving average when ema is on (renders, kept
        steps, the delivered files), the trained weights again afterwards."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _micro_batch(self) -> torch.Tensor:
        spec, ctx, state = self.spec, self.ctx, self.state
        lo, hi = self.slice
        indices = next(state.sampler)
        drop = (
            torch.rand(len(indices), generator=state.generators["caption_dropout"]) < spec.caption_dropout
        ).tolist()
        rng = BatchRandom(state.generators["noise"], len(indices), lo, hi, ctx.device)
        batch = collate(self.cache, indices[lo:hi], drop[lo:hi], ctx.device, ctx.weight_dtype, rng)
        return micro_step(
            self.family,
            self.model,
            batch,
            ctx.accelerator,
            self.optimizer,
            self.params,
            spec.max_grad_norm,
            spec.preservation.weight if spec.preservation.on else 0.0,
        )

    def _snapshot(self) -> tuple[dict[str, Any], int]:
        """What a step draws from, plus accelerate's accumulation counter."""
        return self.state.state_dict(), self.ctx.accelerator.step

    def _restore(self, snapshot: tuple[dict[str, Any], int]) -> None:
        for p in self.params:  # not optimizer.zero_grad: accelerate's skips it mid-accumulation
            p.grad = None
        self.state.load_state_dict(snapshot[0])
        self.ctx.accelerator.step = snapshot[1]


def micro_step(
    family: Family,
    model: torch.nn.Module,
    batch,
    accelerator,
    optimizer,
    params: list[torch.nn.Parameter],
    max_grad_norm: float,
    preservation: float = 0.0,
) -> torch.Tensor:
    """One micro-batch: forward, backward, and — on the last micro-batch of a step — clip and update.
    ``preservation``: the weight of the output-preservation loss (0: off), added to the training loss.

    Returns the loss without reading it back to the host. ``bench/`` times exactly this.
    """
    with accelerator.accumulate(model):
        with accelerator.autocast():
            draws = batch.rng.generator.get_state() if preservation else None
            loss = family.loss(model, batch)
            if draws is not None:  # the same noise and timesteps, on the preservation prompts
                own = accelerator.unwrap_model(model)  # not a second forward through DDP's bookkeeping
                loss = loss + preservation * preservation_loss(family, own, batch, draws)
        accelerator.backward(loss)
        try:
            if accelerator.sync_gradients and max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()  # a no-op until the last micro-batch (accelerate's wrapper)
        except torch.cuda.OutOfMemoryError as exc:
            # not retried: a half-initialised optimizer state or an unscaled fp16 gradient cannot be
            # replayed, and more checkpointing would not shrink the optimizer's memory anyway
            raise TrainingError(
                "out of GPU memory in the optimizer step (its state is allocated on the first "
                "step): use optimizer adamw8bit, fewer LoRA targets or a lower lora.rank"
            ) from exc
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def preservation_loss(family: Family, model: torch.nn.Module, batch, draws: torch.Tensor) -> torch.Tensor:
    """Output preservation (ai-toolkit's differential output preservation): on each item's
    preservation prompt (its caption with the class word for the trigger word), the squared distance
    between the LoRA's prediction and the base model's, which is the same denoiser with every LoRA
    layer switched off (no copy of the model). Both replay the training pass's random draws
    (``draws``: the generator's state before it), so they see its noisy latents and timesteps; the
    base one carries no gradient. ``model`` is the unwrapped denoiser: under DDP a second forward
    through the wrapper would have its parameters marked ready twice, and a Wan 2.2 expert the
    training pass left idle would get a gradient DDP had already given up on. Costs about one more
    training pass a step."""
    assert batch.preserve_text is not None, (
        "the cache embeds the preservation prompts when preservation is on"
    )
    preserved = replace(batch, text=batch.preserve_text)
    generator = batch.rng.generator
    after = generator.get_state()
    generator.set_state(draws)
    with torch.no_grad(), lora_switched_off(model):
        base, _ = family.prediction(model, preserved)
    generator.set_state(draws)
    pred, _ = family.prediction(model, preserved)
    assert torch.equal(generator.get_state(), after), "the preservation passes drew other random numbers"
    return torch.nn.functional.mse_loss(pred.float(), base.float())


@contextmanager
def lora_switched_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model: every peft LoRA layer of ``model`` disabled for the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def more_checkpointing(plan: MemoryPlan, model: torch.nn.Module, step: int) -> MemoryPlan:
    """The next rung of the memory ladder after an out-of-memory step (memory policy auto)."""
    current = plan.checkpoint_fraction if plan.gradient_checkpointing else 0.0
    higher = [f for f in CHECKPOINT_LADDER if f > current]
    if not higher:
        raise TrainingError(
            f"out of GPU memory at step {step} with gradient checkpointing on every block: lower "
            "batch_size or the largest resolution, or use optimizer adamw8bit"
        )
    fraction = higher[0]
    note = enable_checkpointing(model, fraction)
    log(f"memory: out of GPU memory at step {step}; the step is redone with {note} (nothing is lost)")
    return replace(
        plan,
        gradient_checkpointing=True,
        checkpoint_fraction=fraction,
        reason=f"{plan.reason}; raised to {fraction:.0%} after running out of memory at step {step}",
    )


class LossReporter:
    """Progress lines without a host sync per step.

    On a logged step the mean loss since the last line (over all processes) starts its copy to
    the host; the line is written one step later, once the GPU has the next step queued, so
    reading the value never leaves the GPU idle. A non-finite loss stops the run at that point
    (before any render or checkpoint of the diverged state).
    """

    def __init__(self, ctx: RunContext, state: TrainState, bar: Any, last_step: int, last_time: float):
        self.ctx, self.state, self.bar = ctx, state, bar
        self.last_step, self.last_time = last_step, last_time
        self.pending: tuple[int, torch.Tensor, Any, float] | None = None

    def start(self, step: int, losses: list[torch.Tensor], lr: float) -> None:
        mean = self.ctx.accelerator.reduce(torch.stack(losses).float().mean(), "mean")
        event = None
        if self.ctx.cuda:
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
        spec = self.ctx.spec
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {step}: training diverged. Lower "
                f"learning_rate (now {spec.learning_rate:g}) or use precision fp32/bf16."
            )
        now = time.perf_counter()
        s_per_step = (now - self.last_time) / (step - self.last_step)
        self.last_time, self.last_step = now, step
        self.state.history.append((step, loss))
        if self.ctx.main:
            progress.emit(
                progress.format_progress(
                    "train", step, spec.steps, loss, lr, s_per_step, s_per_step * (spec.steps - step)
                )
            )
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")


def progress_bar(total: int, done: int) -> Any:
    """A human progress bar on stderr, only when someone watches a terminal."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    from tqdm.auto import tqdm  # only for a terminal: keeps tqdm's import off the Cog path

    return tqdm(total=total, initial=done, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
