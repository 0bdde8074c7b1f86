"""Live updates under load: N concurrent Server-Sent Events subscribers on one API process.

    .venv/bin/python bench/sse.py [--subscribers 2000] [--rows 200] [--rate 20]
                                   [--cycles 10000] [--cycle-concurrency 50]

A fresh, migrated database (the server at MOTORCADE_DATABASE_URL, else the embedded one),
one `motorcade api` process on a loopback port. Subscribers are raw HTTP/1.1 connections
(asyncio streams, a viewer token) reading `GET /api/v1/stream?topics=vehicles`; a writer
inserts `vehicle.updated` rows into `change_feed` at `--rate` rows a second (autocommit: each
insert is its own transaction) and notes when each commit returned. Delivery latency is the
time from that commit to the event's `id:` line reaching a subscriber (the same clock).

Prints, in one run:
- baseline: p50/p99 with 1 subscriber;
- load: p50/p99 over all deliveries with `--subscribers` subscribers, and the ratio of p99 to
  the baseline's p99;
- memory: the API process's RSS before and with the subscribers (per subscriber), and RSS
  before/after `--cycles` connect/disconnect cycles (each waits for the stream to be
  registered, then closes).

Goals (issue 6): 2,000 subscribers on one process, p99 under 500 ms from commit to delivery,
memory flat over 10,000 connect/disconnect cycles. Nothing is asserted: machines are noisy,
and the subscribers' own parsing runs in this one Python process (on uvloop when installed;
it inflates the latency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from core.auth import generate_dev_key, mint_dev_token
from devtools import localservers
from models.enums import Role

HOST = "127.0.0.1"
EVENT_ID = re.compile(rb"^id: ?(\d+)\r?$", re.MULTILINE)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Subscriber:
    def __init__(self, port: int, token: str, committed: dict[int, float]) -> None:
        self.port, self.token, self.committed = port, token, committed
        self.arrivals: list[tuple[int, float]] = []  # (event id, when its line arrived)
        self.ready = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection(HOST, self.port, limit=2**20)
        self.writer = writer
        writer.write(
            f"GET /api/v1/stream?topics=vehicles HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Authorization: Bearer {self.token}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(head.decode(errors="replace"))
        rest = b""
        while chunk := await reader.read(1 << 16):  # cheap on the client: whole reads, a regex
            now = time.monotonic()
            complete, _, rest = (rest + chunk).rpartition(b"\n")
            if not self.ready.is_set() and b": subscribed" in complete:
                self.ready.set()
            self.arrivals.extend((int(i), now) for i in EVENT_ID.findall(complete))

    def latencies(self) -> list[float]:
        """Commit to arrival. An event may arrive before the writer's task has resumed from
        its commit (one event loop): that is a latency of about zero, counted as zero."""
        return [max(0.0, at - self.committed[i]) for i, at in self.arrivals if i in self.committed]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def measure(
    port: int, token: str, database_url: str, subscribers: int, rows: int, rate: float
) -> list[float]:
    committed: dict[int, float] = {}
    subs = [Subscriber(port, token, committed) for _ in range(subscribers)]
    tasks = []
    for i, sub in enumerate(subs):
        tasks.append(asyncio.create_task(sub.run()))
        if i % 100 == 99:
            await asyncio.sleep(0.05)  # do not flood the accept queue
    async with asyncio.timeout(120):
        await asyncio.gather(*(s.ready.wait() for s in subs))
    payload = json.dumps({"vehicles": [{"id": "bench", "status": "updating", "region": "x"}]})
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    async with conn:
        for _ in range(rows):
            cur = await conn.execute(
                "INSERT INTO change_feed (topic, event, payload)"
                " VALUES ('vehicles', 'vehicle.updated', %s) RETURNING id",
                (payload,),
            )
            row = await cur.fetchone()
            assert row is not None
            committed[int(row[0])] = time.monotonic()
            await asyncio.sleep(1 / rate)
    await asyncio.sleep(2)  # the last deliveries
    for sub in subs:
        sub.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    expected = rows * subscribers
    latencies = [lat for s in subs for lat in s.latencies()]
    got = len(latencies)
    if got < expected:
        print(f"  warning: {expected - got} of {expected} deliveries missing")
    return latencies


async def cycles(port: int, token: str, count: int, concurrency: int) -> None:
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < count:
            done += 1
            sub = Subscriber(port, token, {})
            task = asyncio.create_task(sub.run())
            async with asyncio.timeout(30):
                await sub.ready.wait()
            sub.close()
            await asyncio.gather(task, return_exceptions=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


async def main(args: argparse.Namespace) -> None:
    server = localservers.bench_server_url()
    print(f"database: {localservers.describe_server(server)}")
    with localservers.bench_database(server) as (_, url):
        dev_key = generate_dev_key()
        token = mint_dev_token(dev_key, role=Role.VIEWER)
        port = localservers.free_port()
        proc = localservers.start_role_process("api", url, dev_key, port, quiet=True)
        try:
            await localservers.wait_http_ready(f"http://{HOST}:{port}", path="/healthz")
            await asyncio.sleep(1)  # the hub connects in the background
            base = await measure(port, token, url, 1, args.rows, args.rate)
            print(f"baseline, 1 subscriber: p50 {pct(base, 50):.1f} ms, p99 {pct(base, 99):.1f} ms")
            before = rss_kib(proc.pid)
            committed: dict[int, float] = {}
            holders = [Subscriber(port, token, committed) for _ in range(args.subscribers)]
            held = [asyncio.create_task(s.run()) for s in holders]
            async with asyncio.timeout(120):
                await asyncio.gather(*(s.ready.wait() for s in holders))
            with_subs = rss_kib(proc.pid)
            for s in holders:
                s.close()
            await asyncio.gather(*held, return_exceptions=True)
            print(
                f"memory: RSS {before / 1024:.1f} MiB idle, {with_subs / 1024:.1f} MiB with "
                f"{args.subscribers} subscribers: "
                f"{(with_subs - before) / max(args.subscribers, 1):.1f} KiB per subscriber"
            )
            load = await measure(port, token, url, args.subscribers, args.rows, args.rate)
            ratio = pct(load, 99) / pct(base, 99)
            print(
                f"load, {args.subscribers} subscribers, {args.rate:g} rows/s: "
                f"p50 {pct(load, 50):.1f} ms, p99 {pct(load, 99):.1f} ms "
                f"({ratio:.1f}x the baseline p99; {len(load)} deliveries)"
            )
            start = rss_kib(proc.pid)
            t0 = time.monotonic()
            await cycles(port, token, args.cycles, args.cycle_concurrency)
            await asyncio.sleep(1)
            end = rss_kib(proc.pid)
            print(
                f"{args.cycles} connect/disconnect cycles in {time.monotonic() - t0:.1f} s: "
                f"RSS {start / 1024:.1f} MiB before, {end / 1024:.1f} MiB after"
            )
        finally:
            localservers.stop_process(proc)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=200, help="rows written per measurement")
    parser.add_argument("--rate", type=float, default=20, help="rows written per second")
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--cycle-concurrency", type=int, default=50)
    # The subscribers' client shares the machine's cores with the API: on uvloop (installed
    # with the API's dependencies) it takes less of them, and the latency measured is more the
    # API's own.
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(parser.parse_args()))
    else:
        uvloop.run(main(parser.parse_args()))
