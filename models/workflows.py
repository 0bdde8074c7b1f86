"""Workflow, activity, signal and update payloads. Nothing here carries a vehicle list:
workflows pass ids, counts, stage numbers and cursors; vehicles stay in PostgreSQL."""

from __future__ import annotations

from pydantic import BaseModel


class RolloutInput(BaseModel):
    """What starts `RolloutWorkflow`: the rollout row is the source of truth for the rest."""

    rollout_id: int
    release_version: str
    correlation_id: str | None = None
