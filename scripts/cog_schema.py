"""Write .cog/openapi_schema.json from the signatures of predict.py and cog_train.py.

    python scripts/cog_schema.py            # rewrite the file
    python scripts/cog_schema.py --check    # exit 1 if the committed file is stale

The Cog CLI (``cog build``) normally generates this file; it needs Docker, which we do not
have here. The Cog HTTP server validates inputs only against this file (components
``Input`` and ``TrainingInput``): without it every input would be accepted. The shape
follows Cog's generator: choices become enum components referenced with ``allOf``, ge/le
become minimum/maximum, secrets are ``format: password`` with ``x-cog-secret``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / ".cog" / "openapi_schema.json"
ENTRIES = {"predict": ("predict", "Predictor"), "train": ("cog_train", "Trainer")}


def _input_component(info, title: str, enums: dict[str, Any]) -> dict[str, Any]:
    from cog._adt import Repetition

    props: dict[str, Any] = {}
    required = []
    for name, f in info.inputs.items():
        prop: dict[str, Any] = {"x-order": f.order, "title": name.replace("_", " ").title()}
        if f.choices is not None:
            enum_name = "".join(part.title() for part in name.split("_"))
            enums[enum_name] = {"title": enum_name, "description": "An enumeration.", "enum": f.choices,
                                **{k: v for k, v in f.type.primitive.json_type().items() if k == "type"}}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{enum_name}"}]
        else:
            prop.update(f.type.json_type())
        if f.default is not None:
            prop["default"] = f.type.json_encode(f.default)
        elif f.type.repetition is Repetition.REQUIRED:
            required.append(name)
        if f.description:
            prop["description"] = f.description
        for key, value in (("minimum", f.ge), ("maximum", f.le), ("minLength", f.min_length),
                           ("maxLength", f.max_length), ("pattern", f.regex), ("deprecated", f.deprecated)):
            if value is None:
                continue
            if key in ("minimum", "maximum") and prop.get("type") == "integer":
                value = int(value)  # Cog's inspector stores bounds as floats
            prop[key] = value
        props[name] = prop
    schema: dict[str, Any] = {"title": title, "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def build_schema() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from cog._inspector import create_predictor

    predict = create_predictor(*ENTRIES["predict"])
    train = create_predictor(*ENTRIES["train"])
    enums: dict[str, Any] = {}
    components = {
        "Input": _input_component(predict, "Input", enums),
        "Output": predict.output.json_type(),
        "TrainingInput": _input_component(train, "TrainingInput", enums),
        "TrainingOutput": {**train.output.json_type(), "title": "TrainingOutput"},
        **enums,
    }

    def op(kind: str, summary: str) -> dict[str, Any]:
        inp, out = ("Input", "Output") if kind == "predict" else ("TrainingInput", "TrainingOutput")
        return {"post": {"summary": summary, "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "properties": {"input": {"$ref": f"#/components/schemas/{inp}"}}}}}},
            "responses": {"200": {"description": "Successful Response", "content": {"application/json": {
                "schema": {"type": "object", "properties": {"output": {"$ref": f"#/components/schemas/{out}"}}}}}}}}}

    return {
        "openapi": "3.0.2",
        "info": {"title": "advanced-trainer", "version": "0.1.0"},
        "paths": {"/predictions": op("predict", "Run one training job as a prediction"),
                  "/trainings": op("train", "Run one training job as a training")},
        "components": {"schemas": components},
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed schema is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not SCHEMA_FILE.is_file() or SCHEMA_FILE.read_text() != text:
            print(f"{SCHEMA_FILE.relative_to(ROOT)} is stale: run python scripts/cog_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.parent.mkdir(exist_ok=True)
    SCHEMA_FILE.write_text(text)
    print(SCHEMA_FILE.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
