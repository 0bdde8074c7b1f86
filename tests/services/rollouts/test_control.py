"""An operator's control, audited on both paths (services/rollouts/control.py): the API's
entry and the marker that proves it to the workflow."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core.db import session_scope
from models.enums import AuditSource
from models.scope import Scope
from models.workflows import ApiRequestMarker, ControlAction
from services import audit
from services.audit import Actor
from services.rollouts import control
from tests.factories import Sessions, fetch_one

API = Actor("alice", "operator", AuditSource.API, correlation_id="req-ctl")


async def requested(sessions: Sessions, rollout_id: int, action: str = "pause") -> ApiRequestMarker:
    """The API's request, audited and committed; the marker its Update would carry."""
    async with session_scope(sessions) as session:
        answer = await control.request_control(
            session, scope=Scope(), rollout_id=rollout_id, action=action, reason="why", actor=API
        )
    assert answer.refusal is None and answer.marker is not None
    return answer.marker


async def verified(
    sessions: Sessions,
    rollout_id: int,
    marker: ApiRequestMarker,
    *,
    action: ControlAction = "pause",
    accepted_at: datetime | None = None,
) -> bool:
    async with session_scope(sessions) as session:
        return await control.api_request_verified(
            session,
            rollout_id=rollout_id,
            action=action,
            marker=marker,
            accepted_at=accepted_at,
        )


async def test_the_api_entry_keeps_only_a_digest_of_the_nonce(
    sessions: Sessions, rollout_id: int
) -> None:
    marker = await requested(sessions, rollout_id)
    entry = await fetch_one(
        sessions,
        "SELECT action, source, result, payload, payload::text AS raw FROM audit_log"
        " WHERE id = :id",
        id=marker.audit_id,
    )
    assert (entry["action"], entry["source"], entry["result"]) == (
        "rollout.pause_requested",
        "api",
        "ok",
    )
    assert entry["payload"]["markerSha256"] == hashlib.sha256(marker.nonce.encode()).hexdigest()
    assert marker.nonce not in entry["raw"]


async def test_a_finished_rollout_is_refused_without_a_marker(
    sessions: Sessions, rollout_id: int
) -> None:
    async with session_scope(sessions) as session:
        await (await session.connection()).execute(
            text("UPDATE rollouts SET status = 'completed' WHERE id = :r"), {"r": rollout_id}
        )
    async with session_scope(sessions) as session:
        answer = await control.request_control(
            session, scope=Scope(), rollout_id=rollout_id, action="abort", reason="late", actor=API
        )
    assert answer.marker is None and answer.refusal is not None


@pytest.mark.parametrize(
    ("case", "proves"),
    [
        ("its own request, just accepted", True),
        ("accepted 9 minutes after the request", True),
        ("accepted 11 minutes after the request (stale)", False),
        ("accepted at an unknown time", False),
        ("another nonce", False),
        ("another action", False),
        ("another rollout", False),
        ("no such entry", False),
    ],
)
async def test_a_marker_proves_only_its_own_recent_request(
    sessions: Sessions, rollout_id: int, case: str, proves: bool
) -> None:
    marker = await requested(sessions, rollout_id)
    now = datetime.now(UTC)
    kwargs: dict = {"accepted_at": now}
    rid = rollout_id
    if case.startswith("accepted 9"):
        kwargs["accepted_at"] = now + timedelta(minutes=9)
    elif case.startswith("accepted 11"):
        kwargs["accepted_at"] = now + timedelta(minutes=11)
    elif case == "accepted at an unknown time":
        kwargs["accepted_at"] = None
    elif case == "another nonce":
        marker = marker.model_copy(update={"nonce": marker.nonce[::-1]})
    elif case == "another action":
        kwargs["action"] = "abort"
    elif case == "another rollout":
        rid = rollout_id + 10**9
    elif case == "no such entry":
        marker = marker.model_copy(update={"audit_id": marker.audit_id + 10**9})
    assert await verified(sessions, rid, marker, **kwargs) is proves


async def test_an_entry_not_written_by_the_api_proves_nothing(
    sessions: Sessions, rollout_id: int
) -> None:
    """Whoever writes an entry with the digest of a nonce they know (any source but `api`)
    does not make a marker of it."""
    nonce = "n" * 32
    async with session_scope(sessions) as session:
        entry = await audit.record(
            session,
            actor=Actor("mallory", None, AuditSource.TEMPORAL),
            action="rollout.pause_requested",
            target_type="rollout",
            target_id=str(rollout_id),
            payload={"markerSha256": control.marker_digest(nonce)},
        )
    assert entry.id is not None
    marker = ApiRequestMarker(audit_id=entry.id, nonce=nonce)
    assert not await verified(sessions, rollout_id, marker, accepted_at=datetime.now(UTC))
