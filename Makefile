# The two commands of the README. Each sets itself up on a fresh machine (virtualenv, install, migrate).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# make test talks to the real servers (see .ci/run, which starts any that is down).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/supervisor_app
TEST_BROKER_URL   ?= amqp://guest:guest@127.0.0.1:5672//
TEST_REDIS_URL    ?= redis://127.0.0.1:6379/15

.PHONY: demo test test-sqlite test-postgres lint bench chaos clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

## make demo: beat-free demo on the embedded default (SQLite + filesystem broker): a worker is killed mid-run.
demo: $(STAMP)
	rm -rf var/demo
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/demo $(BIN)/python manage.py migrate -v0
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/demo $(BIN)/python manage.py demo --logs var/demo/logs

## make test: lint, then the whole suite on PostgreSQL + RabbitMQ (+ Redis), then the portable part on SQLite.
test: $(STAMP) lint test-postgres test-sqlite

test-postgres: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) CELERY_TASK_DEFAULT_QUEUE=supervisor-test SUPERVISOR_TEST_REDIS_URL=$(TEST_REDIS_URL) \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

test-sqlite: $(STAMP)
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/test-sqlite \
		$(BIN)/python -m pytest -m "not postgres and not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy supervisor_app project

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

## make bench: supervised vs plain Celery on PostgreSQL + RabbitMQ (+ Redis); writes bench/results.md and plots.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## make chaos: the fault suite's long form: hundreds of runs under random, seeded faults, once per seed
## (CHAOS_SEEDS="1 2 3" by default; CHAOS_SEED=n for one). Uses its own database and queue.
CHAOS_SEEDS ?= $(if $(CHAOS_SEED),$(CHAOS_SEED),11 23 37)
CHAOS_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/supervisor_chaos
chaos: $(STAMP)
	@for seed in $(CHAOS_SEEDS); do \
		echo "== chaos seed $$seed"; \
		CHAOS_SEED=$$seed DATABASE_URL=$(CHAOS_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) \
		CELERY_TASK_DEFAULT_QUEUE=supervisor-chaos $(BIN)/python -m pytest tests/chaos.py -q $(PYTEST_ARGS) || exit 1; \
	done
