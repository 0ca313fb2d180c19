# The two commands of the README: `make demo` and `make test`.
# Each creates the virtual environment (.venv) on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (a CPU build); the package itself accepts torch>=2.1.
TORCH ?= torch==2.13.0

.PHONY: demo test test-slicer58 venv clean

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

# ruff (configured in pyproject.toml): lint (unused names, import order, complexity) and format
test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The DICOM, database and pipeline tests once more on the packages Slicer 5.8.1 bundles, which
# the engine uses inside Slicer (SuperBuild/External_python-*.cmake and External_SimpleITK.cmake of
# Slicer v5.8.1; and a setuptools that still has pkg_resources, which pydicom 2.4 uses: Slicer has
# 70.0, torch asks for 77 or newer), in a venv of their own, so
# that a break only Slicer would show fails here.
SLICER58_VENV ?= .venv-slicer58
SLICER58_PINS := pydicom==2.4.4 numpy==1.26.4 scipy==1.13.1 SimpleITK==2.3.1 setuptools==80.9.0
SLICER58_TESTS := Testing/Python/io/test_dicom.py Testing/Python/io/test_dicom_write.py Testing/Python/io/test_ctkdb.py \
	Testing/Python/pipeline/test_pipeline.py Testing/Python/slicer_module/test_slicer_logic.py Testing/Python/mrml/test_mrml.py

$(SLICER58_VENV)/.test: pyproject.toml Makefile
	$(PYTHON) -m venv $(SLICER58_VENV)
	$(SLICER58_VENV)/bin/python -m pip install -q --upgrade pip
	$(SLICER58_VENV)/bin/python -m pip install -q $(TORCH) $(SLICER58_PINS) -e '.[test]'
	touch $@

test-slicer58: $(SLICER58_VENV)/.test
	$(SLICER58_VENV)/bin/python -c "import pydicom, numpy, scipy, SimpleITK; \
	  print('Slicer 5.8.1 packages: pydicom', pydicom.__version__, 'numpy', numpy.__version__, \
	        'scipy', scipy.__version__, 'SimpleITK', SimpleITK.Version_VersionString())"
	$(SLICER58_VENV)/bin/python -m pytest $(SLICER58_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(SLICER58_VENV) lunggradcam-demo .pytest_cache
