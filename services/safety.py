"""The fleet's default safety policy, the rule that weakening it needs an acknowledgement,
and the checks the server applies before it notifies a vehicle (`SafetyGate`).

Pure functions: used by rollout creation, direct desired states and the rollout's issuing and
blocked re-checks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import SafetyPolicyWeakened
from models.api import MaintenanceWindow, SafetyChecks
from models.defaults import DEFAULT_OFFLINE_AFTER_SECONDS
from models.workflows import MaintenanceWindowSpec, RolloutPolicy
from services.audit import Actor

# Reason codes of a target (and vehicle) the server holds back, set by the server itself (a
# vehicle reports the first two too, at apply time). docs/safety.md lists them.
BATTERY_LOW = "BATTERY_LOW"
NOT_STATIONARY = "NOT_STATIONARY"
HEARTBEAT_STALE = "HEARTBEAT_STALE"


@dataclass(frozen=True)
class SafetyGate:
    """The checks the server applies to a vehicle's last heartbeat before it notifies it, and
    the constraints the desired state it is sent carries (`constraints()`).

    The default checks nothing (and needs no heartbeat). A check that needs a heartbeat value
    (`min_battery_percent` > 0, `require_stationary`) needs a heartbeat at most
    `offline_after_seconds` old by the database's clock; without one the vehicle is held back
    with `HEARTBEAT_STALE`. `window` is not checked per vehicle (the workflow issues nothing
    outside it); it goes into the constraints."""

    min_battery_percent: int = 0
    require_stationary: bool = False
    offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    window: MaintenanceWindowSpec | None = None

    @classmethod
    def of_policy(
        cls, policy: RolloutPolicy, *, offline_after_seconds: int = DEFAULT_OFFLINE_AFTER_SECONDS
    ) -> SafetyGate:
        """A rollout's checks (its resolved `gates.safetyChecks`)."""
        return cls(
            min_battery_percent=policy.min_battery_percent,
            require_stationary=policy.require_stationary,
            offline_after_seconds=offline_after_seconds,
            window=policy.window,
        )

    @property
    def needs_heartbeat(self) -> bool:
        return self.min_battery_percent > 0 or self.require_stationary

    def params(self) -> dict[str, Any]:
        """The bind parameters of `services.rollouts.issue.SAFETY_VERDICT`."""
        return {
            "safety_checked": self.needs_heartbeat,
            "safety_min_battery": self.min_battery_percent,
            "safety_stationary": self.require_stationary,
            "safety_fresh_seconds": self.offline_after_seconds,
        }

    def constraints(self) -> dict[str, Any]:
        """The `constraints` of the desired states written under these checks (camelCase JSON,
        `desired_states.constraints`)."""
        return desired_state_constraints(
            min_battery_percent=self.min_battery_percent,
            require_stationary=self.require_stationary,
            window=self.window.model_dump(mode="json") if self.window else None,
        )


def desired_state_constraints(
    *, min_battery_percent: int, require_stationary: bool, window: dict[str, Any] | None
) -> dict[str, Any]:
    """`{"minBatteryPercent", "requireStationary", "maintenanceWindow"}`: what a vehicle checks
    again at apply time (the window as `{start, end, timezone, days}`, or null)."""
    return {
        "minBatteryPercent": min_battery_percent,
        "requireStationary": require_stationary,
        "maintenanceWindow": MaintenanceWindow.model_validate(window).model_dump(mode="json")
        if window
        else None,
    }


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
