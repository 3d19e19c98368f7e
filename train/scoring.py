"""The measurements behind step selection (train/selection.py): the held-out loss at fixed draws,
and a CLIP scorer for fidelity and text alignment."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .cache import LatentCache, collate
from .models.base import BatchRandom, Family
from .selection import HOLDOUT_DRAWS


@torch.no_grad()
def heldout_losses(
    family: Family,
    model: torch.nn.Module,
    cache: LatentCache,
    device: torch.device,
    text_dtype: torch.dtype,
    seed: int,
    autocast: Any = None,
) -> list[float]:
    """The loss of every held-out item at ``HOLDOUT_DRAWS`` draws, each from its own generator seeded
    from (seed, item, draw): the same noise and timesteps at every step, whatever ran before."""
    was_training = model.training
    model.eval()  # no LoRA dropout: the loss depends on the weights alone
    out: list[float] = []
    try:
        for i in range(len(cache.items)):
            for d in range(HOLDOUT_DRAWS):
                g = torch.Generator().manual_seed((seed * 7919 + i) * HOLDOUT_DRAWS + d)
                rng = BatchRandom(g, 1, 0, 1, device)
                batch = collate(cache, [i], [False], device, text_dtype, rng)
                with autocast() if autocast else nullcontext():
                    out.append(float(family.loss(model, batch).float()))
    finally:
        model.train(was_training)
    return out


class ClipScorer:
    """Image and text embeddings of a CLIP model (transformers ``CLIPModel`` layout), normalised."""

    def __init__(self, folder: Path, device: torch.device):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        folder = Path(folder)
        self.device = device
        self.model: Any = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(folder)
        size = int(self.model.config.vision_config.image_size)
        if (folder / "preprocessor_config.json").is_file():
            self.processor: Any = CLIPImageProcessor.from_pretrained(folder)
        else:
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def images(self, images: list[Any]) -> torch.Tensor:
        """(N, D) unit image embeddings of PIL images."""
        self.model.to(self.device)
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        feats = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return _unit(_tensor(feats))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) unit text embeddings."""
        self.model.to(self.device)
        tok = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        feats = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return _unit(_tensor(feats))

    def offload(self) -> None:
        """Between validation steps the scorer waits on the CPU."""
        self.model.to("cpu")


def _tensor(feats: Any) -> torch.Tensor:
    # transformers 5 may return a model output whose pooled embedding is the projected feature
    return feats if isinstance(feats, torch.Tensor) else feats.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


def render_scores(
    scorer: ClipScorer, renders: list[Any], prompts: list[str], reference: torch.Tensor
) -> dict[str, list[float]]:
    """``fidelity``: each render against each training image (row-major: render, image);
    ``text_alignment``: each render against its prompt."""
    img = scorer.images(renders)
    txt = scorer.texts(prompts)
    fidelity = (img @ reference.T).flatten().tolist()
    alignment = (img * txt).sum(-1).tolist()
    return {"fidelity": fidelity, "text_alignment": alignment}
