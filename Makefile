# The two commands of the README: `make demo` and `make test`.
# Each creates the virtual environment (.venv) on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (a CPU build); the package itself accepts torch>=2.1.
TORCH ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q $(TORCH) -e '.[test]'
	touch $@

venv: $(VENV)/.test

# With the project's real data beside the checkout, the demo also explains a real LIDC-IDRI CT.
LIDC_CT ?= ../shared/data/lidc/LIDC-IDRI-0001
DEMO_ARGS ?= $(if $(wildcard $(LIDC_CT)),--ct $(LIDC_CT) --region-model lidc-malignancy)

demo: $(VENV)/.runtime
	$(VENV)/bin/lunggradcam demo --out lunggradcam-demo $(DEMO_ARGS)

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) lunggradcam-demo .pytest_cache
