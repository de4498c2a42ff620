# The two commands (README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install the pinned environment into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metalcore-installed
# torch's pin lives in requirements-dev.txt only; the CPU build comes from this project's machines'
# local wheel when pip finds one there, else from PyTorch's CPU index (PyPI's Linux wheel of the same
# version is the CUDA build, several GB).
TORCH_PIN := $(shell grep -m1 '^torch==' requirements-dev.txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test clean

$(STAMP): requirements-dev.txt pyproject.toml
	@echo "make: setting up $(VENV) (first run, or the requirements changed): $(TORCH_PIN) CPU build, triton, transformers, pytest; about 1-2 minutes, once"
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -m pip install --quiet --dry-run --no-deps --no-index "$(TORCH_PIN)" >/dev/null 2>&1; then \
		echo "make: $(TORCH_PIN) from a local wheel"; \
		$(PY) -m pip install --quiet "$(TORCH_PIN)"; \
	else \
		echo "make: $(TORCH_PIN) (CPU build) from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install --quiet "$(TORCH_PIN)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)
	@echo "make: $(VENV) ready"

# Main job: fine-tune a small Llama with metalcore patched in (embedded offline default; writes
# runs/finetune/, and resumes from its checkpoint when run again).
demo: $(STAMP)
	$(PY) recipes/finetune.py

test: $(STAMP)
	$(PY) scripts/run_tests.py

clean:
	rm -rf $(VENV) build *.egg-info
