# Two commands do all set-up:  `make demo` (train the embedded default) and `make test`.
# TORCH_SPEC picks the torch build: the CPU wheel here; on a CUDA cluster install your CUDA
# torch into .venv first (or set TORCH_SPEC='torch==2.x.y' with PIP_EXTRA_INDEX_URL) -- an
# already-installed torch that satisfies the spec is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glmtrain-installed

.PHONY: install demo test test-fast clean help

help:
	@echo "make demo   - create $(VENV), install, train the default model on the bundled genome"
	@echo "make test   - create $(VENV), install with dev extras, run the test suite"
	@echo "TORCH_SPEC=$(TORCH_SPEC) (override for another torch build)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m glmtrain

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
