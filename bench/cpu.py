"""CPU seconds spent by process trees (this machine's /proc): what a phase of a benchmark cost
each part of the system, whatever else the shared machine was doing at the time.

Throughput on a 2-core machine shared with other work moves by ±20% from run to run; the CPU a
phase consumed per item (the endpoint's processes, PostgreSQL's, the client's) moves far less,
and its sum says what throughput the same work would reach on cores of its own."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of a live process; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and its live descendants (exited ones are not counted)."""
    parents: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        found = _stat(int(entry))
        if found is not None:
            parents.setdefault(found[0], []).append(int(entry))
            cpu[int(entry)] = found[1]
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(parents.get(pid, []))
    return total


def postmaster_pid(url: str) -> int | None:
    """The PostgreSQL server's postmaster, when it runs on this machine and its data directory
    is readable here; else None (its CPU is then not reported)."""
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT current_setting('data_directory')").fetchone()
        pid = int((Path(row[0]) / "postmaster.pid").read_text().split()[0]) if row else 0
    except (OSError, ValueError, IndexError, psycopg.Error):
        return None
    return pid if _stat(pid) is not None else None


class CpuMeter:
    """Named process trees (and this process, as `client`), measured over a phase:
    `start()`, then `stop()` returns each one's CPU seconds in between."""

    def __init__(self, roots: dict[str, int | None]) -> None:
        self.roots = {name: pid for name, pid in roots.items() if pid is not None}
        self._before: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: tree_cpu_seconds(pid) for name, pid in self.roots.items()}
        now["client"] = time.process_time()
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        after = self._now()
        return {name: after[name] - self._before.get(name, 0.0) for name in after}
