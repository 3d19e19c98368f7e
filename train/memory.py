"""Memory policy: which savings to switch on for the card a job lands on.

``choose_memory_plan`` is pure (figures in, decision out) so it is tested with simulated
cards. The estimate of a step's peak is

    weights + trainable state + activations

- weights: the denoiser's parameters at their dtype (the VAE and text encoders are off the
  accelerator while training, always);
- trainable state: the trained parameters in fp32 plus their gradients and AdamW moments
  (16 bytes each; 8-bit AdamW: 6; Prodigy: 24);
- activations: bytes per token of the denoiser, per sample, measured with the stock
  diffusers + peft step on an H200 (shared/reference/gpu-baseline.md): Flux-dev keeps about
  7.3 MiB of activations per sequence token (image + text) without checkpointing, SDXL about
  0.46 MiB per latent pixel. Gradient checkpointing keeps only block inputs; we count it as
  cutting activations to a quarter (an upper bound that errs towards turning it on).

Rule for ``auto``: no savings on a CPU (host memory is not the constraint there). On a GPU,
gradient checkpointing goes on when the estimate without it exceeds 90 % of the free memory —
on the smallest share of the blocks (a quarter, half, three quarters, all) whose estimate fits,
because every checkpointed block pays a recomputed forward (selective checkpointing).
The spec overrides: ``off`` never, ``gradient_checkpointing`` always. The choice and the
figures behind it are logged.

The estimate can be wrong (the stock baseline's checkpointed Flux step peaked far above what
this model predicts, for reasons not yet understood), so under ``auto`` on one process a step
that runs out of GPU memory is redone, with the same batch and random numbers, on the next rung
of the ladder (¼ → ½ → ¾ → all blocks) before the run gives up with a clear message
(train/loop.py). The peak actually reached goes into config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
ACTIVATION_BYTES = {"flux": 7.3 * 2**20, "sdxl": 0.46 * 2**20}  # per token / latent pixel, per sample
CHECKPOINTED_FRACTION = 0.25
HEADROOM = 0.9
CHECKPOINT_LADDER = (0.25, 0.5, 0.75, 1.0)  # shares of the blocks, in the order auto tries them
OPTIMIZER_BYTES = {
    "adamw": 16,
    "adamw8bit": 6,
    "prodigy": 24,
}  # per trained parameter, incl. fp32 weight + grad


@dataclass(frozen=True)
class MemoryPlan:
    gradient_checkpointing: bool
    estimate_bytes: int | None  # the peak estimate the decision was made on (None: not estimated)
    reason: str
    checkpoint_fraction: float = 1.0  # share of the checkpointable blocks to checkpoint (selective)


def tokens_per_sample(family: str, resolution: int, text_tokens: int = 512) -> int:
    """Sequence tokens (Flux) or latent pixels (SDXL) of one sample at ``resolution``²."""
    latent = resolution // 8
    return (latent // 2) ** 2 + text_tokens if family == "flux" else latent * latent


def estimate_peak_bytes(
    family: str,
    weight_bytes: int,
    trainable_params: int,
    optimizer: str,
    resolution: int,
    batch_size: int,
    text_tokens: int = 512,
    checkpointing: bool | float = False,
) -> int:
    """``checkpointing``: False, True, or the fraction of blocks checkpointed (selective)."""
    acts = ACTIVATION_BYTES[family] * tokens_per_sample(family, resolution, text_tokens) * batch_size
    fraction = float(checkpointing)
    acts *= 1 - fraction * (1 - CHECKPOINTED_FRACTION)
    return int(weight_bytes + trainable_params * OPTIMIZER_BYTES[optimizer] + acts)


def choose_memory_plan(
    policy: str,
    free_bytes: int | None,
    *,
    family: str,
    weight_bytes: int,
    trainable_params: int,
    optimizer: str,
    resolution: int,
    batch_size: int,
    text_tokens: int = 512,
) -> MemoryPlan:
    """Decide the savings. ``free_bytes`` None means a CPU run."""
    if policy == "gradient_checkpointing":
        return MemoryPlan(
            True, None, "memory policy gradient_checkpointing (from the spec): checkpointing on"
        )
    if policy == "off":
        return MemoryPlan(False, None, "memory policy off (from the spec): no savings")
    assert policy == "auto", policy
    if free_bytes is None:
        return MemoryPlan(False, None, "memory policy auto on a CPU: no savings")
    need = estimate_peak_bytes(
        family, weight_bytes, trainable_params, optimizer, resolution, batch_size, text_tokens
    )
    if need <= HEADROOM * free_bytes:
        return MemoryPlan(
            False,
            need,
            f"memory policy auto: estimated peak {need / GIB:.1f} GiB fits in "
            f"{free_bytes / GIB:.1f} GiB free: no savings",
        )
    # Selective checkpointing: the smallest share of blocks (in quarters) that brings the estimate
    # under budget, since every checkpointed block costs a recomputed forward.
    fraction = 1.0
    for quarter in CHECKPOINT_LADDER[:-1]:
        if (
            estimate_peak_bytes(
                family,
                weight_bytes,
                trainable_params,
                optimizer,
                resolution,
                batch_size,
                text_tokens,
                checkpointing=quarter,
            )
            <= HEADROOM * free_bytes
        ):
            fraction = quarter
            break
    saved = estimate_peak_bytes(
        family,
        weight_bytes,
        trainable_params,
        optimizer,
        resolution,
        batch_size,
        text_tokens,
        checkpointing=fraction,
    )
    verdict = (
        "fits" if saved <= HEADROOM * free_bytes else "may still not fit; lower batch_size or resolution"
    )
    return MemoryPlan(
        True,
        saved,
        f"memory policy auto: estimated peak {need / GIB:.1f} GiB > "
        f"{HEADROOM:.0%} of {free_bytes / GIB:.1f} GiB free: gradient checkpointing on "
        f"{fraction:.0%} of the blocks (estimate {saved / GIB:.1f} GiB, {verdict})",
        checkpoint_fraction=fraction,
    )


def enable_checkpointing(model, fraction: float) -> str:
    """Gradient checkpointing on ``fraction`` of the blocks the model checkpoints, spread evenly.

    diffusers calls ``_gradient_checkpointing_func(block, *args)`` for each checkpointable block
    in forward order; we number blocks by first appearance (the order is the same every step)
    and checkpoint block i when the running share crosses a multiple of ``fraction``. The rest
    run normally, so they keep their activations and skip the recomputation.
    """
    import torch.utils.checkpoint  # here, not at the top: the planning above stays importable without torch

    if fraction >= 1.0:
        model.enable_gradient_checkpointing()
        return "gradient checkpointing: every block"
    order: dict[int, int] = {}

    def chosen(index: int) -> bool:
        return int((index + 1) * fraction) > int(index * fraction)

    def maybe_checkpoint(module, *args):
        index = order.setdefault(id(module), len(order))
        if chosen(index):
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=maybe_checkpoint)
    model._checkpoint_order = order  # for tests and logs: which blocks were seen
    return f"gradient checkpointing: {fraction:.0%} of the blocks (selective)"
