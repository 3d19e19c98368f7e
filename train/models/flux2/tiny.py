"""Tiny random Flux.2 pipelines: [dev] (Mistral-3 text encoder, guidance embedding) and [klein]
(Qwen3 text encoder; step-distilled or base).

The structure is the real one, shrunk: the 32-channel-style VAE with its batch-norm latent
statistics (here 4 channels, 16 after the 2x2 patchify), the transformer's double and single
blocks with shared modulation, and text encoders deep enough for the layers the pipelines stack
(Mistral-3: hidden states 10, 20, 30; Qwen3: 9, 18, 27). The tokenizers are byte-level BPE
vocabularies with each model's chat template: every character a token, except that the words of
the [dev] pipeline's system message are merged into one token each.

One difference from the published [dev] repo: its ``tokenizer`` folder is a ``PixtralProcessor``,
which transformers only builds with torchvision installed; the pipeline calls nothing but the
processor's ``apply_chat_template`` for text prompts, so the tiny one saves the tokenizer itself
(same template, same call, no torchvision).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

TEXT_HIDDEN = (
    16  # the text encoders' width; the transformer's joint_attention_dim is 3x (three layers stacked)
)
LATENT_CHANNELS = 4  # the real VAE has 32; the transformer sees 4x as many after the 2x2 patchify

_MISTRAL_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
_MISTRAL_SPECIALS += ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
# Mistral-Small-3's format for the conversations the Flux.2 pipeline builds (system + user, text parts)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% else %}[IMG]{% endif %}{% endfor %}[/INST]{% endif %}{% endfor %}"
)
# Qwen3's ChatML format, with the empty thinking block the klein pipeline asks for (enable_thinking=False)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    vocab = {s: i for i, s in enumerate(specials)}
    for s in sorted(ByteLevel.alphabet()):
        vocab[s] = len(vocab)
    return vocab


def _word_merges(vocab: dict[str, int], text: str) -> list[tuple[str, str]]:
    """BPE merges (added to ``vocab``) that make each byte-level word of ``text`` one token, so the
    pipeline's long system message costs a few dozen tokens, not one per character."""
    merges: list[tuple[str, str]] = []
    for word, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text):
        left = word[0]
        for ch in word[1:]:
            if left + ch not in vocab:
                vocab[left + ch] = len(vocab)
                merges.append((left, ch))
            left += ch
    return merges


def write_mistral_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = _byte_vocab(_MISTRAL_SPECIALS)
    merges = _word_merges(vocab, SYSTEM_MESSAGE)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=_MISTRAL_SPECIALS[4:],
        model_max_length=131072,
        chat_template=_MISTRAL_TEMPLATE,
    )
    tok.save_pretrained(folder)
    return tok


def write_qwen_tokenizer(folder: Path) -> Qwen2Tokenizer:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Qwen2Tokenizer(
        vocab=_byte_vocab(specials), merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = _QWEN_TEMPLATE
    tok.save_pretrained(folder)
    return tok


def mistral3(vocab_size: int) -> Mistral3ForConditionalGeneration:
    """A Mistral-3 (Pixtral vision + Mistral text) with 31 text layers: hidden states 10, 20 and 30 exist."""
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=31,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=2048,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=8,
            patch_size=16,
            image_size=64,
        ),
        image_token_index=_MISTRAL_SPECIALS.index("[IMG]"),
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config)


def qwen3(vocab_size: int) -> Qwen3ForCausalLM:
    """A Qwen3 causal LM with 28 layers: hidden states 9, 18 and 27 exist."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=28,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


def flux2_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
    )
    # latent statistics away from (0, 1), so the normalisation the pipeline applies matters
    mean, var = vae.bn.running_mean, vae.bn.running_var
    assert mean is not None and var is not None, "the Flux.2 VAE tracks its latent statistics"
    mean.copy_(0.2 * torch.randn(mean.shape))
    var.copy_(0.5 + torch.rand(var.shape))
    # a near-deterministic posterior, as a trained VAE's is (std ~0.02, not a random init's ~1):
    # else a training latent is mostly posterior noise, which no conditioning (a reference image,
    # a caption) can predict, and the loss hardly falls whatever the model learns
    assert vae.quant_conv is not None
    logvar = slice(LATENT_CHANNELS, 2 * LATENT_CHANNELS)
    vae.quant_conv.weight.data[logvar] = 0.0
    assert vae.quant_conv.bias is not None
    vae.quant_conv.bias.data[logvar] = -8.0
    return vae


def transformer(guidance_embeds: bool, double: int = 1, single: int = 1) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    # the Flux.2 repos' scheduler config: the pipelines pass mu (compute_empirical_mu) at each call
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def write(
    folder: Path, variant: str = "dev", distilled: bool = False, double: int = 1, single: int = 1
) -> Path:
    """Write a tiny Flux.2 pipeline: ``variant`` "dev" (Flux2Pipeline) or "klein" (Flux2KleinPipeline,
    ``distilled`` as the step-distilled repos are)."""
    assert variant in ("dev", "klein")
    torch.manual_seed(0)
    folder = Path(folder)
    if variant == "dev":
        tok = write_mistral_tokenizer(folder / "tokenizer")
        pipe = Flux2Pipeline(
            scheduler=scheduler(),
            vae=flux2_vae(),
            text_encoder=mistral3(len(tok)),
            # diffusers types this as AutoProcessor; the pipeline only calls apply_chat_template on it
            tokenizer=tok,  # pyright: ignore[reportArgumentType]
            transformer=transformer(True, double, single),
        )
    else:
        tok = write_qwen_tokenizer(folder / "tokenizer")
        pipe = Flux2KleinPipeline(
            scheduler=scheduler(),
            vae=flux2_vae(),
            text_encoder=qwen3(len(tok)),
            tokenizer=tok,
            transformer=transformer(False, double, single),
            is_distilled=distilled,
        )
    pipe.save_pretrained(folder)
    return folder
