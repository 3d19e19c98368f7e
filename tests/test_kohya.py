"""The kohya/ComfyUI export applies exactly the trained update, fused projections included."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from train.models.flux import FLUX_PRESETS
from train.models.kohya import KOHYA_NAME, flux_to_kohya, fuse, kohya_delta, sdxl_to_kohya


def _delta(sd, module, alpha):
    a, b = sd[f"{module}.lora_A.weight"], sd[f"{module}.lora_B.weight"]
    return (b @ a) * alpha / a.shape[0]


def _trained_lora(transformer, targets, rank=4, alpha=2.0):
    # peft types lora_alpha as int; a float works (and is what the trainer passes)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # pyright: ignore[reportArgumentType]
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    transformer.add_adapter(config)
    torch.manual_seed(3)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:  # B starts at zero; give it values as training would
            p.data.normal_()
    return get_peft_model_state_dict(transformer)


@pytest.fixture()
def flux_transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def test_fuse_is_the_block_diagonal_of_the_parts():
    torch.manual_seed(0)
    r, d_in = 3, 5
    parts = [(torch.randn(r, d_in), torch.randn(4, r)), None, (torch.randn(r, d_in), torch.randn(6, r))]
    down, up = fuse(parts, [4, 2, 6], d_in, r)
    assert down.shape == (9, 5) and up.shape == (12, 9)
    fused = up @ down
    torch.testing.assert_close(fused[:4], parts[0][1] @ parts[0][0])
    assert torch.count_nonzero(fused[4:6]) == 0  # the part without LoRA stays untouched
    torch.testing.assert_close(fused[6:], parts[2][1] @ parts[2][0])


def test_flux_export_matches_every_trained_update(flux_transformer):
    alpha = 2.0
    sd = _trained_lora(flux_transformer, FLUX_PRESETS["attention+mlp"], alpha=alpha)
    kohya = flux_to_kohya(sd, alpha, flux_transformer)
    assert all(KOHYA_NAME.match(k) for k in kohya)

    for i in range(2):
        # single block linear1 = [q; k; v; mlp] stacked along the output dimension
        fused = kohya_delta(kohya, f"lora_unet_single_blocks_{i}_linear1")
        parts = [
            _delta(sd, f"single_transformer_blocks.{i}.{m}", alpha)
            for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        ]
        torch.testing.assert_close(fused, torch.cat(parts), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            kohya_delta(kohya, f"lora_unet_single_blocks_{i}_linear2"),
            _delta(sd, f"single_transformer_blocks.{i}.proj_out", alpha),
        )
        # double block: image-stream and text-stream qkv
        img_qkv = torch.cat([_delta(sd, f"transformer_blocks.{i}.attn.to_{x}", alpha) for x in "qkv"])
        torch.testing.assert_close(kohya_delta(kohya, f"lora_unet_double_blocks_{i}_img_attn_qkv"), img_qkv)
        txt_qkv = torch.cat([_delta(sd, f"transformer_blocks.{i}.attn.add_{x}_proj", alpha) for x in "qkv"])
        torch.testing.assert_close(kohya_delta(kohya, f"lora_unet_double_blocks_{i}_txt_attn_qkv"), txt_qkv)
        torch.testing.assert_close(
            kohya_delta(kohya, f"lora_unet_double_blocks_{i}_txt_mlp_2"),
            _delta(sd, f"transformer_blocks.{i}.ff_context.net.2", alpha),
        )


def test_flux_partial_fusion_and_final_layer(flux_transformer):
    # only q of the single block's linear1 is trained: k, v and mlp rows must stay zero
    sd = _trained_lora(
        flux_transformer, ["single_transformer_blocks.0.attn.to_q", "norm_out.linear"], alpha=4.0
    )
    kohya = flux_to_kohya(sd, 4.0, flux_transformer)
    fused = kohya_delta(kohya, "lora_unet_single_blocks_0_linear1")
    q = _delta(sd, "single_transformer_blocks.0.attn.to_q", 4.0)
    torch.testing.assert_close(fused[: q.shape[0]], q)
    assert torch.count_nonzero(fused[q.shape[0] :]) == 0
    # BFL orders the final modulation (shift, scale); diffusers (scale, shift)
    final = kohya_delta(kohya, "lora_unet_final_layer_adaLN_modulation_1")
    scale_shift = _delta(sd, "norm_out.linear", 4.0)
    torch.testing.assert_close(final, torch.cat(scale_shift.chunk(2)[::-1]))


def test_unknown_flux_modules_are_refused(flux_transformer):
    sd = _trained_lora(flux_transformer, ["time_text_embed.timestep_embedder.linear_1"])
    assert "lora_unet_time_in_in_layer.lora_down.weight" in flux_to_kohya(sd, 4.0, flux_transformer)
    sd["some.unmapped.module.lora_A.weight"] = torch.zeros(4, 4)
    sd["some.unmapped.module.lora_B.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="no kohya name"):
        flux_to_kohya(sd, 4.0, flux_transformer)


def test_sdxl_names_and_scale():
    sd = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 3),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(5, 2),
    }
    kohya = sdxl_to_kohya(sd, alpha=1.0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert set(kohya) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert float(kohya[f"{name}.alpha"]) == 2.0  # alpha = rank, with alpha/rank baked into up
    torch.testing.assert_close(kohya_delta(kohya, name), torch.full((5, 3), 2.0 * 0.5))
