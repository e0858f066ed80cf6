# Two entry points on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environments below and install everything they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vkd-installed
WORK ?= .work
# torch's CUDA build (the one that pairs with a working torchvision here) is about 5.5 GB: four venvs
# holding a copy each filled a CI machine's disk. It is installed once, into $(TORCH_DIR), and every
# venv reads it through a .pth file; each stack's requirements keep their own pins beside it.
TORCH_DIR := .venv-torch
TORCH_STAMP := $(TORCH_DIR)/.vkd-installed
# A tested ms-swift stack is a requirements file, requirements/swift<S>.txt, and a venv built from it:
# .venv for the main one (4.6), .venv<S> beside it for each other stack. Adding a stack costs a
# requirements file and one word in SIDE_STACKS (plus its tests below if it needs more than the common set).
SIDE_STACKS := 312 45 44
# What every side stack runs: the patch points of its layout, the engine on its transformers, a real
# end-to-end run and knob-off equality (tests/stacks), and its own tests/swift<S> directory if it has one.
STACK_TESTS := tests/test_patches.py tests/test_loss.py tests/test_relation.py tests/stacks
# More tests for one stack: 3.12 prepares the teacher inside GKDTrainer.__init__, so it gets DeepSpeed runs
# (full fine-tuning under ZeRO-2; LoRA under ZeRO-2 is a strict xfail there, an upstream bug).
STACK_TESTS_312 := 'tests/test_deepspeed.py::test_full_fine_tuning_with_a_plain_teacher[zero2]' \
	tests/test_deepspeed.py::test_vision_kd_under_zero2_with_a_zero3_teacher_matches_ddp

export HF_HUB_OFFLINE := 1
export MODELSCOPE_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv lint test test46 demo bench bench-gpu bench-gpu-dry gpu-wheelhouse gpu-image-dry clean

# $(call pip_install,PYTHON,LOG,ARGS): silent when it works (this machine's index prints a warning per
# package), and when it does not, the end of pip's log (a full disk, a resolver conflict) and a failed make.
pip_install = $(1) -m pip install -q $(3) >$(2) 2>&1 || { tail -n 25 $(2); echo "make: pip install $(3) failed; the whole log is $(2)"; exit 1; }

$(TORCH_STAMP): requirements/torch.txt
	rm -rf $(TORCH_DIR) && mkdir -p $(TORCH_DIR)
	$(call pip_install,python3,$(TORCH_DIR).log,--target $(TORCH_DIR) -r requirements/torch.txt)
	touch $@

# $(call install_stack,VENV_DIR,STACK)
define install_stack
	test -x $(1)/bin/python || python3 -m venv $(1)
	echo "$(abspath $(TORCH_DIR))" >"$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_vkd_torch.pth"
	$(call pip_install,$(1)/bin/python,$(1)/pip.log,--upgrade pip)
	$(call pip_install,$(1)/bin/python,$(1)/pip.log,-r requirements/swift$(2).txt)
	$(call pip_install,$(1)/bin/python,$(1)/pip.log,--no-deps -e .)
	$(1)/bin/python -c "import vkd_shim, swift, torch, torchvision, wrapt, structlog, yaml, msgspec, qwen_vl_utils, decord; print('stack $(2): ms-swift', swift.__version__, 'torch', torch.__version__, 'from', torch.__file__)"
	touch $(1)/.vkd-installed
endef

venv: $(STAMP)

$(STAMP): requirements/swift46.txt requirements/torch.txt setup.cfg pyproject.toml $(TORCH_STAMP)
	$(call install_stack,$(VENV),46)

.venv%/.vkd-installed: requirements/swift%.txt requirements/torch.txt setup.cfg pyproject.toml $(TORCH_STAMP)
	$(call install_stack,.venv$*,$*)
# A stamp made by a pattern rule is otherwise deleted as intermediate, and the venv rebuilt every run.
.PRECIOUS: .venv%/.vkd-installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test46: venv
	$(PY) -m pytest -q

test%: .venv%/.vkd-installed
	.venv$*/bin/python -m pytest -q $(STACK_TESTS) $(STACK_TESTS_$*) $(wildcard tests/swift$*)

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

# The lent GPU machine's image has Python 3.12, torch and transformers but no ms-swift and no package index: the
# wheels it lacks (requirements/gpu-image.txt, and the shim's own) travel in .whl, the device tool's carry [".whl"].
gpu-wheelhouse:
	tests/benchmarks/gpu_wheelhouse.sh .whl

# The suite's dry run on that machine's software: an image-like Python 3.12 venv (.venv-gpu-image, from
# requirements/gpu-image-base.txt; PYTHON312 names the interpreter), the wheelhouse installed on top exactly as the
# machine installs it (tests/benchmarks/gpu_install.sh), then gpu_suite.sh --device cpu. Not part of `make test`.
gpu-image-dry: gpu-wheelhouse
	tests/benchmarks/gpu_image_dry.sh $(WORK)/gpu-image-dry

clean:
	rm -rf $(WORK) build *.egg-info
