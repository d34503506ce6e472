# make demo  -- set up .venv (if needed) and run the main job on the built-in offline data
# make test  -- set up .venv (if needed) and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tlexp-installed
DEMO_EXPERIMENT ?= tl-vs-scratch

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-install only when the dependencies change; safe to re-run.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tlexp train --strategy scratch,transfer,finetune --epochs 3 --experiment $(DEMO_EXPERIMENT)
	$(BIN)/tlexp compare --experiment $(DEMO_EXPERIMENT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m tlexp.bench

clean:
	rm -rf reports mlruns mlartifacts .pytest_cache
