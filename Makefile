# `make demo` and `make test` build .venv themselves when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-all lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fmtransfer pipeline experiment=demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m "" $(ARGS)

# ruff, then the import contracts in .importlinter (which layer may import which)
lint: $(STAMP)
	$(VENV)/bin/ruff check fmtransfer tests scripts
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) scripts/bench_train.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
