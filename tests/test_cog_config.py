"""The Cog package as cog itself sees it: cog.yaml, the static schema, and the image's pins.

``cogcheck`` is cog 0.23.1's own pre-Docker checks (config validation and the tree-sitter
schema generator) built from cog's source: when it refuses the repository, ``cog push``
would too. It lives beside the clone (``../shared/tools/cogcheck``) or at ``$COGCHECK``;
without it these checks skip (saying where to get it), except in CI where they fail.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import tomllib
import yaml

from conftest import ROOT

CONFIG_SCHEMA = ROOT / "tests" / "data" / "cog-config-schema-v1.0.json"
SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"


def _cogcheck() -> Path:
    path = Path(os.environ.get("COGCHECK") or ROOT.parent / "shared" / "tools" / "cogcheck" / "cogcheck")
    if not path.is_file():
        why = (
            f"cogcheck (cog's own checks) not found at {path}: it ships in the shared tools beside the "
            f"clone (../shared/tools/cogcheck/cogcheck); set COGCHECK=/path/to/cogcheck to use another copy"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def _schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def test_cog_accepts_the_package_and_the_committed_schema_is_what_it_generates():
    proc = subprocess.run([str(_cogcheck()), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"cog would refuse this package:\n{proc.stderr}"
    assert json.loads(proc.stdout) == _schema(), "`.cog/openapi_schema.json` is stale: run `make schema`"
    assert proc.stdout == SCHEMA_FILE.read_text(), (
        "`.cog/openapi_schema.json` differs from cogcheck's bytes: run `make schema`"
    )


def test_cog_yaml_validates_against_the_config_schema():
    import jsonschema

    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, json.loads(CONFIG_SCHEMA.read_text()))
    assert config["build"]["gpu"] is True
    assert "predict" not in config, "predict: is deprecated; the entry is run:"
    assert config["run"] == "predict.py:Predictor"
    assert config["train"] == "cog_train.py:Trainer" and not config["train"].startswith("train.py")
    assert not any(e.split("=")[0].startswith(("PYTHON", "COG_")) for e in config.get("environment", []))
    for entry in (config["run"], config["train"]):
        path, _, attr = entry.partition(":")
        assert (ROOT / path).is_file() and f"class {attr}" in (ROOT / path).read_text()
    assert (ROOT / config["build"]["python_requirements"]).is_file()


def _params(module: str, cls: str, method: str) -> tuple[dict, dict]:
    sys.path.insert(0, str(ROOT))
    fn = getattr(getattr(__import__(module), cls), method)
    return (
        {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"},
        typing.get_type_hints(fn),
    )


@pytest.mark.parametrize(
    "component,module,cls,method",
    [("Input", "predict", "Predictor", "run"), ("TrainingInput", "cog_train", "Trainer", "train")],
)
def test_the_static_schema_says_what_the_code_says(component, module, cls, method):
    """cog reads the entry files without running them; what it resolves must be what Python sees
    (a computed default, a joined string or an expression bound would differ or vanish)."""
    schema = _schema()["components"]["schemas"]
    props = schema[component]["properties"]
    params, hints = _params(module, cls, method)
    assert set(props) == set(params)
    for name, param in params.items():
        field, prop = param.default, props[name]
        if "allOf" in prop:
            enum = schema[prop["allOf"][0]["$ref"].split("/")[-1]]["enum"]
            assert enum == list(field.choices), name
        assert prop.get("description") == field.description, name
        if field.default is not None or "default" in prop:
            assert prop.get("default") == field.default, name
        assert prop.get("minimum") == field.ge and prop.get("maximum") == field.le, name
        assert prop.get("pattern") == field.regex and prop.get("maxLength") == field.max_length, name
        optional = type(None) in typing.get_args(hints[name]) or field.default is not None
        assert (name in schema[component].get("required", [])) != optional, name


# The constraint keywords a Cog input and a spec field can both state (cog's ge/le/max_length/
# regex/choices -> minimum/maximum/maxLength/pattern/enum in the schema).
_BOUNDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "enum",
)
# Spec fields a Cog input writes in another form, parsed before the spec sees them: their bounds are
# the spec's to check (the Cog input's regex is only the form).
_REFORMATTED = {"resolutions": "resolutions", "validation.prompts": "validation_prompts"}  # -> the input


def _train_overrides() -> dict[str, str]:
    """Cog train input name -> the spec field it sets, read from cog_train.py's ``overrides`` dict
    (an input parsed first, such as the prompt lines, by the field's name in ``_REFORMATTED``)."""
    for node in ast.walk(ast.parse((ROOT / "cog_train.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "overrides" for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            pairs = [(k.value, v.id) for k, v in zip(node.value.keys, node.value.values, strict=True)]  # type: ignore[union-attr]
            return {_REFORMATTED.get(path, name): path for path, name in pairs}
    raise AssertionError("cog_train.py builds no overrides dict")


def _spec_field_schema(path: str) -> dict:
    """The JSON schema of a (dotted) spec field, its null branch dropped."""
    from train.spec import TrainingSpec

    root = TrainingSpec.model_json_schema()
    node = root
    for part in path.split("."):
        if "$ref" in node:
            node = root["$defs"][node["$ref"].split("/")[-1]]
        node = node["properties"][part]
    branches = [b for b in node.get("anyOf", [node]) if b.get("type") != "null"]
    assert len(branches) == 1, (path, node)
    return {**branches[0], **{k: v for k, v in node.items() if k in _BOUNDS}}


def test_every_train_input_states_its_spec_field_s_bounds_and_choices():
    """cog's static generator needs literals, so each input's bounds are written out in cog_train.py;
    this keeps them the spec's own: Cog refuses exactly what the spec would, with a 422 naming the
    input, before a GPU second is billed (a steps cap of 100,000 once stood where the spec allows
    1,000,000)."""
    schema = _schema()["components"]["schemas"]
    inputs = schema["TrainingInput"]["properties"]
    overrides = _train_overrides()
    assert set(overrides) <= set(inputs)
    for name, path in overrides.items():
        prop = dict(inputs[name])
        if "allOf" in prop:  # choices: cog writes them as an enum component
            component = schema[prop.pop("allOf")[0]["$ref"].split("/")[-1]]
            prop.update(enum=component["enum"], type=component["type"])
        spec = _spec_field_schema(path)
        if path in _REFORMATTED:
            assert spec["type"] == "array" and prop["type"] == "string", (name, path)
            continue
        assert prop["type"] == spec["type"] or {prop["type"], spec["type"]} == {"number", "integer"}, name
        cog_bounds = {k: prop[k] for k in _BOUNDS if k in prop}
        spec_bounds = {k: spec[k] for k in _BOUNDS if k in spec}
        if "const" in spec:
            spec_bounds["enum"] = [spec["const"]]
        assert cog_bounds == spec_bounds, f"Cog input {name!r} and spec field {path!r} disagree"


def test_the_run_entry_s_choices_are_the_renderer_s_own():
    from train.inference import ASPECT_RATIOS, MATCH_INPUT, OUTPUT_FORMATS

    schema = _schema()["components"]["schemas"]
    run = schema["Input"]["properties"]

    def enum(prop):
        return schema[prop["allOf"][0]["$ref"].split("/")[-1]]["enum"]

    assert enum(run["aspect_ratio"]) == [MATCH_INPUT, *ASPECT_RATIOS, "custom"]
    assert enum(run["output_format"]) == list(OUTPUT_FORMATS)


def _pins(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:
            name, version = line.split("==")
            out[name.split("[")[0].strip().lower()] = version.strip()
    return out


def test_image_pins_match_the_project_pins():
    """requirements-cog.txt and pyproject.toml's train/gpu extras must not drift apart."""
    image = _pins((ROOT / "requirements-cog.txt").read_text().splitlines())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(
        project["dependencies"]
        + project["optional-dependencies"]["train"]
        + project["optional-dependencies"]["gpu"]
    )
    assert image == declared


def test_image_requirements_resolve_for_the_images_python():
    """A resolver dry run (wheel metadata only) for cog.yaml's Python on manylinux x86_64."""
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    python = str(config["build"]["python_version"])
    platforms = [f"--platform=manylinux_2_{v}_x86_64" for v in range(17, 29)] + [
        "--platform=manylinux2014_x86_64"
    ]
    # --isolated and no config file: resolve against PyPI as the image build does, not this machine's wheel cache
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--only-binary=:all:",
            f"--python-version={python}",
            "--implementation=cp",
            *platforms,
            "-r",
            str(ROOT / config["build"]["python_requirements"]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0 and (
        "Network is unreachable" in proc.stderr or "NewConnectionError" in proc.stderr
    ):
        pytest.fail(f"PyPI unreachable for the resolver dry run: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_documents_every_cog_input():
    schema = _schema()["components"]["schemas"]
    readme = (ROOT / "README.md").read_text()
    for component in ("Input", "TrainingInput"):
        missing = [name for name in schema[component]["properties"] if f"`{name}`" not in readme]
        assert not missing, f"README's {component} table lacks {missing}"
