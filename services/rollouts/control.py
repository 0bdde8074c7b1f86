"""An operator's control of a rollout (pause, resume, rollback, abort): the request audited
before it is sent to the workflow, and its outcome. The workflow decides whether the action
is valid (its `control` Update's validator); a finished rollout is refused here at once.

The Temporal side of the audit: the API's entry carries the SHA-256 of a random nonce, and the
Update carries the entry's id and the nonce (`ApiRequestMarker`), so the workflow skips its own
entry only for a request the API did audit (`api_request_verified`); the signals and Updates
the workflow refuses are audited by it (`record_refusals`, `rollout.{action}_refused`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Any, NamedTuple, get_args

from sqlalchemy import text
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import InvalidInput
from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus
from models.scope import Scope
from models.tables import Rollout
from models.workflows import API_MARKER_MAX_AGE, ApiRequestMarker, ControlAction, ControlRefusal
from services import audit
from services.audit import Actor, audit_scope
from services.rollouts.queries import as_dict, get_rollout, rollout_columns

CONTROL_ACTIONS = get_args(ControlAction)


async def record_control(
    session: AsyncSession,
    *,
    rollout: Rollout,
    action: str,
    outcome: str,
    reason: str,
    actor: Actor,
    result: str = "ok",
    detail: dict[str, Any] | None = None,
) -> int:
    """The audit entry `rollout.{action}_{outcome}` (requested, rejected, failed) for an
    operator's control request, in the caller's transaction; returns its id."""
    entry = await audit.record(
        session,
        actor=actor,
        action=f"rollout.{action}_{outcome}",
        target_type="rollout",
        target_id=str(rollout.id),
        reason=reason,
        payload={"action": action, "statusBefore": rollout.status, **(detail or {})},
        result=result,
        **audit_scope(rollout.targets or {}),
    )
    assert entry.id is not None  # flushed
    return entry.id


class ControlRequested(NamedTuple):
    """What `request_control` recorded: the rollout, and either why it is refused at once
    (a finished rollout) or the marker the `control` Update carries to the workflow."""

    rollout: Rollout
    refusal: str | None
    marker: ApiRequestMarker | None


def marker_digest(nonce: str) -> str:
    """What the API's audit entry keeps of the marker's nonce (`markerSha256`)."""
    return hashlib.sha256(nonce.encode()).hexdigest()


async def request_control(
    session: AsyncSession,
    *,
    scope: Scope,
    rollout_id: int,
    action: str,
    reason: str,
    actor: Actor,
    force: bool = False,
    update_id: str | None = None,
) -> ControlRequested:
    """Audit an operator's control request. A finished rollout (no workflow could accept it)
    is refused at once: the refusal is audited too (`rollout.{action}_rejected`, result
    `rejected`) and returned. Otherwise the entry `rollout.{action}_requested` keeps the
    SHA-256 of a fresh nonce and the Update's id (`updateId`), and the returned marker (entry
    id and nonce) lets the workflow skip its own entry for this request. The caller commits
    either way.

    A retry (an entry of this rollout already carries `update_id`) writes no second entry:
    Temporal answers its Update with the first one's outcome. (Should the first Update never
    have reached Temporal, the retry's marker does not verify, and the workflow audits the
    action itself, as source `temporal`: audited once more, never lost.)"""
    if action not in CONTROL_ACTIONS:
        raise InvalidInput(f"unknown action {action!r}")
    if force and action != "resume":
        raise InvalidInput(
            "force applies to resume only",
            details=[{"field": "force", "message": "only with resume"}],
        )
    rollout = await get_rollout(session, scope=scope, rollout_id=rollout_id)
    detail: dict[str, Any] = {"force": True} if force else {}
    if RolloutStatus(rollout.status) in TERMINAL_ROLLOUT_STATUSES:
        message = f"cannot {action} rollout {rollout_id}: it is {rollout.status}"
        await record_control(
            session,
            rollout=rollout,
            action=action,
            outcome="rejected",
            reason=reason,
            actor=actor,
            result="rejected",
            detail={"message": message, **detail},
        )
        return ControlRequested(rollout, message, None)
    nonce = secrets.token_urlsafe(24)
    if update_id is not None:
        earlier = await _requested_entry(
            session, rollout_id=rollout_id, action=action, update_id=update_id
        )
        if earlier is not None:
            return ControlRequested(rollout, None, ApiRequestMarker(audit_id=earlier, nonce=nonce))
        detail["updateId"] = update_id
    audit_id = await record_control(
        session,
        rollout=rollout,
        action=action,
        outcome="requested",
        reason=reason,
        actor=actor,
        detail={**detail, "markerSha256": marker_digest(nonce)},
    )
    return ControlRequested(rollout, None, ApiRequestMarker(audit_id=audit_id, nonce=nonce))


_REQUESTED = text(
    """
    SELECT id FROM audit_log
    WHERE target_type = 'rollout' AND target_id = :target_id AND action = :action
      AND source = 'api' AND payload ->> 'updateId' = :update_id
    ORDER BY id LIMIT 1
    """
)


async def _requested_entry(
    session: AsyncSession, *, rollout_id: int, action: str, update_id: str
) -> int | None:
    """The id of the `rollout.{action}_requested` entry written for the Update `update_id`
    (an earlier attempt of the same request), if any."""
    return (
        await (await session.connection()).execute(
            _REQUESTED,
            {
                "target_id": str(rollout_id),
                "action": f"rollout.{action}_requested",
                "update_id": update_id,
            },
        )
    ).scalar_one_or_none()


_API_REQUEST = text(
    """
    SELECT payload ->> 'markerSha256' AS digest FROM audit_log
    WHERE id = :audit_id AND target_type = 'rollout' AND target_id = :target_id
      AND action = :action AND source = 'api' AND result = 'ok' AND at >= :since
    """
)


async def api_request_verified(
    session: AsyncSession,
    *,
    rollout_id: int,
    action: ControlAction,
    marker: ApiRequestMarker,
    accepted_at: datetime | None,
) -> bool:
    """Whether `marker` proves that the API audited this request: its entry (by primary key)
    is this rollout's `rollout.{action}_requested`, source `api`, result `ok`, written at
    most `API_MARKER_MAX_AGE` before the workflow accepted the Update (`accepted_at`), and
    holds the SHA-256 of the marker's nonce. The workflow then skips its own entry; that each
    marker is used once is the workflow's part (`workflows.control.claim_api_marker`)."""
    if accepted_at is None:
        return False
    row = (
        await (await session.connection()).execute(
            _API_REQUEST,
            {
                "audit_id": marker.audit_id,
                "target_id": str(rollout_id),
                "action": f"rollout.{action}_requested",
                "since": accepted_at - API_MARKER_MAX_AGE,
            },
        )
    ).one_or_none()
    digest = row.digest if row is not None else None
    return isinstance(digest, str) and hmac.compare_digest(digest, marker_digest(marker.nonce))


