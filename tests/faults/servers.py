"""Private PostgreSQL, RabbitMQ and Redis servers that the fault suite may restart, crash and starve.

The machine's own servers (5432, 5672, 6379) are shared with every other test run and the demo, so
no test restarts them. Scenarios that need a server to go down run against servers of their own,
started from the same installed binaries on other loopback ports, in data directories under
``/tmp/supervisor-faults``. Each is a real server process: a restart really drops every connection,
a PostgreSQL ``immediate`` stop really is a crash (WAL not yet flushed is lost), a RabbitMQ node
really is shut down and booted again from its disk, and Redis, started without persistence like the
machine's, really loses every queued message.

Run a command with the three up and its environment pointing at them::

    python -m tests.faults.servers -- python -m pytest -m restarts      # make test-restarts
    python -m tests.faults.servers --broker redis -- python -m pytest tests/faults/chaos.py

The command sees ``DATABASE_URL`` / ``CELERY_BROKER_URL`` for the private servers (RabbitMQ by
default, Redis with ``--broker redis``), ``FAULTS_REDIS_URL``, and ``FAULTS_SERVERS`` (what tests need
to rebuild the controls with :func:`from_env`). The servers are stopped afterwards, whatever the
command's outcome, and their logs copied to ``test-artifacts/servers/``.

As root (CI), each server runs as its package's system user (``postgres``, ``rabbitmq``), as the
servers refuse to run as root; as another user, as that user.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BASE = Path(os.environ.get("FAULTS_SERVERS_DIR", "/tmp/supervisor-faults"))
ARTIFACTS = Path(__file__).resolve().parent.parent.parent / "test-artifacts" / "servers"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, up: bool, timeout: float, what: str) -> float:
    """Poll until the port is (or is no longer) accepting connections; returns the seconds waited."""
    start = time.monotonic()
    while port_open(port) != up:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: port {port} still {'closed' if up else 'open'} after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def _as(user: str) -> list[str]:
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _own(path: Path, user: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(path, user, user)


def _run(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd="/tmp")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


@dataclass
class PrivatePostgres:
    port: int = 54329
    user: str = "postgres"

    @property
    def dir(self) -> Path:
        return BASE / f"postgres-{self.port}"

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def url(self, database: str = "supervisor_faults") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
        return str(Path(bindir.strip()) / name)

    def start(self) -> None:
        _own(self.dir, self.user)
        if not (self.data / "PG_VERSION").exists():
            # fsync off: a test server on a test machine; an immediate stop still loses the WAL that
            # was only in shared memory, which is what the crash scenarios are about.
            _run([*_as(self.user), self._bin("initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync"])  # fmt: skip
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        _run([*_as(self.user), self._bin("pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
              "-o", options, "-w", "-t", "60", "start"])  # fmt: skip
        wait_port(self.port, True, 30, "PostgreSQL")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown (clients disconnected); ``immediate``: a crash, recovered at start."""
        if not (self.data / "postmaster.pid").exists():
            return
        _run([*_as(self.user), self._bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])
        wait_port(self.port, False, 30, "PostgreSQL")

    def restart(self, mode: str = "fast") -> float:
        began = time.monotonic()
        self.stop(mode)
        self.start()
        return time.monotonic() - began


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass
class PrivateRabbit:
    port: int = 5673
    user: str = "rabbitmq"

    @property
    def dir(self) -> Path:
        return BASE / f"rabbitmq-{self.port}"

    @property
    def node(self) -> str:
        return f"faults{self.port}@localhost"

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        home = Path(os.path.expanduser(f"~{self.user}")) if os.geteuid() == 0 else Path.home()
        return {
            **os.environ,
            "HOME": str(home),  # where the Erlang cookie that rabbitmqctl must share lives
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 20000),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            # No plugins: the management plugin would want the machine node's port 15672.
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        }

    def ctl(self, *args: str, timeout: float = 120) -> str:
        # runuser drops the environment's RABBITMQ_* unless passed through env(1).
        env = self._env()
        wanted = [f"{k}={v}" for k, v in env.items() if k.startswith("RABBITMQ_") or k == "HOME"]
        return _run([*_as(self.user), "env", *wanted, "/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, *args],
                    timeout=timeout)  # fmt: skip

    def start(self) -> None:
        _own(self.dir, self.user)
        # A killed node leaves its pid file: `wait` must not follow the dead pid.
        (self.dir / "pid").unlink(missing_ok=True)
        env = self._env()
        wanted = [f"{k}={v}" for k, v in env.items() if k.startswith("RABBITMQ_") or k == "HOME"]
        _run([*_as(self.user), "env", *wanted, "/usr/lib/rabbitmq/bin/rabbitmq-server", "-detached"])
        # The node writes its pid file a moment after it starts, and `wait` fails on one it reads
        # half-written ("garbage_in_pid_file"): first the file with a live pid, then `wait`.
        deadline = time.monotonic() + 90
        while not _alive(self.pid()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ on port {self.port} wrote no pid file within 90 s")
            time.sleep(0.05)
        # `wait` follows the pid file until the node has booted (await_startup needs it registered).
        self.ctl("wait", "--timeout", "90", str(self.dir / "pid"), timeout=120)
        wait_port(self.port, True, 60, "RabbitMQ")

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if port_open(self.port):
            self.ctl("shutdown")
        wait_port(self.port, False, 60, "RabbitMQ")

    def crash(self) -> None:
        """SIGKILL the node: what is not yet on disk (unconfirmed publishes) may be gone."""
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_port(self.port, False, 30, "RabbitMQ")

    def restart(self, crash: bool = False) -> float:
        began = time.monotonic()
        self.crash() if crash else self.stop()
        self.start()
        return time.monotonic() - began


@dataclass
class PrivateRedis:
    port: int = 6380

    @property
    def dir(self) -> Path:
        return BASE / f"redis-{self.port}"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # No persistence, as the machine's Redis (and many a cache-grade deployment) runs.
        _run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "yes",
              "--save", "", "--appendonly", "no", "--dir", str(self.dir),
              "--pidfile", str(self.dir / "redis.pid"), "--logfile", str(self.dir / "redis.log")])  # fmt: skip
        wait_port(self.port, True, 30, "Redis")

    def stop(self) -> None:
        if port_open(self.port):
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, timeout=30)
        wait_port(self.port, False, 30, "Redis")

    def restart(self) -> float:
        began = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - began


