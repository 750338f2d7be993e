"""Drop-in install: the built wheel, added to a brand-new `django-admin startproject` project as the
README says, migrates on PostgreSQL and runs a supervised task end to end with a real worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import psycopg
import pytest

from project.processes import ROOT, spawn, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture
def dropin_db() -> str:
    name = f"dropin_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_wheel_into_a_new_project_runs_a_supervised_task(tmp_path: Path, dropin_db: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "DJANGO_SETTINGS_MODULE", "PYTHONPATH"}}
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        ROOT, env, timeout=300)  # fmt: skip
    wheel = next(dist.glob("supervisor_app-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "supervisor_app/migrations/0001_initial.py" in names
    assert not any(n.startswith(("project/", "tests/", "bench/")) for n in names), "demo/tests leaked into the wheel"

    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path, env)
    work = tmp_path / "work"
    work.mkdir()
    env["PYTHONPATH"] = str(site)
    run([sys.executable, "-m", "django", "startproject", "shop", str(work)], work, env)
    (work / "billing").mkdir()
    (work / "billing" / "__init__.py").write_text("")
    (work / "billing" / "tasks.py").write_text(
        textwrap.dedent("""
        from celery import shared_task
        from supervisor_app import SupervisedTask

        @shared_task(base=SupervisedTask, bind=True)
        def invoice(self, customer):
            self.heartbeat(progress={"customer": customer})
            return customer
    """)
    )
    (work / "shop" / "celery.py").write_text(
        textwrap.dedent("""
        import os
        from celery import Celery
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")
        app = Celery("shop")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.autodiscover_tasks()
    """)
    )
    (work / "shop" / "__init__.py").write_text("from .celery import app as celery_app\n")
    queue = f"dropin-{uuid.uuid4().hex[:6]}"
    with (work / "shop" / "settings.py").open("a") as fh:
        fh.write(
            textwrap.dedent(f"""
            # --- as the README says
            INSTALLED_APPS += ["django_celery_beat", "supervisor_app", "billing"]
            DATABASES = {{"default": {{"ENGINE": "django.db.backends.postgresql", "NAME": "{dropin_db}",
                "USER": "postgres", "HOST": "127.0.0.1", "PORT": "5432", "CONN_MAX_AGE": 600}}}}
            CELERY_BROKER_URL = "{os.environ["CELERY_BROKER_URL"]}"
            CELERY_TASK_DEFAULT_QUEUE = "{queue}"
            CELERY_TASK_SERIALIZER = "json"
            CELERY_ACCEPT_CONTENT = ["json"]
            CELERY_WORKER_PREFETCH_MULTIPLIER = 1
            SUPERVISOR_HEARTBEAT_INTERVAL = 0.5
            SUPERVISOR_LEASE_TIMEOUT = 3
            SUPERVISOR_SWEEP_INTERVAL = 0.5
        """)
        )
    env["DJANGO_SETTINGS_MODULE"] = "shop.settings"
    manage = [sys.executable, str(work / "manage.py")]
    where = run([*manage, "shell", "-c", "import supervisor_app; print(supervisor_app.__file__)"], work, env)
    assert where.strip().splitlines()[-1].startswith(str(site)), (
        "the test must use the installed wheel, not the checkout"
    )
    run([*manage, "check"], work, env)
    run([*manage, "migrate", "-v0"], work, env)

    log_dir = tmp_path / "logs"
    # A node name of its own: a developer's worker on the same broker (default name celery@host) holds
    # that name's exclusive pidbox queue, and a second celery@host exits at start (RESOURCE_LOCKED).
    worker = spawn("dropin-worker", [sys.executable, "-m", "celery", "-A", "shop", "worker", "-c", "1",
                                     "-n", f"dropin-{os.getpid()}@%h",
                                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info"],
                   log_dir, env, cwd=work)  # fmt: skip
    supervisor = spawn("dropin-supervisor", [*manage, "supervise"], log_dir, env, cwd=work)
    try:
        worker.wait_for_output("ready.", 60)
        code = textwrap.dedent("""
            import time
            from billing.tasks import invoice
            from supervisor_app.models import SupervisedRun
            run_id = invoice.delay("acme").run_id
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                run = SupervisedRun.objects.get(pk=run_id)
                if run.status == "succeeded":
                    break
                time.sleep(0.1)
            print("STATUS", run.status, run.progress)
        """)
        out = run([*manage, "shell", "-c", code], work, env, timeout=90)
        assert "STATUS succeeded {'customer': 'acme'}" in out
        # The new project's health probe sees its supervisor (no beat needed: no periodic tasks).
        wait_until(
            lambda: (
                subprocess.run([*manage, "supervisor_status"], cwd=work, env=env, capture_output=True).returncode == 0
            ),
            30,
            interval=0.5,
            what="supervisor_status to report healthy",
        )
    finally:
        worker.stop()
        supervisor.stop()
