"""An operator's control of a rollout (pause, resume, rollback, abort): the request audited
before it is sent to the workflow, and its outcome. The workflow decides whether the action
is valid (its `control` Update's validator); a finished rollout is refused here at once."""

from __future__ import annotations

from typing import Any, get_args

from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import InvalidInput
from models.enums import TERMINAL_ROLLOUT_STATUSES, RolloutStatus
from models.scope import Scope
from models.tables import Rollout
from models.workflows import ControlAction
from services import audit
from services.audit import Actor, audit_scope
from services.rollouts.queries import get_rollout

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
) -> None:
    """The audit entry `rollout.{action}_{outcome}` (requested, rejected, failed) for an
    operator's control request, in the caller's transaction."""
    await audit.record(
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


async def request_control(
    session: AsyncSession,
    *,
    scope: Scope,
    rollout_id: int,
    action: str,
    reason: str,
    actor: Actor,
    force: bool = False,
) -> tuple[Rollout, str | None]:
    """Audit an operator's control request. Returns the rollout and, when its status is
    terminal (so no workflow could accept it), the refusal message; the refusal is audited
    too (`rollout.{action}_rejected`, result `rejected`). The caller commits either way."""
    if action not in CONTROL_ACTIONS:
        raise InvalidInput(f"unknown action {action!r}")
    if force and action != "resume":
        raise InvalidInput(
            "force applies to resume only",
            details=[{"field": "force", "message": "only with resume"}],
        )
    rollout = await get_rollout(session, scope=scope, rollout_id=rollout_id)
    detail = {"force": True} if force else {}
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
        return rollout, message
    await record_control(
        session,
        rollout=rollout,
        action=action,
        outcome="requested",
        reason=reason,
        actor=actor,
        detail=detail,
    )
    return rollout, None
