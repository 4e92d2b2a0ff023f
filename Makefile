# Two entry points, both self-contained on a fresh machine:
#   make demo   -- set up, then run the main job on the bundled demo dataset
#   make test   -- set up, then run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test lint bench corpus clean

$(BIN)/feda2v-tk: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pin torch first: here it resolves to a local CPU wheel (an open range pulls GBs of CUDA packages).
	$(BIN)/pip install --quiet $(TORCH_PIN)
	# The audio extras (transformers, soundfile, soxr, datasets) for `embed` and its tests, privacy (opacus,
	# dp-accounting) for differential privacy; torch stays pinned.
	$(BIN)/pip install --quiet -e ".[test,plot,audio,datasets,federated,simulation,privacy]" ruff $(TORCH_PIN)
	touch $(BIN)/feda2v-tk

setup: $(BIN)/feda2v-tk

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	for script in bench/bench_*.py; do $(BIN)/python $$script || exit 1; done

# The realistic benchmark corpus (12 instrument families x 32 clips, AST-shaped) into bench/.cache/
# (or $FEDA2V_BENCH_CACHE, a cache directory that several worktrees can share);
# installs fluidsynth + fluid-soundfont-gm with apt when missing (as root). Prints the sanity check.
corpus: setup
	$(BIN)/python bench/corpus.py --check

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out bench/.cache
