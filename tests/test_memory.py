"""The memory policy picks documented savings from simulated cards, and the spec overrides it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import quick_spec, train_quietly
from train.memory import GIB, choose_memory_plan, estimate_peak_bytes

FLUX_DEV = dict(
    model="flux-dev",
    weight_bytes=int(11.9e9 * 2),
    trainable_params=int(65e6),
    optimizer="adamw",
    text_tokens=512,
)
SDXL = dict(
    model="sdxl", weight_bytes=int(2.6e9 * 2), trainable_params=int(23e6), optimizer="adamw", text_tokens=0
)


def test_estimates_follow_the_measured_stock_peaks():
    # gpu-baseline.md: stock Flux-dev LoRA peaks 56.5 GiB at 1024 px, 34.3 GiB at 512 px; SDXL bs4 34.6 GiB
    assert estimate_peak_bytes(resolution=1024, batch_size=1, **FLUX_DEV) / GIB == pytest.approx(
        56.5, rel=0.1
    )
    assert estimate_peak_bytes(resolution=512, batch_size=1, **FLUX_DEV) / GIB == pytest.approx(34.3, rel=0.1)
    assert estimate_peak_bytes(resolution=1024, batch_size=4, **SDXL) / GIB == pytest.approx(34.6, rel=0.1)


@pytest.mark.parametrize(
    "free_gib,expected,fraction",
    [
        (139, False, 1.0),  # H200: everything fits
        (79, False, 1.0),  # A100 80 GB
        (50, True, 0.5),  # a little short: half the blocks are enough
        (44, True, 0.75),  # L40S: Flux 1024 px needs most blocks checkpointed
        (24, True, 1.0),  # a 24 GB consumer card: all, and the log says it may still not fit
    ],
)
def test_auto_picks_checkpointing_by_free_memory(free_gib, expected, fraction):
    plan = choose_memory_plan("auto", int(free_gib * GIB), resolution=1024, batch_size=1, **FLUX_DEV)
    assert plan.gradient_checkpointing is expected
    if expected:
        assert plan.checkpoint_fraction == fraction and f"{fraction:.0%} of the blocks" in plan.reason
    assert f"{free_gib:.1f} GiB free" in plan.reason
    if free_gib == 24:
        assert "may still not fit" in plan.reason


def test_small_jobs_need_nothing_and_the_cpu_never_does():
    assert not choose_memory_plan(
        "auto", 44 * GIB, resolution=512, batch_size=1, **FLUX_DEV
    ).gradient_checkpointing
    assert not choose_memory_plan(
        "auto", 44 * GIB, resolution=1024, batch_size=4, **SDXL
    ).gradient_checkpointing
    cpu = choose_memory_plan("auto", None, resolution=1024, batch_size=1, **FLUX_DEV)
    assert not cpu.gradient_checkpointing and "CPU" in cpu.reason


def test_the_spec_overrides_auto():
    forced = choose_memory_plan("gradient_checkpointing", 139 * GIB, resolution=512, batch_size=1, **FLUX_DEV)
    assert forced.gradient_checkpointing and "from the spec" in forced.reason
    off = choose_memory_plan("off", 8 * GIB, resolution=1024, batch_size=1, **FLUX_DEV)
    assert not off.gradient_checkpointing and "from the spec" in off.reason


def test_the_choice_is_logged_and_applied(tiny_weights, sample_dataset, tmp_path):
    from conftest import quick_spec, train_quietly

    result, log = train_quietly(
        quick_spec(tiny_weights, "sdxl", steps=2, memory_policy="gradient_checkpointing"),
        sample_dataset,
        tmp_path / "out",
    )
    assert "memory policy gradient_checkpointing (from the spec): checkpointing on" in log
    import json

    assert json.loads((tmp_path / "out" / "config.json").read_text())["memory_plan"]["gradient_checkpointing"]


def test_selective_checkpointing_keeps_the_numbers_and_checkpoints_that_share():
    """Checkpointing recomputes the same operations: gradients equal the plain path's exactly."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from train.memory import enable_checkpointing

    def grads(fraction):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        model.requires_grad_(False)
        model.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "proj_out"],
            )
        )
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_()
        calls = []
        if fraction is not None:
            enable_checkpointing(model, fraction)
            real = torch.utils.checkpoint.checkpoint

            def counting(*a, **k):
                calls.append(1)
                return real(*a, **k)

            torch.utils.checkpoint.checkpoint = counting
        try:
            g = torch.Generator().manual_seed(1)
            out = model(
                hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g),
                timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]),
                img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3),
                return_dict=False,
            )[0]
            out.pow(2).mean().backward()
        finally:
            if fraction is not None:
                torch.utils.checkpoint.checkpoint = real
        model.train()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls), model

    plain, _, _ = grads(None)
    half, n_half, model = grads(0.5)
    assert plain.keys() == half.keys()
    assert all(torch.equal(plain[k], half[k]) for k in plain)
    blocks = len(model._checkpoint_order)
    assert blocks == 6 and n_half == 3  # 2 double + 4 single blocks; every other one checkpointed


