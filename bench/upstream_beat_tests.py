"""django-celery-beat's own test suite, run twice: as released, then with ``SupervisedScheduler`` in place
of ``DatabaseScheduler``. Plain periodic tasks must behave exactly as upstream: every upstream test that
passes on its own scheduler must pass on ours.

    .venv/bin/python bench/upstream_beat_tests.py [--sdist DIR] [--work DIR]

Not part of ``make test`` (two runs of about two minutes each, and the network, the first time). It
fetches the source distribution of the installed django-celery-beat version (the wheel has no tests)
with ``pip download --no-binary :all:`` into the work directory (default: a temporary one), unless
``--sdist`` names an extracted one, and installs what that suite needs beside ours there (pytest < 9:
the suite puts marks on fixtures, which pytest 9 refuses; ephem; pytest-timeout), never into the
virtualenv. Upstream's code is only read from there, never copied into this repository.

The substitution: a pytest plugin sets ``django_celery_beat.schedulers.DatabaseScheduler`` to our
class before the suite is collected, so the suite's own subclass (``TrackingScheduler``) and every
test build ours; ``supervisor_app`` joins the suite's ``INSTALLED_APPS`` (its tables exist, migrated
with upstream's). Upstream's test app has no supervised task, so every schedule there is plain.

Prints the upstream pass count, how many of those pass with ours, and the tests that differ; exits 1
when an upstream pass fails with ours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What the suite needs that our virtualenv lacks or has in another major version.
SUITE_NEEDS = ["pytest>=8,<9", "pytest-django>=4.5.2,<5", "ephem", "pytest-timeout"]

SETTINGS = """\
from t.proj.settings import *  # noqa: F403  (upstream's test settings, plus our app)

INSTALLED_APPS = [*INSTALLED_APPS, "supervisor_app"]  # noqa: F405
"""

PLUGIN = '''\
"""Our scheduler in place of django-celery-beat's, before the suite's modules are imported."""


def pytest_sessionstart(session):
    from django_celery_beat import schedulers

    from supervisor_app.schedulers import SupervisedScheduler

    schedulers.DatabaseScheduler = SupervisedScheduler


def pytest_collection_finish(session):
    import sys

    from supervisor_app.schedulers import SupervisedScheduler

    suite = sys.modules.get("t.unit.test_schedulers")
    if suite is not None and not issubclass(suite.TrackingScheduler, SupervisedScheduler):
        raise RuntimeError("the suite's scheduler is not ours: substituted too late")
'''


def fetch_sdist(work: Path) -> Path:
    version = metadata.version("django-celery-beat")
    download = work / "download"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"),
            *(f"django-celery-beat=={version}", "-d", str(download)),
        ],
        check=True,
    )
    [archive] = download.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return next(
        p for p in work.iterdir() if p.is_dir() and p.name.startswith(("django_celery_beat-", "django-celery-beat-"))
    )


def install_suite_needs(work: Path) -> Path:
    target = work / "suite-deps"
    if not (target / "pytest_django").exists():
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
                *("--target", str(target), *SUITE_NEEDS),
            ],
            check=True,
        )
    return target


def run_suite(sdist: Path, deps: Path, shim: Path, substitute: bool, report: Path) -> dict[str, str]:
    """Run the suite; the outcome of each test by id (passed, failed, error, skipped)."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
    args += ["--ds", "sa_upstream_settings"]
    if substitute:
        args += ["-p", "sa_substitute"]
    env = {"PYTHONPATH": ":".join(str(p) for p in (deps, sdist, shim, ROOT))}
    report.unlink(missing_ok=True)
    subprocess.run(args, cwd=sdist, env={**os.environ, **env}, check=False)
    if not report.exists():  # pytest stopped before running anything (the plugin's check, an import)
        raise SystemExit(f"the suite did not run ({'ours' if substitute else 'upstream'}): see its output above")
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[name] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="an extracted django-celery-beat source distribution")
    parser.add_argument("--work", type=Path, help="where to download and install (default: a temporary dir)")
    options = parser.parse_args()
    work = options.work or Path(tempfile.mkdtemp(prefix="upstream-beat-"))
    work.mkdir(parents=True, exist_ok=True)
    sdist = options.sdist or fetch_sdist(work)
    deps = install_suite_needs(work)
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sa_upstream_settings.py").write_text(SETTINGS)
    (shim / "sa_substitute.py").write_text(PLUGIN)
    upstream = run_suite(sdist, deps, shim, substitute=False, report=work / "upstream.xml")
    ours = run_suite(sdist, deps, shim, substitute=True, report=work / "ours.xml")
    passed = {t for t, o in upstream.items() if o == "passed"}
    kept = {t for t in passed if ours.get(t) == "passed"}
    print(f"django-celery-beat {metadata.version('django-celery-beat')}: {len(upstream)} tests")
    print(f"upstream scheduler: {len(passed)} passed")
    print(f"SupervisedScheduler: {len(kept)}/{len(passed)} of the upstream passes pass")
    for test in sorted(passed - kept):
        print(f"  lost: {test} ({ours.get(test, 'not run')})")
    for test in sorted(t for t, o in ours.items() if o == "passed" and t not in passed):
        print(f"  gained: {test} (upstream: {upstream.get(test, 'not run')})")
    return 0 if kept == passed else 1


if __name__ == "__main__":
    sys.exit(main())