@dataclass
class Servers:
    postgres: PrivatePostgres
    rabbit: PrivateRabbit
    redis: PrivateRedis

    def describe(self) -> str:
        return json.dumps({"postgres": self.postgres.port, "rabbit": self.rabbit.port, "redis": self.redis.port})

    def start(self) -> None:
        self.stop()  # anything left by an interrupted earlier run
        self.postgres.start()
        self.rabbit.start()
        self.redis.start()

    def stop(self) -> None:
        for stop in (self.postgres.stop, self.rabbit.stop, self.redis.stop):
            try:
                stop()
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                print(f"faults.servers: {exc}", file=sys.stderr)

    def keep_logs(self) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, path in (
            ("postgres.log", self.postgres.dir / "server.log"),
            ("rabbitmq.log", self.rabbit.dir / "log" / f"{self.rabbit.node}.log"),
            ("redis.log", self.redis.dir / "redis.log"),
        ):
            if path.exists():
                shutil.copyfile(path, ARTIFACTS / name)


def from_env() -> Servers | None:
    """The controls of the servers started by ``python -m tests.faults.servers`` (None when not)."""
    raw = os.environ.get("FAULTS_SERVERS")
    if not raw:
        return None
    ports = json.loads(raw)
    return Servers(PrivatePostgres(ports["postgres"]), PrivateRabbit(ports["rabbit"]), PrivateRedis(ports["redis"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["rabbitmq", "redis"], default="rabbitmq")
    parser.add_argument("--database", default="supervisor_faults")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("FAULTS_PG_PORT", "54329")))
    parser.add_argument("--rabbit-port", type=int, default=int(os.environ.get("FAULTS_RABBIT_PORT", "5673")))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("FAULTS_REDIS_PORT", "6380")))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    servers = Servers(PrivatePostgres(args.pg_port), PrivateRabbit(args.rabbit_port), PrivateRedis(args.redis_port))
    began = time.monotonic()
    try:
        servers.start()
        print(f"faults.servers: private PostgreSQL, RabbitMQ and Redis up in {time.monotonic() - began:.1f}s "
              f"(ports {servers.postgres.port}, {servers.rabbit.port}, {servers.redis.port})", flush=True)  # fmt: skip
        env = {
            **os.environ,
            "DATABASE_URL": servers.postgres.url(args.database),
            "CELERY_BROKER_URL": servers.rabbit.url() if args.broker == "rabbitmq" else servers.redis.url(),
            "FAULTS_REDIS_URL": servers.redis.url(1),
            "FAULTS_SERVERS": servers.describe(),
        }
        return subprocess.run(command, env=env).returncode
    finally:
        servers.keep_logs()
        servers.stop()


if __name__ == "__main__":
    sys.exit(main())
