"""Memory policy: which savings to switch on for the card a job lands on.

``choose_memory_plan`` is pure (figures in, decision out) so it is tested with simulated
cards. The estimate of a step's peak is

    weights + trainable state + activations

- weights: the denoiser's parameters at their dtype (the VAE and text encoders are off the
  accelerator while training, always);
- trainable state: the trained parameters in fp32 plus their gradients and AdamW moments
  (16 bytes each; 8-bit AdamW: 6; Prodigy: 24);
- activations: bytes per token of the denoiser, per sample (``ModelInfo.activation_bytes`` in
  the family registry): measured with the stock diffusers + peft step on an H200
  (docs/benchmarks.md, "The stock baseline") for Flux-dev (about 7.3 MiB per sequence token, image +
  text, without checkpointing) and SDXL (about 0.46 MiB per latent pixel); estimated from the
  width and depth for the newer families until measured (docs/memory.md says which). Gradient checkpointing keeps only block inputs; we count it as
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

from .families import model_info

GIB = 2**30
CHECKPOINTED_FRACTION = 0.25
# LoKr / LoHa (lora.type) keep more for the backward than a LoRA: their factored product's
# intermediate, the size of the layer's output. Saved-tensor bytes of full-size FLUX.1 double /
# single blocks (1024 image + 512 text tokens, bf16 autocast, attention+mlp targets, rank 16),
# against the same blocks with a LoRA: LoKr 1.19x / 1.26x, LoHa 1.16x / 1.16x.
ADAPTER_ACTIVATIONS = {"lora": 1.0, "lokr": 1.26, "loha": 1.16}
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


def tokens_per_sample(
    model: str,
    resolution: int,
    text_tokens: int | None = None,
    controls: int | None = None,
    frames: int | None = None,
) -> int:
    """Sequence tokens (a transformer: image + text) or latent pixels (a UNet) of one sample at
    ``resolution``²; ``text_tokens`` defaults to the model's prompt length, ``controls`` (control
    or reference images in the sequence) to one for an edit model and none for the others, a video
    model's ``frames`` to its default."""
    return model_info(model).tokens_per_sample(resolution, text_tokens, controls, frames)


def estimate_peak_bytes(
    model: str,
    weight_bytes: int,
    trainable_params: int,
    optimizer: str,
    resolution: int,
    batch_size: int,
    text_tokens: int | None = None,
    checkpointing: bool | float = False,
    controls: int | None = None,
    frames: int | None = None,
    adapter: str = "lora",
) -> int:
    """``checkpointing``: False, True, or the fraction of blocks checkpointed (selective);
    ``adapter``: ``lora.type``."""
    per_token = model_info(model).activation_bytes * ADAPTER_ACTIVATIONS[adapter]
    acts = per_token * tokens_per_sample(model, resolution, text_tokens, controls, frames) * batch_size
    fraction = float(checkpointing)
    acts *= 1 - fraction * (1 - CHECKPOINTED_FRACTION)
    return int(weight_bytes + trainable_params * OPTIMIZER_BYTES[optimizer] + acts)


def choose_memory_plan(
    policy: str,
    free_bytes: int | None,
    *,
    model: str,
    weight_bytes: int,
    trainable_params: int,
    optimizer: str,
    resolution: int,
    batch_size: int,
    text_tokens: int | None = None,
    controls: int | None = None,
    frames: int | None = None,
    adapter: str = "lora",
) -> MemoryPlan:
    """Decide the savings. ``free_bytes`` None means a CPU run; ``controls``: control / reference
    images per sample, ``frames`` a video model's frames per sample (see ``tokens_per_sample``);
    ``adapter``: ``lora.type`` (ADAPTER_ACTIVATIONS)."""
    if policy == "gradient_checkpointing":
        return MemoryPlan(
            True, None, "memory policy gradient_checkpointing (from the spec): checkpointing on"
        )
    if policy == "off":
        return MemoryPlan(False, None, "memory policy off (from the spec): no savings")
    assert policy == "auto", policy
    if free_bytes is None:
        return MemoryPlan(False, None, "memory policy auto on a CPU: no savings")

    def peak(checkpointing: float = 0.0) -> int:
        args = (model, weight_bytes, trainable_params, optimizer, resolution, batch_size, text_tokens)
        return estimate_peak_bytes(
            *args, checkpointing=checkpointing, controls=controls, frames=frames, adapter=adapter
        )

    need = peak()
    if need <= HEADROOM * free_bytes:
        return MemoryPlan(
            False,
            need,
            f"memory policy auto: estimated peak {need / GIB:.1f} GiB fits in "
            f"{free_bytes / GIB:.1f} GiB free: no savings",
        )
    # Selective checkpointing: the smallest share of blocks (in quarters) that brings the estimate
    # under budget, since every checkpointed block costs a recomputed forward.
    fraction = next((q for q in CHECKPOINT_LADDER[:-1] if peak(q) <= HEADROOM * free_bytes), 1.0)
    saved = peak(fraction)
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


