"""`motorcade dev` (what `make dev` runs), end to end, as a new user would use it.

It starts its own Temporal dev server (on free ports, so it does not collide with a running
`make dev`), migrates and seeds a fresh database, runs the worker and the API, and prints
tokens. Then: /readyz is 200, the Temporal UI answers, the viewer token lists the seeded
vehicles, the operator token creates a rollout whose workflow the `temporal` CLI lists, and
Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devtools import devstack, localservers

pytestmark = pytest.mark.slow


@dataclass
class DevStack:
    """`motorcade dev` running; a thread collects its output line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)  # it says Ctrl-C stops it


@dataclass(frozen=True)
class DevPorts:
    """Free ports for a second stack beside a running `make dev`."""

    api: int = field(default_factory=localservers.free_port)
    temporal: int = field(default_factory=localservers.free_port)
    ui: int = field(default_factory=localservers.free_port)

    def environment(self, database_url: str, **extra: str) -> dict[str, str]:
        """This process's environment without any MOTORCADE_ variable, plus the stack's
        database, these ports and `extra`."""
        return {k: v for k, v in os.environ.items() if not k.startswith("MOTORCADE_")} | {
            "MOTORCADE_DATABASE_URL": database_url,
            "MOTORCADE_API_PORT": str(self.api),
            "MOTORCADE_DEV_TEMPORAL_PORT": str(self.temporal),
            "MOTORCADE_DEV_TEMPORAL_UI_PORT": str(self.ui),
            **extra,
        }


def start_motorcade_dev(env: dict[str, str], state_dir: Path, *, vehicles: int = 300) -> DevStack:
    """`motorcade dev` with `vehicles` seeded vehicles, as a new user starts it."""
    proc = subprocess.Popen(
        [
            localservers.venv_binary("motorcade"),
            "dev",
            "--vehicles",
            str(vehicles),
            "--state-dir",
            str(state_dir),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack = DevStack(proc)

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stack.lines.append(line)
            if "Ctrl-C stops everything" in line:
                stack.ready.set()

    threading.Thread(target=drain, daemon=True).start()
    return stack


def dev_tokens(stack: DevStack) -> tuple[str, str]:
    """The viewer and operator tokens `motorcade dev` printed."""
    output = "".join(stack.lines)
    viewer = re.search(r"VIEWER_TOKEN=(\S+)", output)
    operator = re.search(r"OPERATOR_TOKEN=(\S+)", output)
    assert viewer and operator, output[-2000:]
    return viewer.group(1), operator.group(1)


def stop_motorcade_dev(stack: DevStack, *signals: signal.Signals) -> int:
    """Send `signals` (SIGINT by default) one after the other, as Ctrl-C or a supervisor
    would; its exit code (killed after 60 s, and then TimeoutExpired)."""
    for sig in signals or (signal.SIGINT,):
        stack.proc.send_signal(sig)
    try:
        return stack.proc.wait(60)
    except subprocess.TimeoutExpired:
        stack.proc.kill()
        raise


def listed_workflows(temporal_port: int, workflow_id: str) -> list[dict]:
    """What `temporal workflow list` shows of the workflow, once it shows it (30 s at most)."""
    listed: list[dict] = []
    for _ in range(30):
        result = subprocess.run(
            [
                localservers.venv_binary("temporal"),
                "workflow",
                "list",
                "--address",
                f"127.0.0.1:{temporal_port}",
                "--query",
                f"WorkflowId = '{workflow_id}'",
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        listed = json.loads(result.stdout or "[]")
        if listed:
            break
        time.sleep(1)
    return listed


def test_motorcade_dev_runs_the_whole_system(dev_database: str, tmp_path: Path) -> None:
    ports = DevPorts()
    api_port, temporal_port, ui_port = ports.api, ports.temporal, ports.ui
    stack = start_motorcade_dev(ports.environment(dev_database), tmp_path)
    proc, lines = stack.proc, stack.lines
    try:
        assert stack.ready.wait(180), "motorcade dev did not come up:\n" + "".join(lines[-40:])
        output = "".join(lines)
        viewer, operator = dev_tokens(stack)
        assert f"http://127.0.0.1:{ui_port}" in output

        base = f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert f"{base}/docs" in output  # the printed description answers without a token
        assert httpx.get(f"{base}/docs").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ui_port}/").status_code == 200

        auth = {"Authorization": f"Bearer {viewer}"}
        # /metrics takes the printed metrics secret, not the viewer token.
        metrics_token = re.search(r"METRICS_TOKEN=(\S+)", output)
        assert metrics_token, output[-2000:]
        metrics_auth = {"Authorization": f"Bearer {metrics_token.group(1)}"}
        assert httpx.get(f"{base}/metrics", headers=metrics_auth).status_code == 200
        assert httpx.get(f"{base}/metrics", headers=auth).status_code == 401
        vehicles = httpx.get(f"{base}/api/v1/vehicles?limit=500", headers=auth).json()
        assert len(vehicles["data"]) == 300
        assert {v["status"] for v in vehicles["data"]} == {"in_sync"}
        assert len({v["model"] for v in vehicles["data"]}) > 1
        releases = httpx.get(f"{base}/api/v1/releases", headers=auth).json()["data"]
        newest = releases[0]["version"]
        assert newest != vehicles["data"][0]["actual"]["releaseVersion"]

        created = httpx.post(
            f"{base}/api/v1/rollouts",
            headers={"Authorization": f"Bearer {operator}"},
            json={
                "releaseVersion": newest,
                "targets": {"rings": ["canary"]},
                "strategy": {
                    "canary": {"size": 1, "bakeSeconds": 3600},
                    "waves": [{"percent": 100, "bakeSeconds": 0}],
                },
            },
        )
        assert created.status_code == 201, created.text
        workflow_id = created.json()["data"]["workflowId"]

        listed = listed_workflows(temporal_port, workflow_id)
        assert listed and listed[0]["execution"]["workflowId"] == workflow_id
        assert listed[0]["taskQueue"] == "motorcade-rollouts"
    finally:
        # Two signals back to back (a supervisor signalling the group and the process): the
        # stop still finishes, exit 0, every port freed.
        stop_motorcade_dev(stack, signal.SIGINT, signal.SIGTERM)
    assert proc.returncode == 0, "".join(lines[-30:])
    for port in (api_port, temporal_port, ui_port):
        assert not localservers.port_open("127.0.0.1", port), f"port {port} still open"


def test_the_simulator_options_are_split_as_a_shell_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "MOTORCADE_DEV_SIMULATE_ARGS", "--release-failure-rate '2026.11.0=0.5' --seed 3"
    )
    assert devstack.simulate_options() == ["--release-failure-rate", "2026.11.0=0.5", "--seed", "3"]
    monkeypatch.delenv("MOTORCADE_DEV_SIMULATE_ARGS")
    assert devstack.simulate_options() == []
    monkeypatch.setenv("MOTORCADE_DEV_SIMULATE_ARGS", "--prefix 'VIN-")
    with pytest.raises(SystemExit, match="MOTORCADE_DEV_SIMULATE_ARGS: No closing quotation"):
        devstack.simulate_options()