_AUDITED_REFUSALS = text(
    """
    SELECT payload ->> 'refusalId' AS refusal_id FROM audit_log
    WHERE target_type = 'rollout' AND target_id = :target_id AND action = ANY(:actions)
      AND payload ->> 'refusalId' = ANY(:ids)
    """
)


async def record_refusals(
    session: AsyncSession, *, rollout_id: int, refusals: list[ControlRefusal], dropped: int
) -> int:
    """Audit the signals and Updates the workflow refused: one entry each,
    `rollout.{action}_refused`, source `temporal`, the actor and reason of their body, result
    `refused`, payload `{action, via, message, status, refusedAt, refusalId, refusalsDropped}`
    (refusals beyond the workflow's bound are only counted). Idempotent: a refusal already
    audited (same `refusalId`, from the workflow) is not written again. Returns how many
    entries it wrote."""
    if not refusals:
        return 0
    row = await rollout_columns(session, rollout_id=rollout_id, columns="targets")
    done = {
        r.refusal_id
        for r in await (await session.connection()).execute(
            _AUDITED_REFUSALS,
            {
                "target_id": str(rollout_id),
                "actions": sorted({f"rollout.{r.action}_refused" for r in refusals}),
                "ids": [r.id for r in refusals],
            },
        )
    }
    scope = audit_scope(as_dict(row.targets))
    written = 0
    for refusal in refusals:
        if refusal.id in done:
            continue
        await audit.record(
            session,
            actor=Actor(
                subject=refusal.actor,
                role=None,
                source=AuditSource.TEMPORAL,
                correlation_id=refusal.correlation_id,
            ),
            action=f"rollout.{refusal.action}_refused",
            target_type="rollout",
            target_id=str(rollout_id),
            reason=refusal.reason,
            payload={
                "action": refusal.action,
                "via": refusal.via,
                "message": refusal.message,
                "status": refusal.status,
                "refusedAt": refusal.at.isoformat(),
                "refusalId": refusal.id,
                "refusalsDropped": dropped,
            },
            result="refused",
            **scope,
        )
        written += 1
    return written
