"""Start, watch and kill real worker, beat and supervisor processes (the demo and the tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.output()[-3000:]}")
            return text in self.output()

        wait_until(seen, timeout, 0.1, f"{self.name} to print {text!r}")

    def signal_group(self, sig: int) -> None:
        """Signal the whole process group: a worker's main process and its pool children."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group (what a machine crash or the OOM killer's big brother does)."""
        self.signal_group(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.signal_group(signal.SIGCONT)  # a SIGSTOPped process can't handle SIGTERM
        self.signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def children(self) -> list[int]:
        """Pids of the direct children (a prefork worker's pool processes)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []


def spawn(
    name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        popen = subprocess.Popen(
            argv, cwd=cwd or ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Proc(name, popen, log)


def spawn_worker(
    name: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    concurrency: int = 1,
    pool: str = "prefork",
    queues: str | None = None,
) -> Proc:
    argv = [
        sys.executable, "-m", "celery", "-A", "project", "worker",
        "-n", f"{name}@%h", "-c", str(concurrency), "-P", pool, "-l", "info",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if queues:
        argv += ["-Q", queues]
    return spawn(name, argv, log_dir, env)


def spawn_supervisor(name: str, log_dir: Path, env: Mapping[str, str] | None = None) -> Proc:
    return spawn(name, [sys.executable, "manage.py", "supervise", "--name", name], log_dir, env)


def spawn_beat(name: str, log_dir: Path, env: Mapping[str, str] | None = None, scheduler: str | None = None) -> Proc:
    argv = [sys.executable, "-m", "celery", "-A", "project", "beat", "-l", "info",
            "--schedule", str(log_dir / f"{name}.schedule")]  # fmt: skip
    argv += ["-S", scheduler or "supervisor_app.schedulers:SupervisedScheduler"]
    return spawn(name, argv, log_dir, env)
