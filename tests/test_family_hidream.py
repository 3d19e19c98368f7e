"""HiDream-I1 beyond the family contract: HiDream-ai's repos leave the gated Llama text encoder out,
and both training and the run entry load it from its own folder (or repo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from conftest import run_entry_render
from train.models import family_class
from train.models.hidream.family import LLAMA_WEIGHTS
from train.spec import parse_spec


def _split_off_the_llama(complete: Path, into: Path, weights: Path) -> Path:
    """``complete`` as HiDream-ai publishes it (no text_encoder_4 / tokenizer_4), and the Llama as its
    own model folder (weights and tokenizer together) under ``weights/``, where the Hub id resolves."""
    base = into / "hidream-without-llama"
    shutil.copytree(complete, base)
    llama = weights / LLAMA_WEIGHTS.split("/")[-1]
    shutil.copytree(base / "text_encoder_4", llama)
    for f in (base / "tokenizer_4").iterdir():
        shutil.copy(f, llama / f.name)
    shutil.rmtree(base / "text_encoder_4")
    shutil.rmtree(base / "tokenizer_4")
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(
        json.dumps({k: v for k, v in index.items() if not k.endswith("_4")})
    )
    return base


def test_the_llama_loads_from_its_own_folder_for_training_and_the_run_entry(
    tiny_weights, tmp_path, monkeypatch
):
    import train.weights

    complete = tiny_weights / "tiny-hidream-i1-dev"
    monkeypatch.setattr(train.weights, "WEIGHTS_DIR", tmp_path / "weights")
    base = _split_off_the_llama(complete, tmp_path, tmp_path / "weights")

    def text(folder: Path) -> dict[str, torch.Tensor]:
        family = family_class("hidream-i1-dev")(
            parse_spec({"model": "hidream-i1-dev", "base_weights": str(folder)}), folder
        )
        family.load_encoders(torch.float32)
        return family.encode_prompts(["sks, a red circle"], torch.device("cpu"))[0]

    ours, reference = text(base), text(complete)
    # the second stage: the Llama released, the denoiser added to the pipeline that lacks it
    family = family_class("hidream-i1-dev")(
        parse_spec({"model": "hidream-i1-dev", "base_weights": str(base)}), base
    )
    family.load_encoders(torch.float32)
    family.release_text_encoders()
    family.load_denoiser(torch.float32)
    assert family.pipe.text_encoder_4 is None and family.denoiser is not None
    assert set(ours) == set(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], msg=key)  # the Llama's states among them

    split = run_entry_render("hidream-i1-dev", base, None, tmp_path / "a", monkeypatch)
    whole = run_entry_render("hidream-i1-dev", complete, None, tmp_path / "b", monkeypatch)
    assert np.abs(split - whole).max() <= 1


def test_without_the_llama_anywhere_the_error_names_it(tiny_weights, tmp_path, monkeypatch):
    import pytest

    import train.weights
    from train.weights import WeightsError

    monkeypatch.setattr(train.weights, "WEIGHTS_DIR", tmp_path / "weights")
    base = _split_off_the_llama(tiny_weights / "tiny-hidream-i1-dev", tmp_path, tmp_path / "elsewhere")
    monkeypatch.setattr(
        train.weights, "_snapshot_download", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    family = family_class("hidream-i1-dev")(
        parse_spec({"model": "hidream-i1-dev", "base_weights": str(base)}), base
    )
    with pytest.raises(WeightsError, match="text_encoder_4.*meta-llama/Llama-3.1-8B-Instruct"):
        family.load_encoders(torch.float32)


def test_a_resolution_over_the_transformer_s_token_grid_is_refused_before_any_work():
    import pytest

    from train.spec import SpecError

    parse_spec({"model": "hidream-i1-dev", "resolutions": "512,1024"})
    with pytest.raises(SpecError, match="resolutions: HiDream-I1 Dev takes at most 1024 x 1024.*1280"):
        parse_spec({"model": "hidream-i1-dev", "resolutions": "1024,1280"})
