"""FLUX.3 [klein] (base and step-distilled): rectified-flow matching on the Flux.2 VAE's patchified,
batch-normalised latents, with Qwen3-VL prompts; rendered through diffusers' modular pipelines.

What ``Flux3ModularPipeline`` / ``Flux3DistilledModularPipeline`` feed the transformer
(``modular_pipelines/flux3``), and so what a training step feeds it:

- latents: as Flux.2's (train/models/flux2/family.py: the 2x2 patchify, the VAE's batch-norm
  statistics), flattened to ``(B, h*w, 128)`` tokens; position ids ``(t=0, h/2, w/2, l=0)``: the
  image axes scaled by 0.5 (``_prepare_image_ids``);
- text: one prompt at a time through the chat template, right-padded to a multiple of 80 tokens
  (at most ``max_sequence_length``), eight Qwen3-VL hidden states stacked per token
  (``_get_qwen3_vl_prompt_embeds``); no mask reaches the transformer, so the padded rows are part of
  the conditioning and the cache keeps the whole padded block; position ids ``(0, 0, 0, l)``;
- timestep: the sigma (the pipeline divides the scheduler's timestep by 1000);
- the distilled model is a flow map: the pipeline also passes ``target_timestep``, the time the step
  jumps to (the next step's, 0 at the last). Training feeds ``target_timestep = timestep``: on that
  diagonal a flow map is the instantaneous velocity, which is exactly what the flow-matching target
  ``noise - x0`` regresses to. A pair (t, r < t) would need the map's average velocity, which no
  data pair gives (that is distillation, with a teacher). The jump embedding stays frozen (no
  preset targets it), so the LoRA learns the concept and the 16-step map renders it;
- guidance: the base model's CFG is diffusers' ``ClassifierFreeGuidance`` guider against the
  negative prompt (3.5 by default, on above 1); the distilled one has none.

The transformer takes no text mask, so a prompt conditions through its whole padded block and
nothing else: in a batch whose prompts pad to different lengths (the collate zero-pads them to the
longest), each length runs its own forward (``per_text_length``), as the pipeline encodes and
denoises one prompt at a time.

The run entry and the trainer call the pipeline through ``Flux3Pipeline`` below: diffusers'
modular pipeline behind the few ``DiffusionPipeline`` calls they make. Prompts are encoded as given:
the pipeline's optional prompt upsampler (a separate VLM that rewrites the prompt) is taken out, as
its documentation says to, since a LoRA is trained on the captions as written.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep, Flux3VaeEncoderStep
from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3AutoBlocks
from diffusers.modular_pipelines.flux3.modular_blocks_flux3_distilled import Flux3DistilledAutoBlocks
from diffusers.modular_pipelines.flux3.modular_pipeline import Flux3ModularPipeline
from diffusers.modular_pipelines.modular_pipeline import ModularPipeline

from ..base import Batch, Family
from ..flow import FlowMatchFamily, Noised, per_text_length
from ..flux2.family import Flux2Family
from ..kohya import diffusion_model_lora
from ..qwen_image_edit import tiny as _tiny  # noqa: F401  (the tiny pipelines' processor class)

# The tiny pipelines record their processor as train.models.qwen_image_edit.tiny.TinyQwen2VLProcessor,
# which diffusers loads only from an imported module, hence the import above.

IMAGE_ROPE_SCALE = 0.5  # Flux3PrepareLatentsStep's default: image position ids at half steps
PAD_MULTIPLE = Flux3TextEncoderStep().pad_multiple  # 80
OUT_LAYERS = (4, 8, 12, 16, 20, 24, 28, 32)  # the text encoder step's default text_encoder_out_layers


def _blocks(flow_map: bool, text: bool = True) -> Any:
    """The pipeline's blocks for a base or flow-map transformer, without the prompt upsampler (and,
    for renders from cached prompts, without the text encoder step)."""
    blocks = (Flux3DistilledAutoBlocks if flow_map else Flux3AutoBlocks)()
    return _trimmed(blocks, text)


def _trimmed(blocks: Any, text: bool) -> Any:
    blocks.sub_blocks.pop("prompt_upsampler", None)
    if not text:
        blocks.sub_blocks.pop("text_encoder")
    return blocks


class Flux3Pipeline:
    """diffusers' FLUX.3 modular pipeline behind the ``DiffusionPipeline`` calls the trainer and the
    run entry make: ``from_pretrained`` (the repo's own blocks, components loaded in ``dtype``),
    ``__call__`` returning ``.images``, ``guidance_scale`` (set on the guider: CFG above 1),
    attribute access to the components and the LoRA methods (``Flux3LoraLoaderMixin``'s)."""

    FRONTS = ("Flux3ModularPipeline", "Flux3DistilledModularPipeline")  # the diffusers classes served
    COMPONENTS = ("text_encoder", "tokenizer", "image_processor", "vae", "transformer", "scheduler", "guider")
    modular: Any

    def __init__(self, modular: Any = None, **components: Any):
        if modular is None:  # from parts, for renders from cached prompts (no text encoder step)
            modular = _blocks(bool(components["transformer"].config.flow_map), text=False).init_pipeline()
            modular.update_components(**{k: v for k, v in components.items() if v is not None})
        object.__setattr__(self, "modular", modular)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, **given: Any
    ) -> Flux3Pipeline:
        """The folder's pipeline (its index names the base or the distilled blocks) with every
        component loaded but those ``given`` (a ``None`` stays unloaded)."""
        blocks = _trimmed(ModularPipeline.from_pretrained(str(folder)).blocks, text=True)
        modular = blocks.init_pipeline(str(folder))
        load = [n for n in modular.pretrained_component_names if n not in given]
        if load:
            modular.load_components(names=load, dtype=dtype)
        # load_components logs a component that failed to load and leaves it None: fail here, naming it
        missing = [n for n in load if modular.components.get(n) is None]
        if missing:
            from ...weights import WeightsError

            raise WeightsError(
                f"base_weights: {folder}: {', '.join(missing)} did not load (diffusers logged why above); "
                "the folder must be a complete FLUX.3 pipeline in diffusers' modular layout"
            )
        present = {k: v for k, v in given.items() if v is not None}
        if present:
            modular.update_components(**present)
        return cls(modular)

    @staticmethod
    def _get_signature_keys(_obj: Any) -> tuple[list[str], set[str]]:
        return list(Flux3Pipeline.COMPONENTS), set()

    @classmethod
    def save_lora_weights(cls, *args: Any, **kwargs: Any) -> None:
        Flux3ModularPipeline.save_lora_weights(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "modular"), name)

    def to(self, *args: Any, **kwargs: Any) -> Flux3Pipeline:
        self.modular.to(*args, **kwargs)
        return self

    def __call__(
        self,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        output_type: str = "pil",
        **inputs: Any,
    ) -> SimpleNamespace:
        modular = self.modular
        guider = modular.components.get("guider")
        if guider is not None and guidance_scale is not None:  # CFG above 1, as the classic pipelines
            modular.update_components(
                guider=guider.new(guidance_scale=guidance_scale, enabled=guidance_scale > 1)
            )
            if guidance_scale > 1 and negative_prompt is not None:
                inputs["negative_prompt"] = negative_prompt
        if output_type == "latent":
            return SimpleNamespace(images=modular(**inputs, output="latents"))
        return SimpleNamespace(images=modular(**inputs, output_type=output_type, output="images"))


