"""The suite's watchdog (tests/watchdog.py): a stalled test ends the run with its stacks and
its event loop's tasks, and takes its child processes with it, instead of hanging CI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STALLING = """\
import asyncio
import subprocess
from pathlib import Path


async def test_fine():
    await asyncio.sleep(0)


async def held(event):
    await event.wait()  # the awaited line the dump must show, below the test's own


async def test_stalls_awaiting_forever():
    # A child, and a grandchild of its own (as a server started through a script).
    subprocess.Popen(["sh", "-c", "sleep 300 & echo $! > grandchild.pid; exec sleep 300"])
    await held(asyncio.Event())
"""


def test_a_stalled_test_ends_the_run_with_its_tasks(tmp_path: Path) -> None:
    (tmp_path / "test_stall.py").write_text(STALLING)
    done = _pytest(tmp_path, stall_seconds=2)
    assert done.returncode == 70, done.stdout + done.stderr
    report = done.stdout + done.stderr
    assert "test_stall.py::test_stalls_awaiting_forever (call) stalled" in report
    assert "await held(asyncio.Event())" in report
    assert "await event.wait()  # the awaited line the dump must show" in report
    logged = (tmp_path / ".motorcade" / "test-stall.log").read_text()
    assert "test_stalls_awaiting_forever" in logged and "asyncio tasks" in logged
    # The grandchild got SIGTERM: gone (reaped by init) or a zombie, never still sleeping.
    pid = int((tmp_path / "grandchild.pid").read_text())
    for _ in range(50):
        if _gone(pid):
            break
        time.sleep(0.1)
    assert _gone(pid)


def test_a_run_without_stalls_is_untouched(tmp_path: Path) -> None:
    (tmp_path / "test_quick.py").write_text(
        "import asyncio\n\ndef test_quick():\n    assert True\n\n"
        "async def test_quick_async():\n    await asyncio.sleep(0.1)\n"
    )
    done = _pytest(tmp_path, stall_seconds=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / ".motorcade").exists()


def _pytest(folder: Path, *, stall_seconds: int) -> subprocess.CompletedProcess[str]:
    """pytest in `folder` with the watchdog and the suite's asyncio settings."""
    (folder / "pyproject.toml").write_text(
        textwrap.dedent("""\
            [tool.pytest.ini_options]
            asyncio_mode = "auto"
            asyncio_default_fixture_loop_scope = "session"
            asyncio_default_test_loop_scope = "session"
            """)
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MOTORCADE_TEST_STALL_SECONDS": str(stall_seconds),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.watchdog", "-p", "no:cacheprovider"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in {"Z", "X"}
