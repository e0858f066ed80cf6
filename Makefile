# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environment below and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vkd-installed
WORK ?= .work

export HF_HUB_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import vkd_shim, swift, torch, torchvision, wrapt, structlog, yaml, msgspec, qwen_vl_utils"
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: venv
	$(PY) tests/demo.py --work $(WORK)/demo

bench: venv
	$(PY) tests/benchmarks/bench_startup.py --out docs/BENCHMARKS.md

clean:
	rm -rf $(WORK) build *.egg-info