def test_out_of_memory_step_is_redone_with_more_checkpointing(
    tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    """Policy auto: a step that runs out of GPU memory is redone on the next rung of the ladder,
    with the same batch and random numbers, so the run ends exactly where a clean one does."""
    from train.models.flux.family import FluxFamily

    clean, _ = train_quietly(
        quick_spec(tiny_weights, "flux-dev", steps=5, gradient_accumulation_steps=3),
        sample_dataset,
        tmp_path / "clean",
    )
    real_loss = FluxFamily.loss
    calls = {"n": 0}

    def tight_memory(self, model, batch):
        calls["n"] += 1
        # the second of step 2's three micro-batches (the first one's gradient is already accumulated),
        # then the retry's second one (the accumulation counter must have been put back for it)
        if calls["n"] in (5, 7):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, model, batch)

    monkeypatch.setattr(FluxFamily, "loss", tight_memory)
    tight, log = train_quietly(
        quick_spec(tiny_weights, "flux-dev", steps=5, gradient_accumulation_steps=3),
        sample_dataset,
        tmp_path / "tight",
    )
    assert (
        "out of GPU memory at step 2; the step is redone with gradient checkpointing: 25% of the blocks"
        in log
    )
    assert "with gradient checkpointing: 50% of the blocks" in log
    assert [s for s, _ in tight.losses] == [s for s, _ in clean.losses]
    # nothing skipped, nothing drawn twice: the same losses as the clean run
    assert [v for _, v in tight.losses] == pytest.approx([v for _, v in clean.losses], rel=1e-6)
    # the first micro-batch's gradient is not counted twice when the step is redone
    from safetensors.torch import load_file

    a, b = load_file(str(clean.lora_file)), load_file(str(tight.lora_file))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    config = json.loads(tight.config.read_text())
    assert (
        config["memory_plan"]["checkpoint_fraction"] == 0.5
        and config["memory_plan"]["gradient_checkpointing"]
    )


def test_out_of_memory_with_every_block_checkpointed_says_what_to_change(
    tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    from train.loop import TrainingError
    from train.models.flux.family import FluxFamily

    def no_memory(self, model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(FluxFamily, "loss", no_memory)
    with pytest.raises(
        TrainingError,
        match="out of GPU memory at step 1 with gradient checkpointing on every block: lower batch_size",
    ):
        train_quietly(quick_spec(tiny_weights, "flux-dev", steps=3), sample_dataset, tmp_path / "out")
    # policy off: the error is the runtime's own, untouched
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_quietly(
            quick_spec(tiny_weights, "flux-dev", steps=3, memory_policy="off"),
            sample_dataset,
            tmp_path / "off",
        )


def test_out_of_memory_in_the_optimizer_step_is_not_replayed(
    tiny_weights, sample_dataset, tmp_path, monkeypatch
):
    """A half-initialised optimizer state cannot be redone, and checkpointing does not shrink it."""
    from train.loop import TrainingError

    def no_memory(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_memory)
    with pytest.raises(TrainingError, match="out of GPU memory in the optimizer step.*adamw8bit"):
        train_quietly(quick_spec(tiny_weights, "flux-dev", steps=3), sample_dataset, tmp_path / "out")


def test_lokr_and_loha_count_their_larger_activations():
    from train.memory import ADAPTER_ACTIVATIONS

    lora = estimate_peak_bytes(resolution=1024, batch_size=1, **FLUX_DEV)
    for kind in ("lokr", "loha"):
        more = estimate_peak_bytes(resolution=1024, batch_size=1, adapter=kind, **FLUX_DEV)
        assert more > lora
        assert (
            choose_memory_plan(
                "auto", int(1.02 * lora / 0.9), resolution=1024, batch_size=1, **FLUX_DEV
            ).gradient_checkpointing
            is False
        )
        assert choose_memory_plan(
            "auto", int(1.02 * lora / 0.9), resolution=1024, batch_size=1, adapter=kind, **FLUX_DEV
        ).gradient_checkpointing, (
            f"{kind}: {ADAPTER_ACTIVATIONS[kind]}x the activations fit where a LoRA's just fit"
        )
