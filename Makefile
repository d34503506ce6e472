# make demo  -- set up .venv (if needed) and run the main job on the built-in offline data
# make test  -- set up .venv (if needed) and run the whole test suite
# make bench -- tlexp against the seed notebook's loop on $(DATA) (~5 min on a 2-core CPU)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tlexp-installed
DEMO_EXPERIMENT ?= tl-vs-scratch
# The benchmark's images (an ImageFolder tree): `make bench DATA=path/to/images`.
DATA ?= ../shared/datasets/hymenoptera

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-install only when the dependencies change; safe to re-run.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# A small study on the built-in digits: 3 strategies x 2 seeds x 3 training-set sizes (18 runs,
# ~4 min on a 2-core CPU), then the comparison report with the data-efficiency answer.
# Re-running skips the cells that already finished.
demo: $(STAMP)
	$(BIN)/tlexp sweep --strategies scratch,transfer,finetune --seeds 0,1 --samples-per-class 10,40,all \
		--epochs 4 --image-size 32 --experiment $(DEMO_EXPERIMENT)
	$(BIN)/tlexp compare --experiment $(DEMO_EXPERIMENT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# tlexp against the seed notebook's loop on $(DATA) (benchmarks/README.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py $(DATA)

clean:
	rm -rf reports mlruns mlartifacts .pytest_cache
