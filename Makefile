# solov2_d2: everything goes through the virtual environment .venv/ in the project root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.solov2_d2-setup
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint format benchmark clean

setup: $(STAMP)

# Re-runs only when the environment is missing or the install recipe changed: a second
# `make setup` costs a make check (well under a second).
$(STAMP): setup.cfg pyproject.toml tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch/torchvision: keep a working pair (e.g. a user's CUDA build); otherwise the registry's
	@# default builds. torch>=2.14 keeps pip away from the machine-local 2.13.0+cpu wheel, which
	@# cannot load the registry torchvision's compiled ops.
	$(PY) -c "import torch, torchvision.ops as o; o.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)" \
		2>/dev/null || $(PIP) install "torch>=2.14" torchvision
	$(PY) tools/install_detectron2.py
	$(PIP) install --no-build-isolation -e ".[dev]"
	@# Builds the C++ kernels now (~40 s, cached per machine) rather than in the first
	@# inference; without a compiler it reports the (bitwise equal) PyTorch fallback instead.
	$(PY) -c "from solov2_d2.modeling.mask_upsample import native_status as s; print('final masks:', s())"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo_pipeline.py

benchmark: setup
	$(PY) benchmarks/matrix_nms.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/training.py

lint: setup
	$(PY) -m flake8 solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m black --check solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m isort --check-only solov2_d2 tests tools benchmarks train_net.py demo.py

format: setup
	$(PY) -m isort solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m black solov2_d2 tests tools benchmarks train_net.py demo.py

clean:
	rm -rf $(VENV) output build *.egg-info
