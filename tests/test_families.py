"""The family registry is the one place a model is named: the Cog inputs, the spec, the tiny
writers, the memory table and the staged loading all follow it."""

from __future__ import annotations

import ast
import gc
import weakref
from pathlib import Path

import pytest

from conftest import quick_spec, train_quietly
from train.families import MODEL_IDS, model_info
from train.memory import memory_table_lines
from train.models import family_class
from train.models.base import Family

ROOT = Path(__file__).resolve().parents[1]


def _model_choices(path: Path) -> list[str]:
    """The literal ``choices`` of the ``model`` input in a Cog entry (cog reads them statically)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Input":
            kw = {k.arg: k.value for k in node.keywords}
            desc = kw.get("description")
            if "choices" in kw and isinstance(desc, ast.Constant) and "model" in str(desc.value).lower():
                return [ast.literal_eval(e) for e in kw["choices"].elts]  # type: ignore[attr-defined]
    raise AssertionError(f"no model choices in {path}")


def test_cog_train_offers_every_registered_model():
    # cog builds the schema from the source text, so the choices are written out: this keeps them true
    assert _model_choices(ROOT / "cog_train.py") == list(MODEL_IDS)


def test_the_web_page_offers_every_registered_model_edit_models_apart():
    """The server fills the page's model list from the registry (no build step, no copy to keep):
    the same ids, in registry order, the edit and the video models in their own groups."""
    import re

    from client.routes.page import index_html

    html = index_html()
    select = html[
        html.index('<select id="spec-model"') : html.index("</select>", html.index('id="spec-model"'))
    ]
    offered = re.findall(r'<option value="([^"]+)">', select)
    edit = [m for m in MODEL_IDS if model_info(m).controls_required]
    video = [m for m in MODEL_IDS if model_info(m).video]
    assert video and offered == [m for m in MODEL_IDS if m not in edit + video] + edit + video
    edit_group = select[select.index('<optgroup label="Edit') : select.index('<optgroup label="Video')]
    assert re.findall(r'<option value="([^"]+)">', edit_group) == edit
    video_group = select[select.index('<optgroup label="Video') :]
    assert re.findall(r'<option value="([^"]+)">', video_group) == video


def test_every_model_has_a_family_module_and_tiny_writer():
    for model in MODEL_IDS:
        info = model_info(model)
        cls = family_class(model)
        assert issubclass(cls, Family) and cls.denoiser_name == info.denoiser, model
        # the diffusers pipeline class, or the ones a front serves (FLUX.3's modular pipelines)
        assert info.pipeline in getattr(cls.pipeline_cls, "FRONTS", (cls.pipeline_cls.__name__,)), model
        folder = ROOT / "train" / "models" / info.family
        assert {"__init__.py", "family.py", "tiny.py"} <= {p.name for p in folder.iterdir()}, model
        assert info.render_steps > 0 and info.default_targets in info.target_presets, model


def test_the_memory_table_in_the_docs_is_the_policy_s():
    doc = (ROOT / "docs" / "memory.md").read_text()
    for line in memory_table_lines(list(MODEL_IDS)):
        assert line in doc, f"docs/memory.md is stale; regenerate it (python -m train.memory):\n{line}"


# Staged loading is a family class's code (load_encoders, release, load_denoiser): one model of each
# class runs it; the other ids of a class (weight revisions, sizes) load through the same methods.
ONE_PER_FAMILY_CLASS = list({family_class(m): m for m in reversed(MODEL_IDS)}.values())[::-1]


@pytest.mark.parametrize("model", ONE_PER_FAMILY_CLASS)
def test_text_encoders_leave_before_the_denoiser_loads(
    model, tiny_weights, sample_dataset, pair_dataset, tmp_path, monkeypatch
):
    """Staged loading, instrumented: when the denoiser starts to load, no text encoder is alive
    (so the two are never on the accelerator together), and the run still trains."""
    cls = family_class(model)
    seen: dict[str, object] = {}
    load_encoders, load_denoiser = cls.load_encoders, cls.load_denoiser

    def encoders(self, dtype):
        load_encoders(self, dtype)
        seen["encoders"] = [weakref.ref(m) for m in self.text_encoders()]
        seen["denoiser_at_encode"] = getattr(self.pipe, self.denoiser_name, None)

    def denoiser(self, dtype):
        gc.collect()
        seen["alive_at_denoiser"] = [r() for r in seen["encoders"] if r() is not None]  # type: ignore[union-attr]
        load_denoiser(self, dtype)

    monkeypatch.setattr(cls, "load_encoders", encoders)
    monkeypatch.setattr(cls, "load_denoiser", denoiser)
    data = pair_dataset if model_info(model).controls_required else sample_dataset  # edit models: pairs
    result, _ = train_quietly(quick_spec(tiny_weights, model, steps=2), data, tmp_path / "out")
    assert seen["encoders"], "the pipeline has text encoders to release"
    assert seen["denoiser_at_encode"] is None, "the denoiser was loaded while the prompts were encoded"
    assert seen["alive_at_denoiser"] == [], "a text encoder was still alive when the denoiser loaded"
    assert result is not None and result.weights[0].is_file()
