"""The fleet's default safety policy and the rule that weakening it needs an acknowledgement.

Pure functions: used by rollout creation and direct desired states alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import SafetyPolicyWeakened
from models.api import SafetyChecks
from services.audit import Actor


@dataclass(frozen=True)
class SafetyDefaults:
    require_stationary: bool
    min_battery_percent: int


@dataclass(frozen=True)
class EffectiveSafety:
    require_stationary: bool
    min_battery_percent: int
    weakened: tuple[str, ...]


def effective_safety(
    *,
    defaults: SafetyDefaults,
    require_stationary: bool | None,
    min_battery_percent: int | None,
) -> EffectiveSafety:
    """Fill unset checks from the defaults and list each check that is weaker than them."""
    stationary = defaults.require_stationary if require_stationary is None else require_stationary
    battery = defaults.min_battery_percent if min_battery_percent is None else min_battery_percent
    weakened: list[str] = []
    if defaults.require_stationary and not stationary:
        weakened.append("requireStationary")
    if battery < defaults.min_battery_percent:
        weakened.append("minBatteryPercent")
    return EffectiveSafety(stationary, battery, tuple(weakened))


def resolve_safety(
    *,
    checks: SafetyChecks,
    defaults: SafetyDefaults,
    acknowledged: bool,
    reason: str | None,
    actor: Actor,
    field_prefix: str,
    refuse: bool = True,
) -> tuple[EffectiveSafety, dict[str, Any] | None]:
    """The effective safety checks and, when they weaken the fleet default, the
    acknowledgement to audit. Unacknowledged weakening raises `SafetyPolicyWeakened` (unless
    `refuse` is False, for the dry run, which reports it)."""
    safety = effective_safety(
        defaults=defaults,
        require_stationary=checks.require_stationary,
        min_battery_percent=checks.min_battery_percent,
    )
    if not safety.weakened:
        return safety, None
    if not (acknowledged and (reason or "").strip()):
        if not refuse:
            return safety, None
        raise SafetyPolicyWeakened(
            "the safety checks are weaker than the fleet default; set "
            "acknowledgeWeakenedSafety to true and give a reason",
            details=[
                {"field": f"{field_prefix}.{name}", "message": "weaker than default"}
                for name in safety.weakened
            ],
        )
    return safety, {
        "weakened": list(safety.weakened),
        "reason": reason,
        "by": actor.subject,
        "at": datetime.now(UTC).isoformat(),
    }
