# The same commands a person types; CI (.ci/run) calls these targets.
# `make demo` and `make test` each create or update the virtual environment in .venv first.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint typecheck check bench setup setup-dev system-deps clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

demo: setup  ## set everything up and run `sealtorch demo`
	$(VENV)/bin/sealtorch demo

test: system-deps setup-dev  ## set everything up and run the whole test suite
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: setup-dev  ## ruff lint + format check
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup-dev  ## mypy --strict on src/ and benchmarks/
	$(VENV)/bin/mypy

check: lint typecheck  ## lint and type checks

bench: setup-dev  ## run every benchmark; prints a table and writes benchmarks/results.json
	$(PY) -m benchmarks $(BENCH_ARGS)

setup:  ## create/update .venv with what `sealtorch demo` needs
	scripts/bootstrap.sh demo

setup-dev:  ## create/update .venv with everything the tests and checks need
	scripts/bootstrap.sh dev

system-deps:  ## install the system packages the tests use (PostgreSQL, SoftHSM2)
	scripts/system-deps.sh

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build src/*.egg-info
