"""Container health checks, with nothing but the image's Python (the slim image has no curl):

    python -m core.healthcheck            # the role PID 1 runs (the Dockerfile's HEALTHCHECK)
    python -m core.healthcheck api        # GET /readyz on MOTORCADE_API_PORT
    python -m core.healthcheck ingest     # GET /readyz on MOTORCADE_API_PORT + 1
    python -m core.healthcheck worker     # a poller of this host on motorcade-rollouts

Exit 0 when healthy, 1 otherwise, with one line saying why. `api` and `ingest` are healthy
when their `/readyz` answers 200 (the API: PostgreSQL and Temporal reachable; ingest:
PostgreSQL). A worker serves no HTTP: it is healthy when Temporal lists a poller from this
host (the SDK's identity is `pid@hostname`) on its task queue, polled within `WORKER_STALE`.
Any other role (`migrate`, `seed`, ...) is a one-shot command and passes.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

WORKER_STALE = timedelta(minutes=2)
SERVING_ROLES = ("api", "ingest", "worker")


def role_of_pid1(cmdline: Path = Path("/proc/1/cmdline")) -> str | None:
    """The `motorcade` subcommand PID 1 runs (`motorcade api` → "api"), or None."""
    try:
        args = [a.decode() for a in cmdline.read_bytes().split(b"\0") if a]
    except OSError:
        return None
    for index, arg in enumerate(args):
        if Path(arg).name == "motorcade" or arg == "core.cli":
            rest = [a for a in args[index + 1 :] if not a.startswith("-")]
            return rest[0] if rest else None
    return None


def check_http(url: str, *, timeout: float = 5.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


async def check_worker(
    address: str,
    namespace: str,
    *,
    task_queue: str | None = None,
    hostname: str | None = None,
    now: datetime | None = None,
) -> tuple[bool, str]:
    """Does Temporal list a recent poller from `hostname` on the workflow task queue?"""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
    from temporalio.client import Client

    from core.temporal import ROLLOUT_TASK_QUEUE

    queue = task_queue or ROLLOUT_TASK_QUEUE
    host = hostname or socket.gethostname()
    try:
        async with asyncio.timeout(5):
            client = await Client.connect(address, namespace=namespace)
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=namespace,
                task_queue=TaskQueue(name=queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            ),
            timeout=timedelta(seconds=5),
        )
    except Exception as exc:
        return False, f"temporal {address}: {type(exc).__name__}: {exc}"
    now = now or datetime.now(UTC)
    for poller in response.pollers:
        if poller.identity.endswith("@" + host):
            seen = poller.last_access_time.ToDatetime(tzinfo=UTC)
            if now - seen <= WORKER_STALE:
                return True, f"poller {poller.identity} on {queue}, last poll {seen.isoformat()}"
            return False, f"poller {poller.identity} on {queue} is stale ({seen.isoformat()})"
    return False, f"no poller from {host} on task queue {queue}"


def check(role: str | None) -> tuple[bool, str]:
    from core.settings import Settings

    if role not in SERVING_ROLES:
        return True, f"{role or 'no role'}: nothing to check"
    settings = Settings()
    if role == "worker":
        return asyncio.run(check_worker(settings.temporal_address, settings.temporal_namespace))
    port = settings.api_port + (1 if role == "ingest" else 0)
    return check_http(f"http://127.0.0.1:{port}/readyz")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    role = args[0] if args else role_of_pid1()
    try:
        healthy, detail = check(role)
    except Exception as exc:  # a configuration error is unhealthy, not a traceback
        healthy, detail = False, f"{type(exc).__name__}: {exc}"
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
