"""Operator control of a running rollout (`workflows.control`): pure rules, table-driven, no
Temporal server. test_control_update.py and test_rollout.py check the same rules through a
running workflow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from models.enums import RolloutStatus, StatusReason
from models.workflows import (
    API_MARKER_MAX_AGE,
    API_MARKER_MEMORY,
    API_MARKER_MEMORY_SIZE,
    MAX_PENDING_REFUSALS,
    ApiRequestMarker,
    ControlAction,
    ControlRefusal,
    GateAction,
    GateCounts,
    GateDecision,
    OperatorAction,
    RolloutState,
)
from workflows import control
from workflows.control import StatusChange

R = RolloutStatus
OPERATOR = StatusReason.OPERATOR
CANARY_UNHEALTHY = StatusReason.CANARY_UNHEALTHY
FAILURE_THRESHOLD = StatusReason.FAILURE_THRESHOLD


def state(status: RolloutStatus, **fields: Any) -> RolloutState:
    return RolloutState(rollout_id=1, release_version="2026.2.0", status=status, **fields)


def operator(action: ControlAction, *, force: bool = False) -> OperatorAction:
    return OperatorAction(action=action, reason="why", actor="alice", force=force)


# The states an operator can find a rollout in. `paused` is what the workflow has accepted,
# `status` what it has persisted so far; `rollback_next` is set once the rollback has begun.
STATES: dict[str, RolloutState] = {
    "pending": state(R.PENDING),
    "running": state(R.RUNNING),
    "pause accepted": state(R.RUNNING, paused=True),
    "paused": state(R.PAUSED, paused=True),
    "resume accepted": state(R.PAUSED),
    "abort requested": state(R.RUNNING, stop_requested="abort"),
    "rollback requested": state(R.RUNNING, stop_requested="rollback"),
    "rollback requested while paused": state(R.PAUSED, paused=True, stop_requested="rollback"),
    "rolling back": state(R.ROLLING_BACK, stop_requested="rollback", rollback_next=1),
    "rollback paused": state(R.PAUSED, paused=True, stop_requested="rollback", rollback_next=1),
    "rollback resume accepted": state(R.PAUSED, stop_requested="rollback", rollback_next=1),
    "completed": state(R.COMPLETED),
    "rolled back": state(R.ROLLED_BACK, stop_requested="rollback", rollback_next=-1),
    "aborted": state(R.ABORTED, stop_requested="abort"),
    "failed": state(R.FAILED),
}

PROJECTED = {
    "pending": R.PENDING,
    "running": R.RUNNING,
    "pause accepted": R.PAUSED,
    "paused": R.PAUSED,
    "resume accepted": R.RUNNING,
    "abort requested": R.ABORTED,
    "rollback requested": R.ROLLING_BACK,
    "rollback requested while paused": R.PAUSED,
    "rolling back": R.ROLLING_BACK,
    "rollback paused": R.PAUSED,
    "rollback resume accepted": R.ROLLING_BACK,
    "completed": R.COMPLETED,
    "rolled back": R.ROLLED_BACK,
    "aborted": R.ABORTED,
    "failed": R.FAILED,
}


@pytest.mark.parametrize("name", STATES)
def test_projected_status(name: str) -> None:
    assert control.projected_status(STATES[name]) == PROJECTED[name]


ALREADY_PAUSED = "cannot pause: rollout is already paused"
ALREADY_ROLLING_BACK = "cannot rollback: rollout is already rolling back"
ROLLING_BACK_NOT_PAUSED = "cannot resume: rollout is rolling back, not paused"


ACTIONS: tuple[ControlAction, ...] = ("pause", "resume", "rollback", "abort")

# Per state and action: the refusal, or (None) the status the accepted action leads to (what
# the `control` Update answers) and whether the rollout is then paused.
Row = str | tuple[RolloutStatus, bool]


def refused(status: str) -> dict[ControlAction, Row]:
    return {action: f"cannot {action}: rollout is {status}" for action in ACTIONS}


RULES: dict[str, dict[ControlAction, Row]] = {
    "pending": {
        "pause": (R.PAUSED, True),
        "resume": "cannot resume: rollout is pending, not paused",
        "rollback": (R.ROLLING_BACK, False),
        "abort": (R.ABORTED, False),
    },
    "running": {
        "pause": (R.PAUSED, True),
        "resume": "cannot resume: rollout is running, not paused",
        "rollback": (R.ROLLING_BACK, False),
        "abort": (R.ABORTED, False),
    },
    "pause accepted": {
        "pause": ALREADY_PAUSED,
        "resume": (R.RUNNING, False),
        "rollback": (R.PAUSED, True),  # the rollback starts once the flow gets to it
        "abort": (R.ABORTED, True),
    },
    "paused": {
        "pause": ALREADY_PAUSED,
        "resume": (R.RUNNING, False),
        "rollback": (R.PAUSED, True),
        "abort": (R.ABORTED, True),
    },
    "resume accepted": {
        "pause": (R.PAUSED, True),
        "resume": "cannot resume: rollout is running, not paused",
        "rollback": (R.ROLLING_BACK, False),
        "abort": (R.ABORTED, False),
    },
    "abort requested": refused("aborted"),
    "rollback requested": {
        "pause": (R.PAUSED, True),
        "resume": ROLLING_BACK_NOT_PAUSED,
        "rollback": ALREADY_ROLLING_BACK,
        "abort": (R.ABORTED, False),
    },
    "rollback requested while paused": {
        "pause": ALREADY_PAUSED,
        "resume": (R.ROLLING_BACK, False),
        "rollback": ALREADY_ROLLING_BACK,
        "abort": (R.ABORTED, True),
    },
    "rolling back": {
        "pause": (R.PAUSED, True),
        "resume": ROLLING_BACK_NOT_PAUSED,
        "rollback": ALREADY_ROLLING_BACK,
        "abort": (R.ABORTED, False),
    },
    "rollback paused": {
        "pause": ALREADY_PAUSED,
        "resume": (R.ROLLING_BACK, False),
        "rollback": ALREADY_ROLLING_BACK,
        "abort": (R.ABORTED, True),
    },
    "rollback resume accepted": {
        "pause": (R.PAUSED, True),
        "resume": ROLLING_BACK_NOT_PAUSED,
        "rollback": ALREADY_ROLLING_BACK,
        "abort": (R.ABORTED, False),
    },
    "completed": refused("completed"),
    "rolled back": refused("rolled_back"),
    "aborted": refused("aborted"),
    "failed": refused("failed"),
}


@pytest.mark.parametrize(
    ("name", "action"), [(name, action) for name in STATES for action in ACTIONS]
)
def test_transition(name: str, action: ControlAction) -> None:
    s = STATES[name].model_copy(deep=True)
    expected = RULES[name][action]
    if isinstance(expected, str):
        assert control.refusal(s, action) == expected
        return
    assert control.refusal(s, action) is None
    control.accept(s, operator(action))
    assert (control.projected_status(s), s.paused) == expected


def test_every_state_has_a_rule_for_every_action() -> None:
    assert set(RULES) == set(STATES) == set(PROJECTED)
    assert all(set(row) == set(ACTIONS) for row in RULES.values())


def test_accept_queues_pause_and_resume_for_the_main_flow() -> None:
    s = state(R.RUNNING)
    pause, resume = operator("pause"), operator("resume")
    control.accept(s, pause)
    assert s.paused and s.pending_actions == [pause] and s.stop_requested is None
    control.accept(s, resume)
    assert not s.paused and s.pending_actions == [pause, resume]


@pytest.mark.parametrize("action", ["abort", "rollback"])
def test_accept_requests_a_stop_at_once(action: ControlAction) -> None:
    s = state(R.RUNNING, stop_reason=FAILURE_THRESHOLD)
    request = operator(action)
    control.accept(s, request)
    assert (s.stop_requested, s.stop_action, s.stop_reason) == (action, request, OPERATOR)
    assert s.pending_actions == [] and not s.paused


@pytest.mark.parametrize(
    ("stop", "rollback_next", "pending"),
    [
        (None, None, False),
        ("abort", None, True),
        ("rollback", None, True),  # the flow has yet to start the rollback
        ("rollback", 1, False),  # the rollback is the flow now
        ("rollback", 0, False),
        ("abort", 1, True),  # an abort stops a rollback
    ],
)
def test_stop_pending(stop: Any, rollback_next: int | None, pending: bool) -> None:
    s = state(R.RUNNING, stop_requested=stop, rollback_next=rollback_next)
    assert control.stop_pending(s) is pending


def test_record_pause() -> None:
    s = state(R.RUNNING, paused=True)
    assert control.record_pause(s, operator("pause")) == StatusChange(R.PAUSED, OPERATOR)
    assert (s.paused_by, s.pause_note) == ("alice", "why")


# A resume, persisted: (status, statusReason, stop, rollback_next, force) ->
# (the status change, acknowledged_failed, rollback_acknowledged_failed, canary_forced_stage).
# The state has seen 4 rollout failures, 2 rollback failures, and is at stage 1; a rollback
# there was started by the failure threshold.
@pytest.mark.parametrize(
    ("status_reason", "stop", "rollback_next", "force", "expected"),
    [
        (OPERATOR, None, None, False, (StatusChange(R.RUNNING, None), 0, 0, None)),
        # the failures seen so far no longer count
        (FAILURE_THRESHOLD, None, None, False, (StatusChange(R.RUNNING, None), 4, 0, None)),
        (FAILURE_THRESHOLD, None, None, True, (StatusChange(R.RUNNING, None), 4, 0, None)),
        # the canary is evaluated again...
        (CANARY_UNHEALTHY, None, None, False, (StatusChange(R.RUNNING, None), 0, 0, None)),
        # ...unless forced: this stage's canary passes
        (CANARY_UNHEALTHY, None, None, True, (StatusChange(R.RUNNING, None), 0, 0, 1)),
        # a rollback requested while paused has not begun: the rollout resumes, then stops
        (FAILURE_THRESHOLD, "rollback", None, False, (StatusChange(R.RUNNING, None), 4, 0, None)),
        # a paused rollback resumes rolling back, under the stop's reason
        (
            OPERATOR,
            "rollback",
            1,
            False,
            (StatusChange(R.ROLLING_BACK, FAILURE_THRESHOLD), 0, 0, None),
        ),
        # its own failures seen so far no longer count
        (
            FAILURE_THRESHOLD,
            "rollback",
            1,
            False,
            (StatusChange(R.ROLLING_BACK, FAILURE_THRESHOLD), 0, 2, None),
        ),
    ],
)
def test_acknowledge_resume(
    status_reason: StatusReason,
    stop: Any,
    rollback_next: int | None,
    force: bool,
    expected: tuple[StatusChange, int, int, int | None],
) -> None:
    s = state(
        R.PAUSED,
        status_reason=status_reason,
        stop_requested=stop,
        stop_reason=FAILURE_THRESHOLD,  # a rollback its failure threshold started
        rollback_next=rollback_next,
        stage_index=1,
        last_total=GateCounts(notified=10, failed=4),
        rollback_total=GateCounts(notified=10, failed=2),
        paused_by="workflow",
        pause_note="a gate",
    )
    change = control.acknowledge_resume(s, operator("resume", force=force))
    acknowledged = (s.acknowledged_failed, s.rollback_acknowledged_failed, s.canary_forced_stage)
    assert (change, *acknowledged) == expected
    assert (s.paused_by, s.pause_note) == (None, None)


def test_a_failing_gate_pauses() -> None:
    s = state(R.RUNNING)
    decision = GateDecision(action=GateAction.PAUSE, reason=CANARY_UNHEALTHY, detail="1 of 2")
    control.pause_by_gate(s, decision)
    assert (s.paused, s.paused_by, s.pause_note) == (True, "workflow", "1 of 2")


def test_a_failure_threshold_rolls_back() -> None:
    s = state(R.RUNNING, correlation_id="req-1")
    decision = GateDecision(
        action=GateAction.ROLLBACK, reason=FAILURE_THRESHOLD, detail="3 of 10 failed"
    )
    control.rollback_by_gate(s, decision)
    assert (s.stop_requested, s.stop_reason) == ("rollback", FAILURE_THRESHOLD)
    assert s.stop_action == OperatorAction(
        action="rollback",
        reason="3 of 10 failed",
        actor="workflow",
        source="system",
        correlation_id="req-1",
        seq=1,  # after every signal and Update received so far
    )
    assert control.stop_pending(s)  # the forward flow stops for it


def test_a_gate_rollback_without_a_reason_is_a_failure_threshold() -> None:
    s = state(R.RUNNING)
    control.rollback_by_gate(s, GateDecision(action=GateAction.ROLLBACK))
    assert s.stop_reason == FAILURE_THRESHOLD


def test_start_rollback_ends_a_forward_pause() -> None:
    pause, resume = operator("pause"), operator("resume")
    s = state(
        R.PAUSED,
        paused=True,
        stop_requested="rollback",
        next_stage=3,
        pending_actions=[resume, pause],
    )
    control.start_rollback(s)
    assert (s.rollback_next, s.rollback_phase, s.paused) == (2, "issue", False)
    assert s.pending_actions == [pause]
    assert not control.stop_pending(s)


# --- Audit on the Temporal path: the API's marker, refusals ---------------------------------

T0 = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)


def marker(audit_id: int) -> ApiRequestMarker:
    return ApiRequestMarker(audit_id=audit_id, nonce="n" * 32)


def test_an_api_marker_is_accepted_once() -> None:
    s = state(R.RUNNING)
    assert control.claim_api_marker(s, None, T0) is None
    assert control.claim_api_marker(s, marker(7), T0) == marker(7)
    # The same marker again (read from the history and replayed): no longer the API's.
    assert not control.marker_claimable(s, marker(7))
    assert control.claim_api_marker(s, marker(7), T0 + timedelta(seconds=1)) is None
    assert control.claim_api_marker(s, marker(8), T0) == marker(8)
    assert [c.audit_id for c in s.api_claims] == [7, 8]


def test_claims_are_forgotten_once_their_entry_is_too_old_to_pass() -> None:
    s = state(R.RUNNING)
    control.claim_api_marker(s, marker(1), T0)
    later = T0 + API_MARKER_MEMORY + timedelta(seconds=1)
    control.claim_api_marker(s, marker(2), later)
    assert [c.audit_id for c in s.api_claims] == [2]
    # An entry forgotten here is older than API_MARKER_MAX_AGE by then: the activity refuses
    # it (services/rollouts/control.api_request_verified), so forgetting it opens nothing.
    assert API_MARKER_MEMORY > API_MARKER_MAX_AGE


def test_claims_are_bounded() -> None:
    s = state(R.RUNNING)
    for audit_id in range(API_MARKER_MEMORY_SIZE + 5):
        control.claim_api_marker(s, marker(audit_id), T0)
    assert len(s.api_claims) == API_MARKER_MEMORY_SIZE
    assert s.api_claims[0].audit_id == 5


def refusal(n: int) -> ControlRefusal:
    return ControlRefusal(
        id=f"r{n}", action="resume", via="signal", message="no", status=R.RUNNING, at=T0
    )


def test_refusals_wait_bounded_and_the_rest_are_counted() -> None:
    s = state(R.RUNNING)
    for n in range(MAX_PENDING_REFUSALS + 3):
        control.refuse(s, refusal(n))
    assert [r.id for r in s.pending_refusals] == [f"r{n}" for n in range(MAX_PENDING_REFUSALS)]
    assert s.refusals_dropped == 3
    taken = control.take_refusals(s)
    assert len(taken) == MAX_PENDING_REFUSALS and s.pending_refusals == []
    control.refuse(s, refusal(99))
    assert [r.id for r in s.pending_refusals] == ["r99"] and s.refusals_dropped == 3


def test_refusals_are_taken_in_order_up_to_an_action() -> None:
    s = state(R.RUNNING)
    for seq in (1, 2, 4, 5):
        control.refuse(s, refusal(seq).model_copy(update={"seq": seq}))
    assert [r.seq for r in control.take_refusals(s, before=3)] == [1, 2]
    assert [r.seq for r in control.take_refusals(s, before=3)] == []
    assert [r.seq for r in control.take_refusals(s)] == [4, 5]


def test_every_signal_and_update_is_numbered() -> None:
    s = state(R.RUNNING)
    assert [control.next_seq(s) for _ in range(3)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("name", "stop_seq", "before"),
    [
        ("running", None, None),  # no stop pending: every refusal is audited now
        ("abort requested", 4, 4),  # those after the abort wait for its entry
        ("rolling back", 4, None),  # the rollback under way is the flow: all of them
    ],
)
def test_refusals_wait_for_a_pending_stop(
    name: str, stop_seq: int | None, before: int | None
) -> None:
    s = STATES[name].model_copy(deep=True)
    if stop_seq is not None:
        s.stop_action = operator("abort").model_copy(update={"seq": stop_seq})
    assert control.refusals_before_stop(s) == before
