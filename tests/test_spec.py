"""The training spec: defaults resolved, every bad field named at once, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from train.families import MODEL_IDS
from train.models.sdxl import SDXL_PRESETS
from train.spec import SPEC_VERSION, SpecError, parse_spec, spec_json_schema


def test_defaults_are_resolved_per_family():
    flux = parse_spec({})
    assert flux.model == "flux-dev" and flux.base_weights == "black-forest-labs/FLUX.1-dev"
    assert flux.learning_rate == 1e-4 and flux.lora.alpha == 16.0 and flux.lora.targets == "attention+mlp"
    assert flux.flow.max_sequence_length == 512 and flux.validation.num_inference_steps == 28
    assert flux.validation.resolution == 1024 and flux.validation.seed == flux.seed

    schnell = parse_spec({"model": "flux-schnell"})
    assert schnell.flow.max_sequence_length == 256 and schnell.validation.guidance_scale == 0.0

    sdxl = parse_spec({"model": "sdxl", "lora": {"rank": 8}, "resolutions": "1024,512"})
    assert sdxl.base_weights == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.lora.alpha == 8.0 and sdxl.lora.targets == "attention"
    assert sdxl.resolutions == [512, 1024] and sdxl.validation.resolution == 512
    assert sdxl.lora_target_modules() == SDXL_PRESETS["attention"]

    assert parse_spec({"optimizer": "prodigy"}).learning_rate == 1.0
    assert parse_spec({"mode": "full"}).learning_rate == 1e-5


V1_FLUX = {
    "spec_version": 1,
    "model": "flux-dev",
    "steps": 300,
    "flux": {"guidance": 2.5, "timestep_sampling": "flux_shift", "shift": 5.0, "max_sequence_length": 256},
}


def test_a_version_1_spec_still_parses_as_its_version_2_equivalent():
    """Version 1's ``flux`` section (read by the Flux.1 models only) is version 2's ``flow``
    (docs/spec.md, "Versions"): a stored job, a config.json or a saved spec file keeps working."""
    old = parse_spec(V1_FLUX)
    assert old.spec_version == SPEC_VERSION == 2
    assert old.flow.guidance == 2.5 and old.flow.max_sequence_length == 256
    assert old.flow.timestep_sampling == "auto" and old.flow.shift is None  # v1 read shift for "shift" only
    v2 = {
        "spec_version": 2,
        "model": "flux-dev",
        "steps": 300,
        "flow": {"guidance": 2.5, "max_sequence_length": 256},
    }
    assert old == parse_spec(v2)
    shifted = parse_spec({**V1_FLUX, "flux": {"timestep_sampling": "shift"}})
    assert (shifted.flow.timestep_sampling, shifted.flow.shift) == ("shift", 3.0)  # v1's default shift
    assert (
        parse_spec({**V1_FLUX, "flux": {"timestep_sampling": "uniform"}}).flow.timestep_sampling == "uniform"
    )
    kontext = parse_spec({**V1_FLUX, "model": "flux1-kontext-dev"})
    assert kontext.flow.guidance == 2.5
    # other models never read the flux section: it is dropped, their flow section kept
    sd3 = parse_spec({**V1_FLUX, "model": "sd3.5-medium", "flow": {"guidance": 4.0}})
    assert sd3.flow.guidance == 4.0 and sd3.flow.timestep_sampling == "auto"
    # what version 1 refused in that section is still refused, under its new name
    with pytest.raises(SpecError, match="flow.timestep_sampling"):
        parse_spec({**V1_FLUX, "flux": {"timestep_sampling": "cosine"}})
    # the spec written back (config.json) is version 2 and parses as itself
    assert parse_spec(json.loads(old.to_json())) == old


def test_resolved_spec_round_trips():
    spec = parse_spec({"model": "sdxl", "trigger_word": " ohwx ", "resolutions": 768})
    again = parse_spec(json.loads(spec.to_json()))
    assert again == spec and again.trigger_word == "ohwx" and again.resolutions == [768]


def test_every_bad_field_is_named_at_once():
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "model": "sd3",
                "steps": 0,
                "lora": {"rank": 0, "targetz": ["x"]},
                "resolutions": "512,abc",
                "caption_dropout": 1.5,
                "optimizer": "sgd",
                "lr_warmup_steps": 10,
                "learning_rate": -1,
            }
        )
    problems = err.value.problems
    named = {p.split(":")[0] for p in problems}
    assert named == {
        "model",
        "steps",
        "lora.rank",
        "lora.targetz",
        "resolutions",
        "caption_dropout",
        "optimizer",
        "learning_rate",
    }
    text = str(err.value)
    assert all(f"'{m}'" in text for m in MODEL_IDS)  # accepted values are listed
    assert "unknown field" in text
    # the warmup rule involves steps, which is itself bad: no confusing second-hand message
    assert not any(p.startswith("lr_warmup_steps") for p in problems)


def test_cross_field_rules_report_with_field_errors():
    with pytest.raises(SpecError) as err:
        parse_spec({"steps": 5, "lr_warmup_steps": 10, "resolutions": "100"})
    assert [p.split(":")[0] for p in err.value.problems] == ["resolutions", "lr_warmup_steps"]
    with pytest.raises(SpecError, match="flow.max_sequence_length: FLUX.1-schnell accepts at most 256"):
        parse_spec({"model": "flux-schnell", "flow": {"max_sequence_length": 300}})


@pytest.mark.parametrize(
    "raw,needle",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"spec_version": 3}, "spec_version: this trainer reads versions 1 to 2, got 3"),
        ({"flux": {"guidance": 2}}, 'flux: spec version 2 merged this section into "flow"'),
        ({"lora": {"targets": "everything"}}, "lora.targets: unknown preset"),
        ({"lora": {"targets": []}}, "lora.targets: the list of target modules is empty"),
        ({"trigger_word": "two\nlines"}, "trigger_word: must be a single line"),
        ({"validation": {"prompts": ["ok", "  "]}}, "validation.prompts: prompt 1 is empty"),
        ({"publish": {"hub_model_id": "no-slash"}}, "publish.hub_model_id"),
        ({"resolutions": [64, 8192]}, "bad: [8192]"),
    ],
)
def test_bad_values_get_clear_messages(raw, needle):
    with pytest.raises(SpecError) as err:
        parse_spec(json.dumps(raw) if isinstance(raw, dict) else raw)
    assert needle in str(err.value)


def test_file_and_overrides(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text("\ufeff" + json.dumps({"model": "sdxl", "steps": 100}))  # a BOM from a Windows editor
    spec = parse_spec(path, steps=200, **{"lora.rank": 4, "validation.prompts": ["a cat"]})
    assert spec.model == "sdxl" and spec.steps == 200 and spec.lora.rank == 4
    assert spec.validation.prompts == ["a cat"]
    with pytest.raises(SpecError, match="no such file"):
        parse_spec(str(tmp_path / "missing.json"))


def test_spec_is_frozen():
    spec = parse_spec({})
    with pytest.raises(ValidationError):
        spec.steps = 5  # type: ignore[misc]


def test_json_schema_is_available():
    schema = spec_json_schema()
    assert schema["properties"]["model"]["enum"] == list(MODEL_IDS)
    assert SPEC_VERSION == 2 and schema["properties"]["spec_version"]["const"] == 2


def test_spec_and_progress_import_without_torch():
    """The submit client validates specs on a laptop without torch."""
    code = (
        "import sys; import train.spec, train.progress; "
        "bad = [m for m in ('torch', 'diffusers', 'PIL', 'numpy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_reference_documents_every_field():
    """docs/spec.md must not drift from the schema."""
    from pathlib import Path

    from train.spec import TrainingSpec

    doc = (Path(__file__).resolve().parent.parent / "docs" / "spec.md").read_text()
    missing = []
    for name, field in TrainingSpec.model_fields.items():
        if f"`{name}`" not in doc:
            missing.append(name)
        sub = field.annotation
        for sub_name in getattr(sub, "model_fields", {}):
            if f"`{sub_name}`" not in doc:
                missing.append(f"{name}.{sub_name}")
    assert not missing, f"fields missing from docs/spec.md: {missing}"


def test_set_items_read_json_values_and_keep_text():
    from train.spec import parse_set_items

    items = parse_set_items(
        ["steps=50", "lora.rank=8", "model=flux-dev", "resolutions=[512, 768]", "trigger_word="]
    )
    assert items == {
        "steps": 50,
        "lora.rank": 8,
        "model": "flux-dev",
        "resolutions": [512, 768],
        "trigger_word": "",
    }
    assert parse_spec(None, **items).lora.rank == 8
    with pytest.raises(ValueError, match=r"--input 'seed': expected FIELD=VALUE"):
        parse_set_items(["width=64", "seed"], flag="--input")
