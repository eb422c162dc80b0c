# The platform's commands. Only Python 3.11 is needed: with DATABASE_URL / REDIS_URL
# unset, real Postgres and Redis servers are started from pip wheels (data under var/).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SERVICES := $(BIN)/python scripts/devservices.py

.PHONY: run demo web worker manage test lint format bench bench-tasks clean-var

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

## run: everything (embedded Postgres/Redis if needed, migrations, web + workers) in the foreground
run: $(STAMP)
	$(SERVICES) --instance dev run -- $(BIN)/python scripts/platform.py all

## demo: `make run` plus a simulated fleet (300 devices, alert rules, a staged firmware rollout)
demo: $(STAMP)
	$(SERVICES) --instance dev run -- $(BIN)/python scripts/platform.py demo

## web: the ASGI server alone (WEB_CONCURRENCY processes on PORT)
web: $(STAMP)
	$(SERVICES) --instance dev run -- $(BIN)/python scripts/platform.py web

## worker: Celery worker + beat + event-queue consumers
worker: $(STAMP)
	$(SERVICES) --instance dev run -- $(BIN)/python scripts/platform.py worker

## manage: any manage.py command against the same servers, e.g. make manage ARGS="create_api_token alice"
manage: $(STAMP)
	@$(SERVICES) --instance dev run -- $(BIN)/python scripts/platform.py manage $(ARGS)

## test: the whole suite on real Postgres and Redis (PYTEST_ARGS to narrow it)
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache --no-logo
	$(SERVICES) --instance test run -- $(BIN)/python -m pytest $(PYTEST_ARGS)

## lint: ruff, and the app boundaries (import-linter contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache --no-logo

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

## bench: the ingestion targets as ratios to ceilings measured in the same run (bench/suite.py, docs/perf/README.md;
## needs wrk: apt-get install wrk). BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--rounds 3"
bench: $(STAMP)
	$(SERVICES) --instance bench run -- $(BIN)/python bench/suite.py $(BENCH_ARGS)

## bench-tasks: prove the bug-fix benchmark valid (tasks_bench/): each task's graders pass on the code and fail
## with its bug.patch, 3 runs of each in copies of the repository; table + var/tasks_bench/verify.json.
## ARGS passes options, e.g. make bench-tasks ARGS="--task 01 --repeat 1"
bench-tasks: $(STAMP)
	$(SERVICES) --instance bench-tasks run -- env DJANGO_SETTINGS_MODULE=iot.settings_test \
		$(BIN)/python manage.py tasks_bench verify $(ARGS)

clean-var:
	rm -rf var/