# -- the per-(model, card) table in docs/memory.md ----------------------------------------------
CARDS_GIB = {"L40S 48 GB": 48, "A100 80 GB": 80, "H100 80 GB": 80}  # the cards Replicate rents


def card_plan(
    model: str, card_gib: float, resolution: int | None = None, batch_size: int = 1, frames: int | None = None
) -> dict[str, object]:
    """What a rank-16 LoRA job of ``model`` needs on a card at ``resolution`` (default: the spec's
    default for the model; a video model's default frames): each loading phase's weights, the
    training phase's estimate, and the cheapest plan that fits (bf16, gradient checkpointing,
    then the frozen base in fp8). The same estimate the run's memory policy uses."""
    from .families import model_info

    info = model_info(model)
    resolution = resolution or info.default_resolution
    free = int(card_gib * GIB * 0.95)  # the CUDA context and allocator keep some
    weights = info.weight_bytes(2.0)
    encode_peak = weights["text_encoders"] + weights["vae"]
    trainable = int(
        info.lora_params_m * 1e6 * info.experts
    )  # the default LoRA, counted on the full-size denoiser
    row: dict[str, object] = {"model": model, "encode_gib": round(encode_peak / GIB, 1)}
    for label, bytes_per_param in (("bf16", 2.0), ("fp8_base", 1.0)):
        plan = choose_memory_plan(
            "auto",
            free,
            model=model,
            weight_bytes=int(info.weight_bytes(bytes_per_param)["denoiser"]),
            trainable_params=trainable,
            optimizer="adamw",
            resolution=resolution,
            batch_size=batch_size,
            frames=frames,
        )
        assert plan.estimate_bytes is not None
        train_peak = plan.estimate_bytes
        if max(train_peak, encode_peak) <= HEADROOM * free:
            ckpt = f", checkpointing {plan.checkpoint_fraction:.0%}" if plan.gradient_checkpointing else ""
            return {**row, "train_gib": round(train_peak / GIB, 1), "plan": f"{label}{ckpt}"}
    fits_encoders = encode_peak <= HEADROOM * free
    why = "the denoiser does not fit even in fp8" if fits_encoders else "the text encoders do not fit in bf16"
    return {**row, "train_gib": round(train_peak / GIB, 1), "plan": f"does not fit ({why})"}


def memory_table_lines(models: list[str]) -> list[str]:
    """The markdown table docs/memory.md holds (a test keeps the two the same)."""
    from .families import model_info

    lines = [
        "| model | denoiser / text encoders (B params) | " + " | ".join(CARDS_GIB) + " |",
        "|---|---|" + "---|" * len(CARDS_GIB),
    ]
    for model in models:
        info = model_info(model)
        cells = []
        for gib in CARDS_GIB.values():
            p = card_plan(model, gib)
            cells.append(f"{p['plan']}: encode {p['encode_gib']} GiB, train {p['train_gib']} GiB")
        status = "measured" if info.memory_measured else "estimated"
        lines.append(
            f"| `{model}` ({status}) | {info.denoiser_params_b:g} / {info.text_encoder_params_b:g} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main() -> None:
    """``python -m train.memory``: print the table docs/memory.md holds."""
    from .families import MODEL_IDS

    print("\n".join(memory_table_lines(list(MODEL_IDS))))


if __name__ == "__main__":
    main()
