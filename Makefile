# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environments below and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vkd-installed
# Second environment: the ms-swift 3.12 stack, for the tests that prove 3.x support.
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.vkd-installed
WORK ?= .work
QUIET_PIP := 2>&1 | grep -v "^WARNING: Location" || true

export HF_HUB_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv venv312 lint test test46 test312 demo bench bench-gpu clean

venv: $(STAMP)

$(STAMP): requirements/swift46.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install -q -r requirements/swift46.txt $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps -e . $(QUIET_PIP)
	$(PY) -c "import vkd_shim, swift, torch, torchvision, wrapt, structlog, yaml, msgspec, qwen_vl_utils, decord; assert swift.__version__.startswith('4.6.')"
	touch $@

venv312: $(STAMP312)

$(STAMP312): requirements/swift312.txt setup.cfg pyproject.toml
	test -x $(PY312) || python3 -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY312) -m pip install -q -r requirements/swift312.txt $(QUIET_PIP)
	$(PY312) -m pip install -q --no-deps -e . $(QUIET_PIP)
	$(PY312) -c "import vkd_shim, swift, torch, torchvision, wrapt, structlog, yaml, msgspec, qwen_vl_utils, decord; assert swift.__version__.startswith('3.12.')"
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test46: venv
	$(PY) -m pytest -q

test312: venv312
	$(PY312) -m pytest -q tests/swift312 tests/test_patches.py tests/test_loss.py

test: lint test46 test312

demo: venv
	$(PY) -m vkd_shim.demo --work $(WORK)/demo

bench: venv
	$(PY) tests/benchmarks/bench_startup.py --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_step.py --threads 1 --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_memory.py --threads 1 --out docs/BENCHMARKS.md

bench-gpu: venv
	$(PY) tests/benchmarks/bench_step.py --device cuda --model 4b --out docs/BENCHMARKS.md

clean:
	rm -rf $(WORK) build *.egg-info
