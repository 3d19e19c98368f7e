"""The tiny pipelines load in the stock diffusers pipelines and make images; the sample set is reproducible."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from train.sample_data import write_sample_dataset


@pytest.mark.parametrize("name", ["tiny-flux-dev", "tiny-flux-schnell", "tiny-sdxl"])
def test_stock_pipeline_loads_and_renders(tiny_weights, name):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline

    folder = tiny_weights / name
    for sub in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (folder / sub).is_dir(), sub
    cls = StableDiffusionXLPipeline if "sdxl" in name else FluxPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    kw: dict[str, Any] = {} if "sdxl" in name else {"max_sequence_length": 32}
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=64,
        width=96,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    # return_dict=True: an output object, not the tuple diffusers' return type also allows
    image = out.images[0]  # pyright: ignore[reportAttributeAccessIssue]
    assert image.size == (96, 64)
    assert np.asarray(image).std() > 0  # not a blank image
    if "flux" in name:
        assert pipe.transformer.config.guidance_embeds == (name == "tiny-flux-dev")
        assert pipe.tokenizer_2("a red circle").input_ids[-1] == pipe.tokenizer_2.eos_token_id


def test_committed_sample_dataset_matches_its_generator(sample_dataset, tmp_path):
    written = write_sample_dataset(tmp_path)
    assert sorted(p.name for p in sample_dataset.glob("*.png")) == sorted(p.name for p in written)
    for path in written:
        with Image.open(path) as fresh, Image.open(sample_dataset / path.name) as committed:
            assert np.array_equal(np.asarray(fresh), np.asarray(committed)), path.name
        assert (
            path.with_suffix(".txt").read_text()
            == (sample_dataset / path.name).with_suffix(".txt").read_text()
        )
