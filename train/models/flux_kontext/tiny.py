"""Tiny random FLUX.1 Kontext [dev] pipeline: the tiny Flux.1 [dev] (train/models/flux/tiny.py) saved as
a ``FluxKontextPipeline`` — the real repo is likewise FLUX.1-dev's components (the same transformer
config, guidance embedding, VAE and scheduler) under Kontext's pipeline class."""

from __future__ import annotations

import tempfile
from pathlib import Path

from diffusers.pipelines.flux.pipeline_flux_kontext import FluxKontextPipeline

from ..flux.tiny import write_tiny_flux


def write(folder: Path, variant: str = "dev") -> Path:
    """Write the tiny Kontext pipeline into ``folder`` (Kontext exists only as [dev])."""
    assert variant == "dev", "FLUX.1 Kontext is released as [dev] only"
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        # Built in a scratch folder and re-saved by the stock class, so model_index.json names
        # FluxKontextPipeline (written in place, the re-save would overwrite files it still maps).
        write_tiny_flux(Path(tmp), variant)
        FluxKontextPipeline.from_pretrained(tmp).save_pretrained(folder)
    return folder
