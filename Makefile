# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test venv lint format bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[server,test]'
	touch $(STAMP)

venv: $(STAMP)

## Start the whole stack (embedded PostgreSQL and Redis when no URLs are set).
run: $(STAMP)
	$(BIN)/outlast up

## Run the whole test suite (embedded servers unless DATABASE_URL / REDIS_URL are set).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check outlast app workers tasks tests bench migrations
	$(BIN)/ruff format --check outlast app workers tasks tests bench migrations

format: $(STAMP)
	$(BIN)/ruff format outlast app workers tasks tests bench migrations
	$(BIN)/ruff check --fix outlast app workers tasks tests bench migrations

## Benchmarks beside their baselines (installs the bench extra; see docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[server,test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
