# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and runs the main job (the pass-key demo on the shipped tiny models)
#   make test   installs into .venv and runs every test (kernels under Triton's CPU interpreter)
# On a CPU machine torch==2.13.0 goes in first (its CPU wheel); GPU users install their own torch build first.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/passkey.py --json out/passkey.json

test: $(VENV)/.installed
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -m "not triton" -p no:cacheprovider
	HYPOTHESIS_PROFILE=ci TRITON_INTERPRET=1 $(PY) -m pytest -m triton -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) benchmarks/cpu.py --json benchmarks/cpu.json --png benchmarks/cpu.png

bench-model: $(VENV)/.installed
	$(PY) benchmarks/model.py --json benchmarks/model.json --png benchmarks/model.png

.PHONY: install demo test bench bench-model
