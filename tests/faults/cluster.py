"""`Cluster`: the real servers of one fault test, as child processes it can kill and restart.

One migrated database of the test's own (on the suite's PostgreSQL server) and one Temporal
dev server (`temporal server start-dev` on a database file in the test's directory, so it can
be stopped and started again on the same state), then any number of API, ingest and worker
processes (`python -m core.cli api|ingest|worker`), each in its own process group with its
output in a log file of the test's directory. `close()` stops everything it started; a test
that failed prints the tail of every log (`tests/faults/conftest.py`).

Each process gets the environment `motorcade dev` gives its children (devtools/devstack.py):
the database, the dev key, the Temporal address, the trusted release-signing keys; plus the
test's own settings (short reconcile interval, start grace, ...). Workers run with
MOTORCADE_ENV=dev when `reconcile=True`, so they create the reconcile Schedule on this
cluster's private Temporal (a worker under MOTORCADE_ENV=test never does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from core.auth import mint_dev_token
from core.temporal import dev_server_search_attribute_flags
from devtools import localservers
from models.enums import Role

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Waits for a process to come up: a guard against a hang, not a measured time.
START_GUARD = 90.0


@dataclass
class Proc:
    """One child process of the cluster: its role, name, port (API, ingest), log file."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def base_url(self) -> str:
        assert self.port is not None, f"{self.name} serves no HTTP"
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not running"
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self) -> None:
        assert not self.running(), f"{self.name} runs already"
        self.starts += 1
        out = open(self.log, "ab")  # the child keeps its own copy
        out.write(f"\n===== start {self.starts} of {self.name} =====\n".encode())
        out.flush()
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=str(PROJECT_ROOT),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach all of it
            )
        finally:
            out.close()

    def signal(self, sig: signal.Signals) -> None:
        """`sig` to the whole process group (an ingest with several processes, a server)."""
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.popen is None:
            return
        self.signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (after SIGCONT, in case it was stopped), SIGKILL after `timeout` s."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Cluster:
    """The servers of one fault test. `settings`: MOTORCADE_* variables every process gets."""

    tmp: Path
    database_url: str
    dev_key: str
    trusted_keys_file: Path
    settings: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)
    temporal_port: int = field(default_factory=localservers.free_port)

    # --- Temporal ---------------------------------------------------------------------------

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    def start_temporal(self) -> Proc:
        """The Temporal dev server on this cluster's port and database file (the same ones
        on every start: a restart finds its workflows again), headless; waits for its port."""
        proc = self.procs.get("temporal")
        if proc is None:
            argv = [
                localservers.venv_binary("temporal"),
                "server",
                "start-dev",
                "--headless",
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.temporal_port),
                "--db-filename",
                str(self.tmp / "temporal.db"),
                "--log-level",
                "warn",
                *dev_server_search_attribute_flags(),
            ]
            proc = Proc("temporal", "temporal", argv, dict(os.environ), self.tmp / "temporal.log")
            self.procs["temporal"] = proc
        proc.spawn()
        self._wait(proc, lambda: localservers.port_open("127.0.0.1", self.temporal_port))
        return proc

    # --- Motorcade roles --------------------------------------------------------------------

    def environment(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "MOTORCADE_DATABASE_URL": self.database_url,
            "MOTORCADE_DEV_KEY": self.dev_key,
            "MOTORCADE_ENV": "test",
            "MOTORCADE_LOG_FORMAT": "json",
            "MOTORCADE_LOG_LEVEL": "INFO",
            "MOTORCADE_TEMPORAL_ADDRESS": self.temporal_address,
            "MOTORCADE_TRUSTED_KEYS_FILE": str(self.trusted_keys_file),
            # One test client is every vehicle's gateway and the only operator.
            "MOTORCADE_RATE_LIMIT_DEVICE_TELEMETRY_ITEMS_PER_MINUTE": "0",
            "MOTORCADE_RATE_LIMIT_GATEWAY_TELEMETRY_ITEMS_PER_MINUTE": "0",
            "MOTORCADE_RATE_LIMIT_WRITES_PER_MINUTE": "100000",
            "MOTORCADE_RATE_LIMIT_WRITE_BURST": "100000",
            **self.settings,
        }
        env.update(extra)
        return env

    def add_api(self, name: str = "api") -> Proc:
        return self._add_http(name, "api")

    def add_ingest(self, name: str = "ingest") -> Proc:
        return self._add_http(name, "ingest", extra=["--processes", "1"])

    def _add_http(self, name: str, role: str, extra: list[str] | None = None) -> Proc:
        port = localservers.free_port()
        argv = [sys.executable, "-m", "core.cli", role, "--host", "127.0.0.1"]
        argv += ["--port", str(port), *(extra or [])]
        proc = Proc(name, role, argv, self.environment(), self.tmp / f"{name}.log", port=port)
        self.procs[name] = proc
        return proc

    def add_worker(self, name: str = "worker", *, reconcile: bool = False) -> Proc:
        env = self.environment(**({"MOTORCADE_ENV": "dev"} if reconcile else {}))
        argv = [sys.executable, "-m", "core.cli", "worker"]
        proc = Proc(name, "worker", argv, env, self.tmp / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start(self, name: str) -> Proc:
        """Start (or restart) process `name`; an API or ingest is waited for until it
        answers (`/readyz` for the API, which also wants Temporal; `/healthz` for ingest);
        a worker until it logs `worker.started`."""
        proc = self.procs[name]
        proc.spawn()
        if proc.role == "api":
            self._wait(proc, lambda: _answers(proc.base_url + "/readyz"))
        elif proc.role == "ingest":
            self._wait(proc, lambda: _answers(proc.base_url + "/healthz"))
        elif proc.role == "worker":
            mark = f"===== start {proc.starts} of {proc.name} ====="
            self._wait(proc, lambda: "worker.started" in proc.log.read_text().split(mark)[-1])
        return proc

    def _wait(self, proc: Proc, ready: Any) -> None:
        deadline = time.monotonic() + START_GUARD
        while not ready():
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited during start-up:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} not ready in {START_GUARD:.0f} s:\n{proc.tail()}")
            time.sleep(0.1)

    def __getitem__(self, name: str) -> Proc:
        return self.procs[name]

    # --- Clients ----------------------------------------------------------------------------

    def token(self, role: Role, subject: str | None = None) -> dict[str, str]:
        token = mint_dev_token(self.dev_key, role=role, subject=subject)
        return {"Authorization": f"Bearer {token}"}

    def client(self, name: str, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.procs[name].base_url, timeout=timeout)

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(query, params).fetchall()]

    def one(self, query: str, params: Any = None) -> Any:
        rows = self.sql(query, params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    # --- Teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process, Motorcade's first, Temporal last."""
        for proc in sorted(self.procs.values(), key=lambda p: p.role == "temporal"):
            proc.stop()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {p.name} ({p.log.name}) -----\n{p.tail(lines)}" for p in self.procs.values()
        )


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(predicate: Any, *, within: float, every: float = 0.25, what: str = "") -> Any:
    """Poll `predicate()` until it returns something truthy (returned); AssertionError after
    `within` seconds (a guard against a hang, never a timing being asserted)."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.0f} s: {what or predicate}")
        time.sleep(every)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """`with timed() as t:` ... `t[0]`: the seconds the block took (for the reports)."""
    box: list[float] = []
    began = time.monotonic()
    try:
        yield box
    finally:
        box.append(time.monotonic() - began)
