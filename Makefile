# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# A local CPU build of torch, where the machine has one (it avoids gigabytes of CUDA packages).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
DEMO_OUT ?= runs/demo

.PHONY: install demo smoke test test-integrations clean

install: $(STAMP)

# torch first, then everything else with torch pinned; uv where it installs, pip otherwise.
# Bytecode is compiled at install time: it halves import time where PYTHONDONTWRITEBYTECODE is set.
$(STAMP): pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if $(PY) -m pip install -q uv==0.13.8; then \
	  $(VENV)/bin/uv pip install --python $(PY) $(FIND_LINKS) --compile-bytecode $(TORCH) && \
	  $(VENV)/bin/uv pip install --python $(PY) $(FIND_LINKS) --compile-bytecode $(TORCH) -r requirements.txt -e . ; \
	else \
	  $(PY) -m pip install -q $(FIND_LINKS) --compile $(TORCH) && \
	  $(PY) -m pip install -q $(FIND_LINKS) --compile $(TORCH) -r requirements.txt -e . ; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rto pipeline --task keyed --preset default --out $(DEMO_OUT)

smoke: $(STAMP)
	$(VENV)/bin/rto pipeline --task keyed --preset smoke --out runs/smoke

# Lint and format (ruff, configured in pyproject.toml), then the docs' tables of measurements
# rebuilt from the committed JSON and compared, then the tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) docs/tables.py --check
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Checks against the real packages rto integrates with (verl, vLLM), each in its own environment,
# built once: see integrations/run. Not part of `make test` (the environments take minutes to build).
test-integrations: $(STAMP)
	integrations/run

clean:
	rm -rf runs .pytest_cache
