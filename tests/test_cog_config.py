"""cog.yaml is valid for Cog, and the image's requirement pins resolve together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

from conftest import ROOT

SCHEMA = ROOT.parent / "shared" / "reference" / "cog-config-schema-v1.0.json"


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:
            name, version = line.split("==")
            out[name.split("[")[0].strip().lower()] = version.strip()
    return out


def test_cog_yaml_validates_against_the_official_schema():
    import jsonschema

    assert SCHEMA.is_file(), f"the official cog.yaml schema is expected at {SCHEMA} (shared/reference)"
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads(SCHEMA.read_text()))
    assert config["build"]["gpu"] is True
    assert config["predict"] == "predict.py:Predictor"
    assert config["train"] == "cog_train.py:Trainer" and not config["train"].startswith("train.py")
    for entry in (config["predict"], config["train"]):
        path, _, attr = entry.partition(":")
        assert (ROOT / path).is_file() and f"class {attr}" in (ROOT / path).read_text()
    assert (ROOT / config["build"]["python_requirements"]).is_file()


def test_image_pins_match_the_project_pins():
    """requirements-cog.txt and pyproject.toml's train/gpu extras must not drift apart."""
    image = _pins((ROOT / "requirements-cog.txt").read_text().splitlines())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["train"]
                     + project["optional-dependencies"]["gpu"])
    assert image == declared


def test_image_requirements_resolve_for_the_images_python():
    """A resolver dry run (wheel metadata only) for cog.yaml's Python on manylinux x86_64."""
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    python = str(config["build"]["python_version"])
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in range(17, 29)] + ["--platform=manylinux2014_x86_64"]
    # --isolated and no config file: resolve against PyPI as the image build does, not this machine's wheel cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet",
                           "--ignore-installed", "--only-binary=:all:", f"--python-version={python}",
                           "--implementation=cp", *platforms, "-r", str(ROOT / config["build"]["python_requirements"])],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and ("Network is unreachable" in proc.stderr or "NewConnectionError" in proc.stderr):
        pytest.fail(f"PyPI unreachable for the resolver dry run: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_documents_every_cog_input():
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in schema["components"]["schemas"]["Input"]["properties"] if f"`{name}`" not in readme]
    assert not missing, f"README's input table lacks {missing}"
