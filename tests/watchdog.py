"""A stalled test fails the run with its stacks, instead of hanging CI until it is killed.

A thread watches each phase (setup, call, teardown) of each test. One that runs longer than
MOTORCADE_TEST_STALL_SECONDS (default 480) gets its thread stacks and its event loop's tasks
written to the terminal and to `.motorcade/test-stall.log`; then its child processes (the
Temporal servers) get SIGTERM and the run ends with exit 70. No SIGINT: the suite's uvicorn
servers take SIGINT and SIGTERM for themselves while they run (that is also why a plain
`timeout` never ended a stalled run). A run never outlives its CI budget, and says where it
stood.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import linecache
import os
import signal
import sys
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

LOG = Path(".motorcade") / "test-stall.log"
EXIT_STALLED = 70  # EX_SOFTWARE


class Watchdog:
    def __init__(self, config: pytest.Config, limit: float) -> None:
        self.config = config
        self.limit = limit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._current: tuple[str, str, float] | None = None
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def enter(self, nodeid: str, phase: str) -> None:
        self._current = (nodeid, phase, time.monotonic())

    def leave(self) -> None:
        self._current = None

    def _watch(self) -> None:
        while True:
            time.sleep(1)
            current = self._current
            if current is not None and time.monotonic() - current[2] >= self.limit:
                try:
                    self._report(current)
                finally:  # whatever the report met, the run ends
                    _stop_descendants()
                    os._exit(EXIT_STALLED)

    def _report(self, current: tuple[str, str, float]) -> None:
        nodeid, phase, started = current
        out = io.StringIO()
        print(
            f"\n==== {nodeid} ({phase}) stalled for {time.monotonic() - started:.0f} s "
            f"(MOTORCADE_TEST_STALL_SECONDS={self.limit:.0f}); ending the run ====",
            file=out,
        )
        self._dump_tasks(out)
        text = out.getvalue()
        with _uncaptured(self.config) as terminal:
            terminal.write(text)
            terminal.flush()
            faulthandler.dump_traceback(file=terminal, all_threads=True)
        LOG.parent.mkdir(exist_ok=True)
        with LOG.open("a") as log:
            log.write(text)
            log.flush()
            faulthandler.dump_traceback(file=log, all_threads=True)

    def _dump_tasks(self, out: io.StringIO) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            print("(no event loop)", file=out)
            return
        try:
            tasks = asyncio.all_tasks(loop)
        except RuntimeError as exc:  # the set changed under us too often: say so
            print(f"(tasks not listed: {exc})", file=out)
            return
        print(f"---- {len(tasks)} asyncio tasks, each down to what it awaits ----", file=out)
        for task in tasks:
            print(f"-- {task!r}", file=out)
            for line in _await_chain(task.get_coro()):
                print(line, file=out)


class _uncaptured:
    """The real terminal, with pytest's output capture suspended (the run is failing)."""

    def __init__(self, config: pytest.Config) -> None:
        self.capture: Any = config.pluginmanager.getplugin("capturemanager")

    def __enter__(self) -> TextIO:
        if self.capture is not None:
            self.capture.suspend_global_capture(in_=False)
        return sys.__stderr__ or sys.stderr

    def __exit__(self, *exc: object) -> None:
        if self.capture is not None:
            self.capture.resume_global_capture()


def pytest_configure(config: pytest.Config) -> None:
    limit = float(os.environ.get("MOTORCADE_TEST_STALL_SECONDS", "480"))
    if limit > 0:
        config.stash[WATCHDOG] = Watchdog(config, limit)


WATCHDOG = pytest.StashKey[Watchdog]()


@pytest.fixture(scope="session", autouse=True)
async def _watched_loop(request: pytest.FixtureRequest) -> None:
    """Tells the watchdog which event loop the suite runs on (for its task dump)."""
    watchdog = request.config.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.loop = asyncio.get_running_loop()


def _phase(item: pytest.Item, phase: str) -> Iterator[None]:
    watchdog = item.config.stash.get(WATCHDOG, None)
    if watchdog is not None:
        watchdog.enter(item.nodeid, phase)
    try:
        yield
    finally:
        if watchdog is not None:
            watchdog.leave()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    yield from _phase(item, "setup")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield from _phase(item, "call")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield from _phase(item, "teardown")


def _await_chain(coro: Any) -> list[str]:
    """The frames from a task's coroutine down to the innermost thing it awaits (Python 3.11's
    `Task.print_stack` shows only the outermost coroutine frame)."""
    lines = []
    for _ in range(50):
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        code, line = frame.f_code, frame.f_lineno
        lines.append(f'  File "{code.co_filename}", line {line}, in {code.co_name}')
        lines.append("    " + linecache.getline(code.co_filename, line).strip())
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    if coro is not None:  # a future, or what a generator-based awaitable holds
        lines.append(f"  awaiting {coro!r}"[:300])
    return lines


def _stop_descendants() -> None:
    """SIGTERM to this process's descendants, children first (read from /proc: nothing to do
    where there is none)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ...
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    for pid in found:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
