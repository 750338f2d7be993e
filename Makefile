# The two commands of the README. Each sets itself up on a fresh machine (virtualenv, install, migrate).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# make test talks to the real servers (see .ci/run, which starts any that is down).
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/supervisor_app
TEST_BROKER_URL   ?= amqp://guest:guest@127.0.0.1:5672//
TEST_REDIS_URL    ?= redis://127.0.0.1:6379/15
TEST_QUEUE        ?= supervisor-test

.PHONY: demo test test-sqlite test-postgres test-quorum test-restarts lint bench chaos clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

## make demo: beat-free demo on the embedded default (SQLite + filesystem broker): a worker is killed mid-run.
demo: $(STAMP)
	rm -rf var/demo
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/demo $(BIN)/python manage.py migrate -v0
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/demo $(BIN)/python manage.py demo --logs var/demo/logs

## make test: lint, then the whole suite on PostgreSQL + RabbitMQ (+ Redis), then the server restarts
## and crashes on private servers of their own, then the portable part on SQLite.
test: $(STAMP) lint test-postgres test-quorum test-restarts test-sqlite

test-postgres: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) CELERY_TASK_DEFAULT_QUEUE=$(TEST_QUEUE) SUPERVISOR_TEST_REDIS_URL=$(TEST_REDIS_URL) \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# RabbitMQ quorum queues: the kill and hang scenarios again, the default queue declared as a quorum queue.
test-quorum: $(STAMP)
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) CELERY_TASK_DEFAULT_QUEUE=$(TEST_QUEUE)-quorum \
		CELERY_TASK_DEFAULT_QUEUE_TYPE=quorum $(BIN)/python -m pytest $(PYTEST_ARGS) tests/integration/test_quorum.py \
		tests/integration/test_recovery_integration.py -k "quorum or sigkill or sigstop or prefetched"

# PostgreSQL, RabbitMQ and Redis started on other ports for these tests alone (tests/faults/servers.py):
# restarting the machine's servers would cut every other client.
test-restarts: $(STAMP)
	CELERY_TASK_DEFAULT_QUEUE=supervisor-restarts $(BIN)/python -m tests.faults.servers -- \
		$(BIN)/python -m pytest -m restarts $(PYTEST_ARGS)

test-sqlite: $(STAMP)
	env -u DATABASE_URL -u CELERY_BROKER_URL DEMO_VAR_DIR=var/test-sqlite \
		$(BIN)/python -m pytest -m "not postgres and not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy supervisor_app project
	$(BIN)/lint-imports --no-cache --no-logo

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

## make bench: supervised vs plain Celery and the peers (django-celery-results, Procrastinate: bench/requirements.txt)
## on PostgreSQL + RabbitMQ (+ Redis); writes bench/results.md and plots.
bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## make chaos: the fault suite's long form: hundreds of runs under random, seeded faults, once per seed,
## on private servers it may restart and crash (tests/faults/servers.py). CHAOS_SEEDS run with RabbitMQ,
## CHAOS_REDIS_SEEDS with Redis as the broker, CHAOS_QUORUM_SEEDS with RabbitMQ quorum queues; CHAOS_SEED=n runs one seed (RabbitMQ); CHAOS_RUNS per seed.
CHAOS_SEEDS ?= $(if $(CHAOS_SEED),$(CHAOS_SEED),11 23 37)
CHAOS_REDIS_SEEDS ?= $(if $(CHAOS_SEED),,41)
CHAOS_QUORUM_SEEDS ?= $(if $(CHAOS_SEED),,53)
chaos: $(STAMP)
	@for seed in $(CHAOS_SEEDS); do \
		echo "== chaos seed $$seed, RabbitMQ"; \
		CHAOS_SEED=$$seed CELERY_TASK_DEFAULT_QUEUE=supervisor-chaos $(BIN)/python -m tests.faults.servers -- \
			$(BIN)/python -m pytest tests/faults/chaos.py -q $(PYTEST_ARGS) || exit 1; \
	done; \
	for seed in $(CHAOS_REDIS_SEEDS); do \
		echo "== chaos seed $$seed, Redis"; \
		CHAOS_SEED=$$seed CELERY_TASK_DEFAULT_QUEUE=supervisor-chaos $(BIN)/python -m tests.faults.servers --broker redis -- \
			$(BIN)/python -m pytest tests/faults/chaos.py -q $(PYTEST_ARGS) || exit 1; \
	done; \
	for seed in $(CHAOS_QUORUM_SEEDS); do \
		echo "== chaos seed $$seed, RabbitMQ quorum queues"; \
		CHAOS_SEED=$$seed CELERY_TASK_DEFAULT_QUEUE=supervisor-chaos-quorum CELERY_TASK_DEFAULT_QUEUE_TYPE=quorum \
			$(BIN)/python -m tests.faults.servers -- $(BIN)/python -m pytest tests/faults/chaos.py -q $(PYTEST_ARGS) || exit 1; \
	done
	@echo "== 1,000 sweeps that publish: pools and connections flat; partitions with every kind of body"
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) CELERY_TASK_DEFAULT_QUEUE=supervisor-hygiene \
		HYGIENE_SWEEPS=1000 PARTITION_BODIES=all $(BIN)/python -m pytest tests/integration/test_hygiene.py \
		tests/faults/test_partition.py -q $(PYTEST_ARGS)
	@echo "== random interleavings of dispatch, claim, finish, kill, sweep, cancel, retry and schedule edits (Hypothesis, long profile)"
	DATABASE_URL=$(TEST_DATABASE_URL) CELERY_BROKER_URL=$(TEST_BROKER_URL) HYPOTHESIS_PROFILE=chaos \
		$(BIN)/python -m pytest tests/db/test_properties.py -q $(PYTEST_ARGS)
