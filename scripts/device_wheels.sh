#!/usr/bin/env bash
# Wheels the GPU machine lacks (or has at other versions), for Python 3.12 / x86-64, into .whl/.
# That machine has torch, accelerate, safetensors, numpy, pillow, matplotlib, tqdm and
# huggingface-hub 1.33 (enough for diffusers and transformers) but not diffusers, and an older
# transformers than ours; nothing can be fetched there.
# Carry .whl and install with bench/device.sh. Pins follow pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
pins=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))
pinned = {re.split("[=<>\\[]", d)[0].lower(): d for group in deps["project"]["optional-dependencies"].values() for d in group}
pinned.update({re.split("[=<>\\[]", d)[0].lower(): d for d in deps["project"]["dependencies"]})
for name in ("diffusers", "peft", "transformers", "tokenizers", "pydantic", "prodigyopt"):
    print(pinned[name])
PY
)
# what those need beyond the machine's own packages, at the versions this venv resolved
extra=$(python3 - <<'PY'
from importlib.metadata import version
for name in ("pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "regex",
             "importlib-metadata", "lazy-importer", "zipp"):
    print(f"{name}=={version(name)}")
PY
)
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins $extra
ls -la .whl
du -sh .whl
