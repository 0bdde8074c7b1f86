"""PostgreSQL drops the API's connections (a restart, a failover): the requests that meet a
dead connection answer 503 UNAVAILABLE with Retry-After, never a 500, and the next ones are
served on fresh connections. On the driver path (one vehicle, the list, the fleet summary) and
the ORM path (rollouts) alike."""

from __future__ import annotations

import httpx
import psycopg

from core.settings import Settings
from tests.api.conftest import serve_app
from tests.factories import insert_vehicles


async def test_lost_connections_answer_503_then_recover(
    api_settings: Settings, viewer: dict, database_url: str, prefix: str
) -> None:
    name = f"motorcade-loss-{prefix}"[:60]
    url = api_settings.database_url
    settings = api_settings.model_copy(
        update={
            "database_url": f"{url}{'&' if '?' in url else '?'}application_name={name}",
            "database_pool_size": 2,
        }
    )
    insert_vehicles(database_url, [f"{prefix}1"])
    paths = [
        f"/api/v1/vehicles/{prefix}1",
        f"/api/v1/vehicles?q={prefix}",
        "/api/v1/fleet/summary",
        "/api/v1/rollouts?limit=5",
    ]
    async with serve_app(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
        for path in paths:  # the pool holds live connections
            assert (await http.get(path, headers=viewer)).status_code == 200

        with psycopg.connect(database_url, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                " FROM pg_stat_activity WHERE application_name = %s",
                [name],
            ).fetchone()
        assert ended is not None and ended[0] >= 1

        unavailable = 0
        for path in paths:
            for _ in range(4):  # at most the pool's connections are dead
                response = await http.get(path, headers=viewer)
                assert response.status_code in (200, 503), response.text
                if response.status_code == 200:
                    break
                unavailable += 1
                assert response.json()["error"]["code"] == "UNAVAILABLE"
                assert response.headers["Retry-After"] == "1"
            assert response.status_code == 200, f"{path} did not recover"
        assert unavailable >= 1  # a dead connection was met, and answered 503
