# solov2_d2: everything goes through the virtual environment .venv/ in the project root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.solov2_d2-setup
PYTEST_ARGS ?=
# A Detectron2 source tree or archive to build with its compiled ops (tools/install_detectron2.py,
# path "source"); unset: the registry's v0.6 sdist without them.
DETECTRON2_SOURCE ?=
export DETECTRON2_SOURCE
# Detectron2 upstream main as an archive beside the clone (a test fixture, never part of the repo):
# `make test-d2main` runs the whole suite against it in its own environment.
D2MAIN_VENV := .venv-d2main
D2MAIN_ARCHIVE ?= $(lastword $(sort $(wildcard ../shared/vendor/detectron2-main-*.tar.gz)))
SOURCE_RECORD := $(VENV)/.detectron2-source

.PHONY: setup test test-fast test-d2main demo lint format benchmark clean FORCE

setup: $(STAMP)

# Holds the DETECTRON2_SOURCE of the last setup; rewritten (so the setup re-runs) only when it
# differs: setting, unsetting or changing it re-runs `make setup`.
$(SOURCE_RECORD): FORCE
	@mkdir -p $(VENV)
	@echo '$(DETECTRON2_SOURCE)' | cmp -s - $@ || echo '$(DETECTRON2_SOURCE)' > $@

# Re-runs only when the environment is missing, the install recipe changed, DETECTRON2_SOURCE
# changed, or the source archive/folder it names is newer: a second `make setup` costs a make
# check (well under a second).
$(STAMP): setup.cfg pyproject.toml setup.py tools/install_detectron2.py Makefile $(SOURCE_RECORD) \
		$(wildcard $(DETECTRON2_SOURCE))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch/torchvision: keep a working pair (e.g. a user's CUDA build); otherwise the registry's
	@# default builds in the supported range (tested on 2.14.1 and 2.15.x). torch>=2.14 also keeps
	@# pip away from the machine-local 2.13.0+cpu wheel, which cannot load the registry
	@# torchvision's compiled ops.
	$(PY) -c "import torch, torchvision.ops as o; o.nms(torch.zeros(0, 4), torch.zeros(0), 0.5)" \
		2>/dev/null || $(PIP) install "torch>=2.14,<2.16" torchvision
	$(PY) tools/install_detectron2.py
	$(PIP) install --no-build-isolation -e ".[dev,export]"
	@# Builds the C++ kernels now (~40 s, cached per machine) rather than in the first
	@# inference; without a compiler it reports the (bitwise equal) PyTorch fallback instead.
	$(PY) -c "from solov2_d2.modeling.mask_upsample import native_status as s; print('final masks:', s())"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The whole suite against Detectron2 main, built with its compiled ops through the installer's
# source path in $(D2MAIN_VENV)/ (same torch resolution as `make setup`).
test-d2main:
	@test -n "$(D2MAIN_ARCHIVE)" || { echo "make test-d2main: no Detectron2 main archive" \
		"(../shared/vendor/detectron2-main-*.tar.gz); set D2MAIN_ARCHIVE=/path/to/archive"; exit 2; }
	$(MAKE) test VENV=$(D2MAIN_VENV) DETECTRON2_SOURCE=$(abspath $(D2MAIN_ARCHIVE))

demo: setup
	$(PY) tools/demo_pipeline.py

benchmark: setup
	$(PY) benchmarks/matrix_nms.py
	$(PY) benchmarks/inference.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/plain_process.py
	$(PY) benchmarks/roofline.py

lint: setup
	$(PY) -m flake8 solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m black --check solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m isort --check-only solov2_d2 tests tools benchmarks train_net.py demo.py

format: setup
	$(PY) -m isort solov2_d2 tests tools benchmarks train_net.py demo.py
	$(PY) -m black solov2_d2 tests tools benchmarks train_net.py demo.py

clean:
	rm -rf $(VENV) $(D2MAIN_VENV) output build *.egg-info
