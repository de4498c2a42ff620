# The two commands (README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use and install the pinned environment into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metalcore-installed

.PHONY: demo test clean

$(STAMP): requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Main job: fine-tune a small Llama with metalcore patched in (embedded offline default; writes
# runs/finetune/, and resumes from its checkpoint when run again).
demo: $(STAMP)
	$(PY) recipes/finetune.py

test: $(STAMP)
	$(PY) scripts/run_tests.py

clean:
	rm -rf $(VENV) build *.egg-info
