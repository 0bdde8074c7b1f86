"""An operator's control, audited on both paths (services/rollouts/control.py): the API's
entry and the marker that proves it to the workflow, and the refusals the workflow audits."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from core.db import session_scope
from models.enums import AuditSource, RolloutStatus
from models.scope import Scope
from models.workflows import ApiRequestMarker, ControlAction, ControlRefusal
from services import audit
from services.audit import Actor
from services.rollouts import control
from tests.factories import Sessions, fetch_all, fetch_one

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


async def test_refusals_are_audited_once_each(sessions: Sessions, rollout_id: int) -> None:
    at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    refusals = [
        ControlRefusal(
            id=f"{rollout_id}-r1",
            action="resume",
            via="signal",
            message="cannot resume: rollout is running, not paused",
            status=RolloutStatus.RUNNING,
            at=at,
            actor="alice",
            reason="go",
            correlation_id="req-r1",
        ),
        ControlRefusal(
            id=f"{rollout_id}-r2",
            action="pause",
            via="update",
            message="cannot pause: rollout is already paused",
            status=RolloutStatus.PAUSED,
            at=at,
        ),
    ]
    async with session_scope(sessions) as session:
        first = await control.record_refusals(
            session, rollout_id=rollout_id, refusals=refusals, dropped=3
        )
    # An activity runs at least once: the same refusals again write nothing.
    async with session_scope(sessions) as session:
        again = await control.record_refusals(
            session, rollout_id=rollout_id, refusals=refusals, dropped=3
        )
    assert (first, again) == (2, 0)
    rows = await fetch_all(
        sessions,
        "SELECT action, actor, role, source, reason, correlation_id, result, payload"
        " FROM audit_log WHERE target_type = 'rollout' AND target_id = :t"
        " AND action LIKE '%\\_refused' ORDER BY id",
        t=str(rollout_id),
    )
    assert [(r["action"], r["actor"], r["role"], r["source"], r["result"]) for r in rows] == [
        ("rollout.resume_refused", "alice", None, "temporal", "refused"),
        ("rollout.pause_refused", "temporal", None, "temporal", "refused"),
    ]
    assert (rows[0]["reason"], rows[0]["correlation_id"]) == ("go", "req-r1")
    assert rows[0]["payload"] == {
        "action": "resume",
        "via": "signal",
        "message": "cannot resume: rollout is running, not paused",
        "status": "running",
        "refusedAt": at.isoformat(),
        "refusalId": f"{rollout_id}-r1",
        "refusalsDropped": 3,
    }