class Flux3Family(Flux2Family):
    pipeline_cls: Any = Flux3Pipeline

    def load_encoders(self, dtype: torch.dtype) -> None:
        Family.load_encoders(self, dtype)

    def text_encoder_names(self) -> list[str]:
        return ["text_encoder"]

    def release_text_encoders(self) -> None:
        self.pipe.modular.unload_components(self.text_encoder_names())

    @property
    def flow_map(self) -> bool:
        return bool(self.denoiser_config().get("flow_map", False))

    # -- caching ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> list[dict[str, torch.Tensor]]:
        return self.encode_keeping_negative(prompts, lambda batch: [self._encode(p, device) for p in batch])

    def _encode(self, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """One prompt as the text encoder step encodes it: its padded block, ``(L, 8 D)``."""
        embeds = Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(
            text_encoder=self.pipe.text_encoder,
            tokenizer=self.pipe.tokenizer,
            prompt=prompt,
            device=device,
            max_sequence_length=self.text_length,
            pad_multiple=PAD_MULTIPLE,
            hidden_states_layers=OUT_LAYERS,
        )
        return {"prompt_embeds": embeds[0].cpu()}

    # -- training --------------------------------------------------------------------------------
    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """As the VAE encoder step: 2x2 patchify, then the VAE's batch-norm statistics."""
        x = Flux3VaeEncoderStep._patchify_latents(latents)
        mean, std = self._bn_stats(x.device, x.dtype)
        return (x - mean) / std

    def weight_layout(self, weights: torch.Tensor) -> torch.Tensor:
        return Flux3VaeEncoderStep._patchify_latents(weights).flatten(2).transpose(1, 2)

    def auto_shift(self, image_seq_len: int) -> float:
        """The scheduler's constant shift (6.93 in the pipeline's blocks), as it samples."""
        return FlowMatchFamily.auto_shift(self, image_seq_len)

    def _position_ids(self, kind: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (kind, shape, device)
        if key not in self._ids:
            if kind == "image":
                ids = _prepare_image_ids(shape[0], shape[1], IMAGE_ROPE_SCALE)
            else:
                ids = Flux3TextRoPEInputsStep._prepare_text_ids(torch.empty(1, *shape, 1))
            self._ids[key] = ids.to(device)
        return self._ids[key]

    def predict(self, model: torch.nn.Module, x: Noised, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, h, w = x.latents.shape
        embeds = batch.text["prompt_embeds"]
        tokens = x.latents.flatten(2).transpose(1, 2).to(embeds.dtype)  # (B, h*w, C)
        timestep = x.sigmas.to(embeds.dtype)

        def forward(rows: torch.Tensor | slice, length: int) -> torch.Tensor:
            return model(
                hidden_states=tokens[rows],
                encoder_hidden_states=embeds[rows, :length],
                timestep=timestep[rows],
                img_ids=self._position_ids("image", (h, w), x.latents.device),
                txt_ids=self._position_ids("text", (length,), x.latents.device),
                target_timestep=timestep[rows] if self.flow_map else None,  # the diagonal (docstring)
                return_dict=False,
            )[0]

        # a prompt's own padded block: the collate zero-pads a shorter one to the batch's longest
        lengths = (embeds != 0).any(dim=-1).sum(dim=1)
        return per_text_length(lengths, forward), x.target.flatten(2).transpose(1, 2)

    # -- validation and export -----------------------------------------------------------------
    def render_components(self) -> dict[str, Any]:
        parts = {"scheduler": self.pipe.scheduler, "vae": self.pipe.vae, "transformer": self.denoiser}
        guider = self.pipe.components.get("guider")
        return {**parts, **({"guider": guider} if guider is not None else {})}

    def render_inputs(self, text: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        inputs = super().render_inputs(text, device)
        if self.negative is not None and self.pipe.components.get("guider") is not None:
            inputs["negative_prompt_embeds"] = self.negative["prompt_embeds"][None].to(
                device, self.denoiser_dtype
            )
        return inputs

    def kohya_state_dict(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        return diffusion_model_lora(state_dict, alpha, original_name)


# BFL's module names, which diffusers' reader (_convert_non_diffusers_flux3_lora_to_diffusers) maps
# back from behind ``diffusion_model.``.
_ORIGINAL = (
    (".attn.to_q", ".q_proj"),
    (".attn.to_k", ".k_proj"),
    (".attn.to_v", ".v_proj"),
    (".attn.to_out.0", ".attn_out"),
    (".ff.linear_in", ".mlp_in"),
    (".ff.linear_out", ".mlp_out"),
)


def original_name(module: str) -> str:
    """A diffusers module path of the FLUX.3 transformer in BFL's checkpoint names."""
    if module.startswith("mode_blocks."):
        module = "content_" + module
    elif module.startswith("single_transformer_blocks."):
        module = "single_blocks." + module.removeprefix("single_transformer_blocks.")
    for ours, theirs in _ORIGINAL:
        if module.endswith(ours):
            return module[: -len(ours)] + theirs
    return module


FAMILY = Flux3Family
