# Everything runs from a virtual environment made here; `make demo` and `make test` set it up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install weights demo train-demo browser lint test schema clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the pinned dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[train,client,dev]"
	touch $(STAMP)

install: $(STAMP)

# Tiny random Flux/SDXL pipelines for the demo and the tests (seconds, no download).
weights/.written: $(STAMP) $(wildcard train/tiny/*.py train/models/*/tiny.py train/models/*/__init__.py) train/models/tiny_common.py
	$(BIN)/python -m train.tiny --out weights
	touch $@

weights: weights/.written

# The main job on the embedded default, end to end: the client packs the bundled sample set and
# submits it to the real Cog server (this repo's predict.py) on loopback, which trains a tiny Flux
# LoRA on the CPU; the client follows the webhooks, downloads the outputs and prints where they are.
demo: weights
	$(BIN)/python scripts/demo.py

# The trainer alone, without the Cog server and the client.
train-demo: weights
	$(BIN)/python -m train --spec examples/demo-spec.json --data examples/sample-dataset --out runs/demo

# Debian's Chromium for the web page's browser tests (Playwright drives it; it never downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The house checks: lint and format (ruff), types (pyright, basic mode; config in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

# Two workers (pytest-xdist, one per core, one torch thread each: tests/conftest.py), files kept whole
# so a file's shared fixtures are built once; TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: lint browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30

# The Cog schema as cog itself generates it (cog 0.23.1's static generator, offline): what
# `cog build` bakes into the image and the Cog server validates inputs against.
COGCHECK ?= ../shared/tools/cogcheck/cogcheck
schema:
	@test -x $(COGCHECK) || { echo "cogcheck not found at $(COGCHECK) (set COGCHECK=...)"; exit 1; }
	$(COGCHECK) . > .cog/openapi_schema.json.tmp && mv .cog/openapi_schema.json.tmp .cog/openapi_schema.json

clean:
	rm -rf runs .pytest_cache
