# Quick start: `make demo` (set up, then run the main job on the embedded sentiment world) and
# `make test` (set up with every extra, then lint and run the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Keep the world cache inside the checkout, so a clone is self-contained.
export ALIGNKIT_CACHE ?= $(CURDIR)/.cache/alignkit
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-slow lint bench clean

# pyproject.toml declares ranges; constraints.txt pins the exact versions tested (torch: the CPU wheel).
# One venv for everything: the demo world's packages, the report's plots, TensorBoard and the test tools.
EXTRAS := test,demo,report,tensorboard

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/alignkit pipeline configs/sentiment/pipeline.yaml

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench examples

test: lint
	$(BIN)/pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) .cache runs

# Side-by-side speed against TRL (installs TRL 1.16 / 1.12 in bench/.venv-trl*); not part of `make test`.
bench: $(BIN)/.installed
	bash bench/setup_peers.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)
