# Two entry points, each doing its own (idempotent) set-up first:
#   make demo   the main job: a continual scenario on the built-in synthetic dataset (CPU)
#   make test   the test suite
# Variables:
#   VENV=.venv          where the virtualenv lives
#   PY=...              use an existing interpreter instead (skips all set-up), e.g. PY=python
#   D2_SOURCE=...       install detectron2 from source (a git URL or a local checkout) instead of
#                       the PyPI wheel sal-detectron2 (detectron2's own code, cp310 build)
#   DEVICE=cpu|cuda     device for the demo

VENV ?= .venv
D2_SOURCE ?=
DEVICE ?= cpu
SYSTEM_PYTHON ?= python3

ifdef PY
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.comformer-setup
endif

.PHONY: demo test setup clean-venv

setup: $(SETUP)

$(VENV)/.comformer-setup: requirements.txt setup.py Makefile
	test -x $(VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VENV)/bin/python -m pip install -q -r requirements.txt
ifeq ($(D2_SOURCE),)
	$(VENV)/bin/python -m pip install -q --upgrade --no-deps --only-binary=:all: \
	    --python-version 3.10 --implementation cp \
	    --target "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	    sal-detectron2==0.7.2
	# the wheel also ships detectron2's scripts as a top-level `tools` package; drop it
	rm -rf "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tools"
else
	$(VENV)/bin/python -m pip install -q --no-build-isolation "$(D2_SOURCE)"
endif
	$(VENV)/bin/python -m pip install -q --no-deps -e .
	$(VENV)/bin/python -c "import comformer, detectron2, panopticapi; print('comformer set-up OK')"
	touch $@

test: $(SETUP)
	$(PY) -m pytest -q tests

demo: $(SETUP)
	$(PY) tools/demo.py --device $(DEVICE)

clean-venv:
	rm -rf $(VENV)
