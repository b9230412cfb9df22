# `make demo` and `make test` build .venv themselves when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pytest-xdist processes for the slow tier (one per core here); JOBS=0 runs it in pytest's own process
JOBS   ?= 2
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-slow test-all lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fmtransfer pipeline experiment=demo $(ARGS)

# Two tiers, chosen by the markers in pyproject.toml: `make test` is the fast one (the default marker expression:
# unit tests and a few in-process stage runs); `make test-slow` is the rest (tests marked e2e: a subprocess, the CLI,
# torchrun, the wheel; or slow: real data, whole pipelines, most stage runs); `make test-all` runs both. ARGS comes
# last, so `ARGS='-m e2e'` replaces a target's marker expression. The slow tier runs in JOBS processes, a test file
# to each (its module fixtures are built once); most of its time is single-threaded CLI start-up.
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "(e2e or slow) and not gpu" -n $(JOBS) --dist loadfile $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu" $(ARGS)

# ruff, then the import contracts in .importlinter (which layer may import which)
lint: $(STAMP)
	$(VENV)/bin/ruff check fmtransfer tests scripts
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) scripts/bench_train.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
