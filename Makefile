# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environments below and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vkd-installed
WORK ?= .work
QUIET_PIP := 2>&1 | grep -v "^WARNING: Location" || true
# A tested ms-swift stack is a requirements file, requirements/swift<S>.txt, and a venv built from it:
# .venv for the main one (4.6), .venv<S> beside it for each other stack. Adding a stack costs a
# requirements file and one word in SIDE_STACKS (plus its tests below if it needs more than the common set).
SIDE_STACKS := 312 45 44
# What every side stack runs: the patch points of its layout, the engine on its transformers, a real
# end-to-end run and knob-off equality (tests/stacks), and its own tests/swift<S> directory if it has one.
STACK_TESTS := tests/test_patches.py tests/test_loss.py tests/test_relation.py tests/stacks
# 4.4 is the lighter stack (the issue's floor: patch points and one end-to-end run), to keep `make test`
# within 45 minutes on 2 cores: its knob-off equality runs are left to the 4.5 and 3.12 stacks.
PYTEST_ARGS_44 := -k "not switched_off"

export HF_HUB_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv lint test test46 demo bench bench-gpu bench-gpu-dry clean

# $(call install_stack,VENV_DIR,STACK)
define install_stack
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip $(QUIET_PIP)
	$(1)/bin/python -m pip install -q -r requirements/swift$(2).txt $(QUIET_PIP)
	$(1)/bin/python -m pip install -q --no-deps -e . $(QUIET_PIP)
	$(1)/bin/python -c "import vkd_shim, swift, torch, torchvision, wrapt, structlog, yaml, msgspec, qwen_vl_utils, decord; print('stack $(2): ms-swift', swift.__version__)"
	touch $(1)/.vkd-installed
endef

venv: $(STAMP)

$(STAMP): requirements/swift46.txt setup.cfg pyproject.toml
	$(call install_stack,$(VENV),46)

.venv%/.vkd-installed: requirements/swift%.txt setup.cfg pyproject.toml
	$(call install_stack,.venv$*,$*)
# A stamp made by a pattern rule is otherwise deleted as intermediate, and the venv rebuilt every run.
.PRECIOUS: .venv%/.vkd-installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test46: venv
	$(PY) -m pytest -q

test%: .venv%/.vkd-installed
	.venv$*/bin/python -m pytest -q $(STACK_TESTS) $(wildcard tests/swift$*) $(PYTEST_ARGS_$*)

test: lint test46 $(addprefix test,$(SIDE_STACKS))

demo: venv
	$(PY) -m vkd_shim.demo --work $(WORK)/demo

bench: venv
	$(PY) tests/benchmarks/bench_startup.py --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_step.py --threads 1 --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_memory.py --threads 1 --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_attribution.py --model tiny --steps 9 --threads 1 --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_attribution.py --model small --steps 7 --threads 1 --out docs/BENCHMARKS.md
	$(PY) tests/benchmarks/bench_relation.py --out docs/BENCHMARKS.md

# The GPU suite (one run of at most 10 minutes on a single-GPU machine), and its dry run on CPU.
bench-gpu: venv
	tests/benchmarks/gpu_suite.sh --device cuda $(WORK)/gpu-suite

bench-gpu-dry: venv
	tests/benchmarks/gpu_suite.sh --device cpu $(WORK)/gpu-suite-dry

clean:
	rm -rf $(WORK) build *.egg-info
