# Set-up and run targets; the README's two commands are `make demo` and `make test`.
# PYTHON may point at any interpreter/venv: `make test PYTHON=.venv/bin/python`.
PYTHON ?= python3

.PHONY: install demo test test-slow test-all lint bench

# torch first: the CPU build (2.13.0) only when no torch is installed, so that a GPU user's
# CUDA build is never replaced; then fusion with its dev tools. One stamp per interpreter
# skips both once done for that interpreter.
STAMP := .install-$(shell echo '$(abspath $(PYTHON))' | cksum | cut -d' ' -f1).stamp

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: install
	$(PYTHON) scripts/demo.py

test: install
	$(PYTHON) -m pytest -q

# The checks too long for the default suite: multi-process training (tests/test_distributed.py)
# and the full-size metric sanity figures. CI runs them after `make test`.
test-slow: install
	$(PYTHON) -m pytest -q -m slow

test-all: install
	$(PYTHON) -m pytest -q -m "slow or not slow"

lint: install
	$(PYTHON) -m ruff check fusion scripts tests

bench: install
	$(PYTHON) scripts/bench.py shapes
	$(PYTHON) scripts/bench.py transformer
