"""Operator control of a running rollout: pure transition rules over `RolloutState`.

`RolloutWorkflow` answers operators on two paths, the `control` Update (the API; its validator
refuses an invalid transition at once) and the `pause` / `resume` / `rollback` / `abort`
signals (the `temporal` CLI). Both go through these functions: `refusal` decides whether an
action is valid now, `accept` records it in the state, `projected_status` says which status
it leads to. The workflow's main flow then persists it (`record_pause`, `acknowledge_resume`
say what the persisted change is). Gate-driven transitions (a failure threshold that rolls
back) and the start of a rollback are here too, so every change of `paused` and
`stop_requested` has one home.

Audit on the Temporal path: an action is audited by the workflow (source `temporal`) unless
it carries the API's marker (`claim_api_marker` accepts each marker once; the activity checks
it against the API's audit entry). A refused signal, or a refused Update without the API's
marker, waits in `pending_refusals` (`refuse`, bounded) until the main flow audits it
(`take_refusals`).

No Temporal calls and no I/O: tests/workflows/test_control.py checks every row of the rules
without a server.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from models.enums import TERMINAL_ROLLOUT_STATUSES, AuditSource, RolloutStatus, StatusReason
from models.workflows import (
    API_MARKER_MEMORY,
    API_MARKER_MEMORY_SIZE,
    MAX_PENDING_REFUSALS,
    ApiMarkerClaim,
    ApiRequestMarker,
    ControlAction,
    ControlRefusal,
    GateDecision,
    OperatorAction,
    RolloutState,
)


class StatusChange(NamedTuple):
    """The status (and its statusReason) the workflow persists for an operator's action."""

    status: RolloutStatus
    status_reason: StatusReason | None


def projected_status(state: RolloutState) -> RolloutStatus:
    """The status the rollout is in, or moving to once accepted actions are persisted."""
    if state.status in TERMINAL_ROLLOUT_STATUSES:
        return state.status
    if state.stop_requested == "abort":
        return RolloutStatus.ABORTED
    if state.stop_requested == "rollback":
        return RolloutStatus.PAUSED if state.paused else RolloutStatus.ROLLING_BACK
    if state.paused:
        return RolloutStatus.PAUSED
    if state.status in (RolloutStatus.PAUSED, RolloutStatus.RUNNING):
        return RolloutStatus.RUNNING
    return state.status


def refusal(state: RolloutState, action: ControlAction) -> str | None:
    """Why `action` is not a valid transition now (None: it is)."""
    status = projected_status(state)
    if status in TERMINAL_ROLLOUT_STATUSES:  # an abort under way projects to aborted
        return f"cannot {action}: rollout is {status}"
    if state.stop_requested == "rollback":
        # A rollback can be paused (by its gate or an operator), resumed and aborted.
        if action == "rollback":
            return "cannot rollback: rollout is already rolling back"
        if action == "pause" and state.paused:
            return "cannot pause: rollout is already paused"
        if action == "resume" and not state.paused:
            return "cannot resume: rollout is rolling back, not paused"
        return None
    if action == "pause" and state.paused:
        return "cannot pause: rollout is already paused"
    if action == "resume" and not state.paused:
        return f"cannot resume: rollout is {status}, not paused"
    return None


def accept(state: RolloutState, action: OperatorAction) -> None:
    """Record an accepted action (`refusal` said None): a pause or resume waits in
    `pending_actions` for the main flow to persist it; a stop is requested at once."""
    if action.action == "pause":
        state.paused = True
        state.pending_actions.append(action)
    elif action.action == "resume":
        state.paused = False
        state.pending_actions.append(action)
    else:
        state.stop_requested = action.action
        state.stop_action = action
        state.stop_reason = StatusReason.OPERATOR


def claim_api_marker(
    state: RolloutState, marker: ApiRequestMarker | None, now: datetime
) -> ApiRequestMarker | None:
    """The marker an accepted Update may rely on: None when it has none, or when an earlier
    Update of this workflow already used it (a replay of a marker read from the history);
    otherwise it is remembered, so it is never accepted again. Markers accepted longer ago
    than `API_MARKER_MEMORY` are forgotten (their audit entry is too old to pass the check
    anyway), and at most `API_MARKER_MEMORY_SIZE` are kept."""
    if marker is None or not marker_claimable(state, marker):
        return None
    since = now - API_MARKER_MEMORY
    claims = [claim for claim in state.api_claims if claim.at >= since]
    claims.append(ApiMarkerClaim(audit_id=marker.audit_id, at=now))
    state.api_claims = claims[-API_MARKER_MEMORY_SIZE:]
    return marker


