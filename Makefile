# Two entry points: `make demo` (the main job on an embedded default) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test lint

# torch first, pinned, so pip takes the CPU build on local disk instead of a multi-GB CUDA build.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PYTHON) -m ds_grace.commands.warmup

demo: install
	ds-grace demo

test: install
	$(PYTHON) -m pytest -q

lint: install
	ruff check .
	ruff format --check .