def marker_claimable(state: RolloutState, marker: ApiRequestMarker | None) -> bool:
    """Whether an Update carries a marker no earlier Update of this workflow has used."""
    return marker is not None and all(c.audit_id != marker.audit_id for c in state.api_claims)


def refuse(state: RolloutState, refusal: ControlRefusal) -> None:
    """Keep a refusal for the main flow to audit; beyond `MAX_PENDING_REFUSALS` waiting, it
    is only counted (`refusals_dropped`, carried by the next refusals' audit entries)."""
    if len(state.pending_refusals) >= MAX_PENDING_REFUSALS:
        state.refusals_dropped += 1
        return
    state.pending_refusals.append(refusal)


def next_seq(state: RolloutState) -> int:
    """The order of a signal or Update just received (`OperatorAction.seq`)."""
    state.control_seq += 1
    return state.control_seq


def take_refusals(state: RolloutState, before: int | None = None) -> list[ControlRefusal]:
    """The refusals waiting to be audited that came before the action numbered `before`
    (None: all of them), removed from the state, oldest first."""
    count = 0  # they wait in the order they came: the ones taken are the first ones
    while count < len(state.pending_refusals) and (
        before is None or state.pending_refusals[count].seq < before
    ):
        count += 1
    taken, state.pending_refusals = state.pending_refusals[:count], state.pending_refusals[count:]
    return taken


def refusals_before_stop(state: RolloutState) -> int | None:
    """Refusals to audit now, before the flow acts on a pending stop: those that came before
    it (the others are audited after the stop's own entry). None: no stop pending, all."""
    if not stop_pending(state) or state.stop_action is None:
        return None
    return state.stop_action.seq


def stop_pending(state: RolloutState) -> bool:
    """A stop the main flow has yet to act on (once rolling back, only an abort)."""
    if state.rollback_next is not None and state.stop_requested == "rollback":
        return False
    return state.stop_requested is not None


def record_pause(state: RolloutState, action: OperatorAction) -> StatusChange:
    """An operator's pause, persisted: who paused and why."""
    state.paused_by, state.pause_note = action.actor, action.reason
    return StatusChange(RolloutStatus.PAUSED, StatusReason.OPERATOR)


def acknowledge_resume(state: RolloutState, action: OperatorAction) -> StatusChange:
    """An operator's resume, persisted: what it acknowledges, and the status it leads to.

    - A paused rollback resumes rolling back; after its FAILURE_THRESHOLD pause the rollback
      failures seen so far are acknowledged (they no longer count).
    - Otherwise the rollout runs again: after FAILURE_THRESHOLD the failures seen so far are
      acknowledged; after CANARY_UNHEALTHY the canary is evaluated again, unless the operator
      resumed with `force` (this stage's canary passes, on the record).
    """
    rolling_back = state.stop_requested == "rollback" and state.rollback_next is not None
    if rolling_back and state.status == RolloutStatus.PAUSED:
        if state.status_reason == StatusReason.FAILURE_THRESHOLD:
            state.rollback_acknowledged_failed = state.rollback_total.failed
        state.paused_by = state.pause_note = None
        return StatusChange(RolloutStatus.ROLLING_BACK, state.stop_reason)
    if state.status_reason == StatusReason.FAILURE_THRESHOLD:
        state.acknowledged_failed = state.last_total.failed
    elif state.status_reason == StatusReason.CANARY_UNHEALTHY and action.force:
        state.canary_forced_stage = state.stage_index
    state.paused_by = state.pause_note = None
    return StatusChange(RolloutStatus.RUNNING, None)


def pause_by_gate(state: RolloutState, decision: GateDecision) -> None:
    """A failing gate holds the rollout (or its rollback) until an operator acts."""
    state.paused = True
    state.paused_by, state.pause_note = "workflow", decision.detail


def rollback_by_gate(state: RolloutState, decision: GateDecision) -> None:
    """A breached failure threshold whose action is rollback: the rollout stops and rolls
    back, on the system's behalf."""
    state.stop_requested = "rollback"
    state.stop_reason = decision.reason or StatusReason.FAILURE_THRESHOLD
    state.stop_action = OperatorAction(
        action="rollback",
        reason=decision.detail,
        actor="workflow",
        source=AuditSource.SYSTEM,
        correlation_id=state.correlation_id,
        seq=state.control_seq + 1,  # after every signal and Update received so far
    )


def start_rollback(state: RolloutState) -> None:
    """The rollback begins at the last issued stage. A pause of the forward rollout ends here
    (the rollback is the flow now), and so do resumes still waiting to be persisted."""
    state.rollback_next = state.next_stage - 1
    state.rollback_phase = "issue"
    state.paused = False
    state.pending_actions = [a for a in state.pending_actions if a.action != "resume"]
